"""MEMIT: the normal equations of its update, batched keys and targets against their one-fact
versions, the residual spread over the window, and a batch of facts flipped on the built-in testbed."""

import pytest
import torch

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.hooks import capture
from rankone.core.tokens import EditRequest, encode_request
from rankone.edit.editor import Editor
from rankone.methods.base import LayerUpdate, resolve_settings
from rankone.methods.memit import (GPTJ_D_IN, GPTJ_LAMBDA, MemitHParams, compute_targets, memit_update, read_keys,
                                   run_window, spread_residual, updates_applied)
from rankone.methods.rome import compute_key
from rankone.methods.stats import LayerStats, layer_stats
from conftest import handle_of
from tiny import BOS_ARCHS, make_model, make_testbed_requests

REQS = [
    EditRequest.create("{} was born in", "Danielle Darrieux", "Rome"),
    EditRequest.create("{} plays the", "Toko Yasuda", "violin"),
    EditRequest.create("The capital of {} is", "France", "Berlin"),
]
TEMPLATES = ["{}", "The Eiffel Tower. {}", "I think that. {}"]
# The tiny random models' hidden states have norms ~0.2: a small step keeps the targets sane.
TINY = dict(v_steps=4, v_lr=0.05, stats_tokens=20_000, prefixes=TEMPLATES[1:])


def memit_batch(h, reqs, hp, stats):
    """MEMIT's window for these requests with C from `stats` (layer -> LayerStats), nothing written."""
    hp = hp.resolve(h)
    lam = hp.mom2_update_weight
    return run_window(h, reqs, hp, ["{}"] + list(hp.prefixes), lambda l, K, R: (*memit_update(K, R, stats[l], lam), {}))


def _spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, d, generator=g, dtype=torch.float64)
    return x.T @ x / (4 * d) + 1e-3 * torch.eye(d, dtype=torch.float64)


@pytest.mark.parametrize("lam", [1e-4, 1.0, 15000.0])
def test_update_satisfies_its_normal_equations(lam):
    d_in, d_out, k = 48, 24, 5
    g = torch.Generator().manual_seed(1)
    K = torch.randn(d_in, k, generator=g, dtype=torch.float64)
    R = torch.randn(d_out, k, generator=g, dtype=torch.float64)
    C = _spd(d_in, 2)
    B, A = memit_update(K, R, LayerStats(C, 1000), lam)
    assert B.shape == (d_out, k) and A.shape == (k, d_in)
    dW = B @ A
    # ΔW (λC + K Kᵀ) = R Kᵀ
    err = (dW @ (lam * C + K @ K.T) - R @ K.T).norm() / (R @ K.T).norm()
    assert err < 1e-6, err
    # and B A is the update itself, not just something that solves it up to a null direction
    direct = torch.linalg.solve(lam * C + K @ K.T, K @ R.T).T
    assert (dW - direct).norm() / direct.norm() < 1e-6


def test_normal_equations_hold_on_a_models_own_statistics(tok, corpus):
    h = handle_of(make_model("gpt2"), tok)
    st = layer_stats(h, [1], corpus, 20_000, progress=False)[1]
    K = read_keys(h, REQS, 1, TEMPLATES, 1)[0]
    R = torch.randn(32, len(REQS), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    B, A = memit_update(K, R, st, 117.0)
    lhs = B @ A @ (117.0 * st.mom2 + K @ K.T)
    assert (lhs - R @ K.T).norm() / (R @ K.T).norm() < 1e-6


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt", "gptj"])
def test_batched_keys_are_rome_keys_and_hidden_states(model_type, tok, tok_bos):
    model, t = make_model(model_type), tok_bos if model_type in BOS_ARCHS else tok
    h = handle_of(model, t)
    K, H = read_keys(h, REQS, 1, TEMPLATES, 2, batch_rows=4)  # 9 prompts in 3 passes
    block = h.block_path(2)
    for i, r in enumerate(REQS):
        ref = compute_key(h, r, 1, TEMPLATES)
        assert torch.allclose(K[:, i], ref.k_mean, rtol=1e-5, atol=1e-6)
        enc = encode_request(t, r, "{}", with_target=False)
        with capture(model, [block], inputs=False) as rec:
            model(input_ids=torch.tensor([enc.ids]))
        hid = rec.outputs[block].reshape(1, len(enc.ids), -1)[0, enc.subject_last].double()
        assert torch.allclose(H[:, i], hid, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "opt", "gptj"])
def test_batched_targets_follow_each_facts_own_optimisation(model_type, tok, tok_bos):
    h = handle_of(make_model(model_type), tok_bos if model_type in BOS_ARCHS else tok)
    hp = MemitHParams(**dict(TINY, v_steps=8, early_stop_loss=0.0))
    free = [compute_targets(h, [r], 1, TEMPLATES, hp) for r in REQS]
    # a threshold between the facts' first losses: some stop at once, the others go on, so
    # freezing a finished fact inside a batch is exercised
    first = sorted(f.losses[0][0] for f in free)
    stop = (first[1] + first[2]) / 2  # midway: float noise between batch and alone cannot move a fact across it
    hp = hp.replace(early_stop_loss=stop)
    alone = [compute_targets(h, [r], 1, TEMPLATES, hp) for r in REQS]
    batch = compute_targets(h, REQS, 1, TEMPLATES, hp)
    full = compute_targets(h, REQS, 1, TEMPLATES, hp.replace(fast_value=False))
    assert len({len(x) for x in batch.losses}) > 1  # facts stopped at different steps
    for i, a in enumerate(alone):
        assert batch.losses[i] == pytest.approx(a.losses[0], rel=1e-4)
        if len(a.losses[0]) == 1:  # finished at once: δ stays 0 while the others' Adam steps run
            assert torch.equal(batch.z[i], batch.h_init[i])
        else:
            moved = (a.z[0] - a.h_init[0]).norm()
            assert (batch.z[i] - a.z[0]).norm() / moved < 1e-4
    assert torch.allclose(full.z, batch.z, rtol=1e-5, atol=1e-7)
    # in groups of two facts (what bounds memory for big batches) each fact follows the same path
    grouped = compute_targets(h, REQS, 1, TEMPLATES, hp.replace(batch_rows=2 * (len(TEMPLATES) + 1)))
    assert len(REQS) > 2 and grouped.clamped == batch.clamped
    assert [len(x) for x in grouped.losses] == [len(x) for x in batch.losses]
    assert torch.allclose(grouped.z, batch.z, rtol=1e-5, atol=1e-7)
    assert torch.allclose(grouped.h_init, batch.h_init, rtol=1e-5, atol=1e-7)


def test_window_spreads_the_residual_and_reaches_the_targets(tok, corpus):
    # With "{}" as the only template the key is the bare prompt's, and a tiny λ makes each layer
    # write its share exactly: after the whole window the bare prompts' hidden state is z.
    model = make_model("gpt2")
    h = handle_of(model, tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = MemitHParams(**dict(TINY, prefixes=[]), layers=[0, 1, 2], mom2_update_weight=1e-6)
    st = layer_stats(h, [0, 1, 2], corpus, 20_000, progress=False)
    ups = memit_batch(h, REQS, hp, st)
    for k, v in model.state_dict().items():  # computing an edit changes nothing
        assert torch.equal(v, before[k]), k
    assert [u.layer for u in ups] == [0, 1, 2]
    assert [u.diagnostics["share"] for u in ups] == pytest.approx([1 / 3, 1 / 2, 1])
    z = compute_targets(h, REQS, 2, ["{}"], hp.resolve(h)).z  # deterministic: same z
    h0 = read_keys(h, REQS, 0, ["{}"], 2)[1]
    with updates_applied(model, ups):
        h1 = read_keys(h, REQS, 0, ["{}"], 2)[1]
    assert not any(arch.get_module(model, u.module)._forward_hooks for u in ups)
    gap0, gap1 = (z.T - h0).norm(), (z.T - h1).norm()
    assert gap1 / gap0 < 1e-4, (gap0, gap1)
    # the shares: R_t = (z − h) / (m − t) with h measured after the lower layers' updates
    r = spread_residual(z, h0, 3)
    assert torch.allclose(r * 3, z.T - h0)


def test_hooked_update_equals_the_merged_weight(tok):
    model = make_model("gpt2")
    path = handle_of(model, tok).proj_path(1)
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(32, 3, generator=g, dtype=torch.float64), torch.randn(3, 128, generator=g, dtype=torch.float64)

    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with updates_applied(model, [LayerUpdate(path, 1, B, A, {})]):
        hooked = model(input_ids=ids).logits
    w = arch.weight_oi(arch.get_module(model, path))
    keep = w.detach().clone()
    with torch.no_grad():
        w.add_((B @ A).float())
    merged = model(input_ids=ids).logits
    with torch.no_grad():
        w.copy_(keep)
    assert torch.allclose(hooked, merged, atol=1e-5)
    assert not torch.allclose(hooked, model(input_ids=ids).logits, atol=1e-3)


def test_settings_round_trip_and_adapt_to_the_model():
    hp = MemitHParams(layers=[2, 3, 4], v_steps=7, prefixes=["A. {}"], mom2_update_weight=900.0)
    assert MemitHParams.from_json(hp.to_json()) == hp
    h = handle_of(make_model("llama", num_hidden_layers=24), None)
    r = MemitHParams().resolve(h)
    d_in = arch.in_out_features(h.proj(0))[0]
    assert r.layers == [0, 1, 2, 3] and r.layer == 3  # 24 // 8 is the edit layer; a sixth of 24 is 4 wide
    assert r.mom2_update_weight == pytest.approx(GPTJ_LAMBDA * d_in / GPTJ_D_IN)
    assert MemitHParams.from_json(r.to_json()).resolve(h) == r
    for bad in ({"layers": [3, 2]}, {"layers": [1, 2], "layer": 1}, {"window": 0}, {"method": "rome"},
                {"mom2_update_weight": -1.0}, {"windw": 3}):
        with pytest.raises(RankoneError):
            MemitHParams.from_dict(bad)


def test_empty_batch_is_refused(tok, corpus):
    with pytest.raises(RankoneError, match="no requests"):
        Editor(handle_of(make_model("gpt2"), tok), MemitHParams(**TINY), corpus, progress=False).edit([])


def test_memit_flips_a_batch_of_testbed_facts():
    """5 facts in one batch on the built-in testbed (its edit layer is 0, so the window is [0])."""
    
    from rankone.models.load import load_model
    from rankone.testbed import World, builtin_model_dir
    from rankone.testbed.check import greedy_hits

    d = builtin_model_dir()
    h = load_model(d)
    model, tok = h
    world = World.load(d)
    reqs, pairs = make_testbed_requests(world, 5)
    # The toy model's residual stream is small next to what a new fact needs (δ ≈ 2–4 ‖h‖):
    # MEMIT's clamp of 0.75 ‖h‖ is for billion-parameter models; ROME's 4 fits this one.
    hp = resolve_settings(h, {"method": "memit", "clamp_norm_factor": 4.0})  # over the model card's
    st = layer_stats(h, hp.layers, d / "corpus.txt", hp.stats_tokens, progress=False)
    assert not any(greedy_hits(model, tok, pairs)[1])
    ed = Editor(h, hp, progress=False)
    ups = run_window(h, reqs, hp, ed.templates, lambda l, K, R: (*memit_update(K, R, st[l], hp.mom2_update_weight), {}))
    with updates_applied(model, ups):
        flipped = greedy_hits(model, tok, pairs)[1]
    assert sum(flipped) >= 4, flipped
    assert not any(greedy_hits(model, tok, pairs)[1])  # and the model itself is as it was
