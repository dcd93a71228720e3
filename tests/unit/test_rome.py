"""The update's algebra on tiny models of every architecture in the table."""

import pytest
import torch

from rankone.core import architectures as arch
from rankone.edit.editor import Editor
from rankone.artifacts.patch import revert_patch
from rankone.methods.rome import VARIANTS, EditHParams, compute_key, compute_value, rank_one_update
from rankone.core.tokens import EditRequest
from conftest import handle_of
from tiny import BOS_ARCHS, CONFIGS, make_model

NORMED_OUTPUT = {"gemma2"}  # types in CONFIGS whose blocks norm the MLP output (post_feedforward_layernorm)

FAST = dict(v_steps=6, prefix_spec=[[3, 5]], layer=1, stats_tokens=20_000)
REQ = EditRequest.create("{} was born in", "Danielle Darrieux", "Rome")


def setup(model_type, tok, tok_bos, corpus, method="r-rome", **kw):
    model = make_model(model_type, **kw)
    t = tok_bos if model_type in BOS_ARCHS else tok
    ed = Editor(handle_of(model, t), EditHParams(method=method, **FAST), corpus, progress=False)
    return model, t, ed


@pytest.mark.parametrize("method", ["r-rome", "p-rome", "rome", "r-rome-bare"])
@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_update_writes_the_key_and_nothing_else(model_type, method, tok, tok_bos, corpus):
    model, t, ed = setup(model_type, tok, tok_bos, corpus, method)
    path = ed.handle.proj_path(1)
    W = arch.weight_oi(arch.get_module(model, path)).detach().double().clone()
    c = ed.compute([REQ])
    upd, info = c.detail.update, c.detail
    ed.write(c, [REQ])
    W1 = arch.weight_oi(arch.get_module(model, path)).detach().double()

    # W′k = v* for the key the method writes (k̄ for r-ROME, k_o for p-ROME and ROME)
    err = (W1 @ upd.key - upd.target_value).norm() / upd.target_value.norm()
    assert err < 1e-4, err
    # v* = W k + δ, where k is the key whose current output the method starts from: the bare
    # prompt's for r-rome-bare (written at k̄), the written key's for the others; where a norm
    # follows the projection (gemma2), v* + b keeps that direction at the current scale ‖W k + b‖
    key = compute_key(ed.handle, REQ, 1, ed.templates)
    start = key.k_bare if method == "r-rome-bare" else upd.key
    proj = arch.get_module(model, path)
    b = torch.zeros(W.shape[0], dtype=torch.float64) if proj.bias is None else proj.bias.detach().double()
    raw = W @ start + info.value.delta
    assert info.normed == (model_type in NORMED_OUTPUT)
    if info.normed:
        assert torch.nn.functional.cosine_similarity(upd.target_value + b, raw + b, dim=0) > 1 - 1e-9
        assert (upd.target_value + b).norm() == pytest.approx(float((W @ upd.key + b).norm()), rel=1e-9)
        assert upd.diagnostics["target_scale"] < 1
    else:
        assert torch.allclose(upd.target_value, raw, rtol=1e-9, atol=1e-12)
        assert upd.diagnostics["target_scale"] == 1.0
    if method == "r-rome-bare" and not info.normed:  # written at k̄: the residual carries W(k_o − k̄) besides δ
        assert torch.allclose(upd.key, key.k_mean)
        delta = info.value.delta
        assert torch.allclose(upd.residual, delta + W @ (key.k_bare - key.k_mean), rtol=1e-6, atol=1e-8)
        assert not torch.allclose(upd.residual, delta, rtol=1e-3)
    d = ed.stats(1).solve(key.k_bare if method == "p-rome" else key.k_mean)
    x = torch.randn(W.shape[1], 7, dtype=torch.float64)
    expect = torch.outer(upd.target_value - W @ upd.key, d) @ x / float(d @ upd.key)
    got = (W1 - W) @ x
    assert (got - expect).norm() / expect.norm() < 1e-4
    # the rank-one constraint itself
    s = torch.linalg.svdvals(W1 - W)
    assert s[1] / s[0] < 1e-5


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_revert_is_bit_exact_and_fast_value_matches_full(model_type, tok, tok_bos, corpus):
    model, t, ed = setup(model_type, tok, tok_bos, corpus)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch = ed.edit([REQ, EditRequest.create("{} plays the", "Toko Yasuda", "violin")], keep=True)
    assert len(patch.edits) == 2
    assert not torch.equal(arch.weight_oi(arch.get_module(model, patch.edits[0].module)), before_w(before, model, patch))
    revert_patch(model, patch)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k

    hp = ed.settings.replace(v_steps_max=ed.settings.v_steps)  # 50 passes of float32 drift would outgrow the tolerance
    full = compute_value(ed.handle, REQ, 1, ed.templates, hp.replace(fast_value=False))
    fast = compute_value(ed.handle, REQ, 1, ed.templates, hp.replace(fast_value=True))
    assert torch.allclose(fast.delta, full.delta, rtol=1e-4, atol=1e-6)
    assert fast.losses == pytest.approx(full.losses, rel=1e-4)


def before_w(state, model, patch):
    e = patch.edits[0]
    w = state[e.module + ".weight"]
    return w.T if arch.weight_layout(arch.get_module(model, e.module)) == "conv1d" else w


def test_gpt2_square_conv1d_is_edited_in_the_right_orientation(tok, tok_bos, corpus):
    # n_inner = n_embd makes c_proj square, so only the module type tells [in, out] from [out, in].
    model, t, ed = setup("gpt2", tok, tok_bos, corpus, n_inner=32)
    proj = model.transformer.h[1].mlp.c_proj
    assert proj.weight.shape[0] == proj.weight.shape[1]
    c = ed.compute([REQ])
    upd, info = c.detail.update, c.detail
    with torch.no_grad():
        before = proj(upd.key.float()[None]).double()
    ed.write(c, [REQ])
    with torch.no_grad():
        after = proj(upd.key.float()[None]).double()
    # the module's own forward moves by δ exactly at the key: only the right orientation does that
    assert ((after - before)[0] - torch.outer(upd.residual, upd.key_dir) @ upd.key).norm() < 1e-4 * upd.residual.norm()
    transposed = torch.outer(upd.key_dir, upd.residual) @ upd.key  # what a [in, out] mix-up would have written
    assert ((after - before)[0] - transposed).norm() > 1e-2 * upd.residual.norm()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_edit_reverts_exactly(dtype, tok, tok_bos, corpus):
    model = make_model("llama").to(dtype)
    ed = Editor(handle_of(model, tok_bos), EditHParams(**FAST), corpus, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    patch = ed.edit([REQ], keep=True)
    assert patch.edits[0].weight_dtype == str(dtype).replace("torch.", "")
    assert all(torch.isfinite(e.B).all() and torch.isfinite(e.A).all() for e in patch.edits)
    revert_patch(model, patch)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def _fixed_steps(hp, steps=6):
    return hp.replace(v_steps=steps, early_stop_prob=1.0, v_steps_max=steps)  # never stops early, never goes on


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "gemma2", "opt"])
def test_gathered_logits_give_the_full_logit_delta_and_update(model_type, tok, tok_bos, corpus):
    # gemma2 soft-caps its logits after the head: the gathered path must do the same
    model, t, ed = setup(model_type, tok, tok_bos, corpus)
    model.double()  # in float32 the two loops' different summation orders alone differ by ~1e-5
    hp = _fixed_steps(ed.settings)
    full = compute_value(ed.handle, REQ, 1, ed.templates, hp.replace(fast_value=False), full_logits=True)
    fast = compute_value(ed.handle, REQ, 1, ed.templates, hp)
    assert fast.gathered and not full.gathered
    assert fast.passes == "suffix" and full.passes == "full"
    assert len(fast.losses) == len(full.losses) == 6
    assert torch.allclose(fast.delta, full.delta, rtol=1e-5, atol=1e-5 * float(full.delta.abs().max()))
    assert fast.target_probs == pytest.approx(full.target_probs, rel=1e-5)
    key = compute_key(ed.handle, REQ, 1, ed.templates)
    w = arch.weight_oi(ed.handle.proj(1))
    a = rank_one_update(w, key, fast, ed.stats(1), VARIANTS["r-rome"])
    b = rank_one_update(w, key, full, ed.stats(1), VARIANTS["r-rome"])
    dw_a, dw_b = torch.outer(a.residual, a.key_dir), torch.outer(b.residual, b.key_dir)
    assert (dw_a - dw_b).norm() <= 1e-5 * dw_b.norm()


def test_head_the_loop_cannot_reproduce_falls_back_to_full_logits(tok, tok_bos, corpus):
    model, t, ed = setup("llama", tok, tok_bos, corpus)
    model.config.final_logit_softcapping = 0.5  # llama ignores it; lm_head_logits would not
    hp = _fixed_steps(ed.settings, 3)
    res = compute_value(ed.handle, REQ, 1, ed.templates, hp)
    assert not res.gathered
    del model.config.final_logit_softcapping
    ref = compute_value(ed.handle, REQ, 1, ed.templates, hp, full_logits=True)
    assert torch.equal(res.delta, ref.delta)


def test_early_stop_when_target_probability_crosses_the_threshold():
    # the built-in testbed really learns facts, so p(target) climbs over the value steps
    from rankone.models.load import load_model
    from rankone.testbed import builtin_model_dir

    handle = load_model(builtin_model_dir())
    req = EditRequest.create("{} was born in", "Thoutem Nousren", "Paris")
    ed = Editor(handle, {"v_steps": 12, "early_stop_prob": 1.0, "v_steps_max": 12}, progress=False)  # over the card's
    layer = ed.layer
    run = compute_value(ed.handle, req, layer, ed.templates, ed.settings)
    p = run.target_probs
    assert not run.stopped_early and len(p) == 12 and p[-1] > 10 * p[0]
    # the first pass (after the second) whose p(target) beats every earlier one: stop there
    j = next(i for i in range(2, 12) if p[i] > max(p[:i]))
    thr = (p[j] + max(p[:j])) / 2
    hp = ed.settings.replace(early_stop_prob=thr)
    stop = compute_value(ed.handle, req, layer, ed.templates, hp)
    assert stop.stopped_early and len(stop.losses) == j + 1
    assert stop.target_probs == pytest.approx(p[: j + 1], rel=1e-6)
    assert stop.target_prob >= thr > max(stop.target_probs[:-1])
    patch = Editor(handle, hp, progress=False).edit([req])
    v = patch.edits[0].diagnostics["value"]
    assert v["stopped_early"] and v["steps"] == j + 1 and v["early_stop_prob"] == thr
    assert patch.edits[0].hparams["early_stop_prob"] == thr


def test_a_value_short_of_reach_prob_goes_on_up_to_the_cap():
    from rankone.models.load import load_model
    from rankone.testbed import builtin_model_dir

    handle = load_model(builtin_model_dir())
    req = EditRequest.create("{} was born in", "Thoutem Nousren", "Paris")
    ed = Editor(handle, {"v_steps": 12, "early_stop_prob": 1.0, "v_steps_max": 12}, progress=False)  # over the card's
    layer = ed.layer
    p = compute_value(ed.handle, req, layer, ed.templates, ed.settings).target_probs  # 12 passes, p climbing
    short = ed.settings.replace(v_steps=3)
    # reached by pass 3: stops there as before; not reached: goes on to the first pass that reaches it
    j = next(i for i in range(3, 12) if p[i] > max(p[:i]))
    for reach, stop_at, extended in ((p[2] * 0.99, 3, False), ((p[j] + max(p[:j])) / 2, j + 1, j >= 3)):
        run = compute_value(ed.handle, req, layer, ed.templates, short.replace(reach_prob=reach))
        assert len(run.losses) == stop_at and run.extended == extended and not run.stopped_early
        assert run.target_probs == pytest.approx(p[:stop_at], rel=1e-6)
    # never reached: the cap; a cap at or below v_steps: no extra pass at all
    capped = compute_value(ed.handle, req, layer, ed.templates, short.replace(reach_prob=1.0, v_steps_max=7))
    assert len(capped.losses) == 7 and capped.extended
    plain = compute_value(ed.handle, req, layer, ed.templates, short.replace(reach_prob=1.0, v_steps_max=2))
    assert len(plain.losses) == 3 and not plain.extended


@pytest.mark.parametrize("window", [512, 4])
def test_sliding_window_model_caches_prefixes_only_where_that_is_exact(window, tok_bos, corpus):
    # Gemma 3 attends within a sliding window on most layers. Prompts shorter than the window:
    # prefixes are cached. Longer ones (window 4 here): the check against a plain pass refuses
    # the cache and the layers below are replayed instead. Either way δ is the full pass's.
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gemma3_text", **dict(CONFIGS["gemma2"], sliding_window=window, vocab_size=400,
                                                      bos_token_id=1, eos_token_id=0, pad_token_id=0))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert handle_of(model, tok_bos).spec.proj == "model.layers.{}.mlp.down_proj"  # gemma3_text: found without a hand-written spec
    ed = Editor(handle_of(model, tok_bos), EditHParams(**FAST), corpus, progress=False)
    hp = _fixed_steps(ed.settings, 4)
    fast = compute_value(ed.handle, REQ, 1, ed.templates, hp)
    full = compute_value(ed.handle, REQ, 1, ed.templates, hp.replace(fast_value=False), full_logits=True)
    assert fast.passes == ("suffix" if window == 512 else "replay")
    assert torch.allclose(fast.delta, full.delta, rtol=1e-5, atol=1e-5 * float(full.delta.abs().max()))


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt"])
def test_no_pass_applies_the_head_to_every_prompt_at_every_position(model_type, tok, tok_bos, corpus):
    # The prefix pass only fills the KV cache: the head runs there at one position per prompt, and
    # the value steps apply it at the positions the loss reads; only the check pass (a few prompts)
    # computes whole logits. The edit is the same as with whole prompts.
    model, t, ed = setup(model_type, tok, tok_bos, corpus)
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, o: shapes.append(tuple(a[0].shape[:-1])))
    try:
        res = compute_value(ed.handle, REQ, 1, ed.templates, _fixed_steps(ed.settings, 2))
    finally:
        hook.remove()
    rows = len(ed.templates) + 1  # the rewriting prompts and the KL prompt
    assert res.passes == "suffix" and res.gathered
    assert (rows, 1) in shapes  # the prefix pass
    assert not [s for s in shapes if len(s) == 2 and s[0] == rows and s[1] > 1], shapes
