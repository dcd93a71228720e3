"""Batch edits through the Editor: a MEMIT batch as one patch (exact apply/revert, files, PEFT,
the guard), AlphaEdit's preserved keys across batches and sessions, and a batch patch through the
registry (add, validate, release, conflicts, build)."""

import json

import pytest
import torch

from rankone.artifacts.patch import Patch, apply_patch, revert_patch
from rankone.cli.main import main
from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import tensor_sha256
from rankone.core.tokens import EditRequest
from rankone.edit.editor import Editor
from rankone.edit.guard import Guard
from rankone.lifecycle.conflicts import find_conflicts
from rankone.lifecycle.registry import Registry
from rankone.methods.alphaedit import AlphaEditHParams
from rankone.methods.base import PreservedKeys, method
from rankone.methods.memit import MemitHParams
from rankone.methods.rome import EditHParams
from tiny import BOS_ARCHS, make_model
from conftest import handle_of, run_cli  # noqa: E402

REQS = [
    EditRequest.create("{} was born in", "Danielle Darrieux", "Rome"),
    EditRequest.create("{} plays the", "Toko Yasuda", "violin"),
    EditRequest.create("The capital of {} is", "France", "Berlin"),
]
LATER = [EditRequest.create("{} was born in", "Blaise Pascal", "London"),
         EditRequest.create("{} speaks", "Michel Rocard", "English")]
# As in test_memit: the tiny random models' hidden states are small, so a small step keeps targets sane.
TINY = dict(layers=[0, 1, 2], v_steps=4, v_lr=0.05, stats_tokens=20_000, prefixes=["The Eiffel Tower. {}"])
# The tiny GPT-2's C has ~90 of 128 eigenvalues under 1e-4; α far below the keys' null-space
# norms makes the second batch leave the first one's keys exactly where they were.
ALPHA = dict(TINY, nullspace_threshold=1e-4, l2=1e-10)


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, st):
    return all(torch.equal(v, st[k]) for k, v in model.state_dict().items())


def weight(model, module):
    return arch.weight_oi(arch.get_module(model, module)).detach()


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_memit_batch_is_one_patch_that_applies_and_reverts_exactly(model_type, tok, tok_bos, corpus, tmp_path):
    model, t = make_model(model_type), tok_bos if model_type in BOS_ARCHS else tok
    st = state(model)
    ed = Editor(handle_of(model, t), MemitHParams(**TINY), corpus, progress=False)
    patch = ed.edit(REQS)
    assert same(model, st)  # keep=False gives the model back bit for bit
    assert [e.layer for e in patch.edits] == [0, 1, 2] and all(e.rank == 3 for e in patch.edits)
    for e in patch.edits:
        assert e.method == "memit" and e.requests == [r.to_dict() for r in REQS] and e.request == REQS[0].to_dict()
        assert e.hparams["layers"] == [0, 1, 2] and e.hparams["mom2_update_weight"] > 0  # resolved, recorded
        assert e.keys.dtype == torch.float64 and list(e.keys.shape) == [e.A.shape[1], 3]
        assert e.B.dtype == torch.float32 and e.A.dtype == torch.float32
    assert [o["answer"] for _, o in zip(REQS, patch.edits[-1].diagnostics["outcomes"])]
    assert len(patch.facts()) == 3  # each fact once, not once per layer
    patch.save(tmp_path / "p")
    back = Patch.load(tmp_path / "p")
    assert back.content_id() == patch.content_id()
    for a, b in zip(back.edits, patch.edits):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.A, b.A) and a.requests == b.requests
    h = apply_patch(model, back)
    for e in back.edits:  # what apply merges is exactly what the patch records
        assert tensor_sha256(weight(model, e.module)) == e.sha256_after != e.sha256_before
    h.revert()
    assert same(model, st)
    apply_patch(model, back)
    revert_patch(model, back)  # from the patch alone, last layer first
    assert same(model, st)


def test_keep_writes_the_batch_and_a_failed_batch_leaves_nothing(tok, corpus):
    model = make_model("gpt2")
    st = state(model)
    ed = Editor(handle_of(model, tok), MemitHParams(**TINY), corpus, progress=False)
    with pytest.raises(RankoneError, match="asks 'Danielle Darrieux was born in' twice"):
        ed.edit([REQS[0], EditRequest.create("{} was born in", "Danielle Darrieux", "Paris")])
    assert same(model, st)
    patch = ed.edit(REQS, keep=True)
    for e in patch.edits:
        assert tensor_sha256(weight(model, e.module)) == e.sha256_after
    assert ed.context.kept.count(2) == 3  # a kept batch's keys join the context's (used by AlphaEdit)


def test_peft_export_of_a_memit_patch_equals_the_merged_model(tok, corpus, tmp_path):
    peft = pytest.importorskip("peft")
    from rankone.artifacts.peft_export import save_peft_adapter

    model = make_model("gpt2")
    patch = Editor(handle_of(model, tok), MemitHParams(**TINY), corpus, progress=False).edit(REQS)
    x = torch.tensor([tok("Danielle Darrieux was born in Paris, and Toko Yasuda plays the guitar.")["input_ids"]])
    with torch.no_grad():
        base = model(input_ids=x).logits
    save_peft_adapter(model, [patch], tmp_path / "adapter")
    h = apply_patch(model, patch)
    with torch.no_grad():
        want = model(input_ids=x).logits
    h.revert()
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 3  # a LoRA of rank n on each window layer
    pm = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter"))
    with torch.no_grad():
        got = pm(input_ids=x).logits
    pm.unload()
    assert float((got - want).abs().max()) < 1e-5
    assert float((base - want).abs().max()) > 1e-3


def test_the_guard_judges_a_batch_by_its_norm_per_fact(tok, corpus):
    model = make_model("gpt2")
    st = state(model)
    ed = Editor(handle_of(model, tok), MemitHParams(**TINY), corpus, progress=False)
    strict = Guard(warmup=2)
    for _ in range(2):
        strict.accept(1e-9)  # a history of tiny updates: any real batch is a spike
    patch = ed.edit(REQS, keep=True, guard=strict)
    assert patch.edits == [] and same(model, st)
    assert len(ed.rejected) == 1 and len(ed.rejected[0].requests) == 3 and "running median" in ed.rejected[0].reason
    assert strict.refused[0]["requests"] == [r.to_dict() for r in REQS]
    lenient = Guard(warmup=2)
    for _ in range(2):
        lenient.accept(1e9)
    patch = ed.edit(REQS, keep=True, guard=lenient)
    per_fact = (sum(e.delta_fro ** 2 for e in patch.edits) / 3) ** 0.5  # ‖ΣBA‖ over the window / √n
    assert lenient.norms[-1] == pytest.approx(per_fact, rel=1e-5) and not same(model, st)


def test_settings_by_method_name():
    assert method("memit").settings is MemitHParams and method("alphaedit").settings is AlphaEditHParams
    assert method(None).settings is EditHParams and method("p-rome").settings is EditHParams
    assert isinstance(method("alphaedit").settings.from_dict({"method": "alphaedit", "l2": 2.0}), AlphaEditHParams)
    with pytest.raises(RankoneError, match="choose one of r-rome, p-rome, rome, r-rome-bare, r-rome-2key, memit, alphaedit, emmet"):
        method("mend")
    with pytest.raises(RankoneError, match="unknown hyper-parameter"):
        EditHParams.from_dict({"method": "r-rome", "window": 3})  # a MEMIT field is not r-ROME's


def test_a_given_window_wins_over_the_model_cards_layer():
    from rankone.models.load import load_model
    from rankone.testbed import builtin_model_dir

    handle = load_model(builtin_model_dir())  # its card recommends layer 0
    assert handle.default_layer() == 0
    for cls in (MemitHParams, AlphaEditHParams):
        assert Editor(handle, cls(layers=[0, 1]), progress=False).layers == [0, 1]
        assert Editor(handle, cls(), progress=False).layers == [0]  # the card's layer ends the window
        assert Editor(handle, {"method": cls().method, "layers": [0, 1]}, progress=False).layers == [0, 1]


# ---- AlphaEdit: the keys of earlier batches ---------------------------------------------------


def _moved(model, before, patch):
    """Per layer: how far the weights now move the outputs at `patch`'s keys, relative to those outputs."""
    return [float(((weight(model, e.module).double() - before[e.layer]) @ e.keys).norm()
                  / (before[e.layer] @ e.keys).norm()) for e in patch.edits]


def test_alphaedit_second_batch_leaves_the_first_batchs_keys_unchanged(tok, corpus, tmp_path):
    results = {}
    for keep_keys in (True, False):
        model = make_model("gpt2")
        ed = Editor(handle_of(model, tok), AlphaEditHParams(**ALPHA), corpus, progress=False, cache_dir=tmp_path)
        first = ed.edit(REQS, keep=True)
        assert [ed.context.kept.count(l) for l in (0, 1, 2)] == [3, 3, 3]
        if not keep_keys:
            ed.context.kept.keys.clear()  # as if the first batch had not been kept
        before = {e.layer: weight(model, e.module).double().clone() for e in first.edits}
        second = ed.edit(LATER, keep=True)
        assert second.edits[0].diagnostics["n_preserved"] == (3 if keep_keys else 0)
        assert all(e.diagnostics["written_fraction"] > 0.99 for e in second.edits)  # the new batch is written
        results[keep_keys] = _moved(model, before, first)
    assert max(results[True]) < 1e-6, results  # the first batch's keys' outputs stay (float32 weights)
    assert min(results[False]) > 1e-2, results  # without the store the same batch moves them


def test_alphaedit_resumes_exactly_from_patches_across_sessions(tok, corpus, tmp_path):
    # an unbroken run: two batches, one Editor
    model = make_model("gpt2")
    ed = Editor(handle_of(model, tok), AlphaEditHParams(**ALPHA), corpus, progress=False)
    first = ed.edit(REQS, keep=True)
    want = ed.edit(LATER)
    first.save(tmp_path / "first")
    for layer, K in PreservedKeys.of_patches([Patch.load(tmp_path / "first")]).keys.items():
        assert torch.equal(K, ed.context.kept.keys[layer])
    # a new session on the base model, given only the first patch's files
    again = make_model("gpt2")
    st = state(again)
    ed2 = Editor(handle_of(again, tok), AlphaEditHParams(**ALPHA), corpus, progress=False)
    applied = ed2.continue_from([Patch.load(tmp_path / "first")])
    got = ed2.edit(LATER)
    for a, b in zip(got.edits, want.edits):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and a.sha256_before == b.sha256_before
    applied.revert()
    assert same(again, st)


# ---- a MEMIT patch through the registry ---------------------------------------------------------



def test_memit_patch_through_the_registry_lifecycle(model_dir, tok, tmp_path, capsys):
    from rankone.models.load import load_model

    reqs = tmp_path / "batch.jsonl"
    reqs.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in REQS))
    hp = json.dumps({k: v for k, v in TINY.items()})
    code, out, err = run_cli(capsys, "edit", "--quiet", "--model", model_dir, "--method", "memit", "--requests", reqs,
                             "--hparams", hp, "--out", tmp_path / "p")
    assert code == 0, err
    assert "memit: 3 request(s) as one batch" in out and out.count("the model now says") == 3
    code, out, _ = run_cli(capsys, "show", tmp_path / "p")
    assert out.count("rank 3") == 3 and "and 2 more fact(s) in one batch" in out
    db = tmp_path / "reg.db"
    code, out, err = run_cli(capsys, "registry", "add", tmp_path / "p", "--reason", "batch", "--registry", db)
    assert code == 0, err
    reg = Registry(db)
    pid = reg.list()[0].id
    assert len(reg.get(pid).summary) == 3 and reg.get(pid).n_edits == 3  # three facts, written on three layers
    suite = tmp_path / "suite.jsonl"
    suite.write_text('{"type": "perplexity", "text": "First Citizen: Before we proceed any further, hear me speak."}\n')
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"max_delta_rel": None, "max_perplexity_rise": 10.0}))
    code, out, err = run_cli(capsys, "registry", "validate", pid, "--model", model_dir, "--suite", suite,
                             "--policy", policy, "--registry", db)
    assert code == 0, out + err
    report = reg.validations(pid)[-1]["report"]
    assert sorted(r["what"] for r in report["results"] if r["type"] == "delta") == [
        f"transformer.h.{i}.mlp.c_proj" for i in range(3)]  # ‖ΣBA‖ of each window layer is gated
    code, out, err = run_cli(capsys, "registry", "release", pid, "--model", model_dir, "--reason", "go", "--registry", db)
    assert code == 0, err
    # a later batch that writes one of the released facts again is one conflict, not one per pair of layers
    handle = load_model(model_dir)
    again = Editor(handle, MemitHParams(**TINY), progress=False).edit([REQS[1], LATER[0]])
    conflicts = find_conflicts(again, [(pid, reg.load_patch(pid))], 0.999)
    assert [c.kind for c in conflicts] == ["same-fact"] and "Toko Yasuda plays the -> violin" in conflicts[0].detail
    # a batch of other facts, made on the base too, is released after it; build stacks both in order
    other = Editor(handle, MemitHParams(**TINY), progress=False).edit(LATER)
    other.save(tmp_path / "q")
    qid = reg.add(tmp_path / "q", "alice", "r")[0].id
    reg.record_validation(qid, {"results": [{"passed": True}], "suite": {"sha256": "x"}}, True, "alice")
    assert reg.release(qid)[0].release_seq == 2
    code, out, err = run_cli(capsys, "registry", "build", "--model", model_dir, "--out", tmp_path / "built", "--registry", db)
    assert code == 0, err
    built = load_model(tmp_path / "built")
    h = apply_patch(handle.model, [Patch.load(tmp_path / "p"), other])
    for i in range(3):
        m = f"transformer.h.{i}.mlp.c_proj"
        assert torch.equal(weight(built.model, m), weight(handle.model, m))
        both = sum(e.delta() for p in (Patch.load(tmp_path / "p"), other) for e in p.edits if e.module == m)
        assert not torch.equal(weight(built.model, m), weight(load_model(model_dir).model, m))
        assert torch.allclose(weight(handle.model, m).double() - weight(load_model(model_dir).model, m).double(),
                              both, atol=1e-6)
    h.revert()
    reg.close()
