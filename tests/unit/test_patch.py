"""The patch artifact: files, exact apply/revert, refusals that leave the model untouched."""

import json

import pytest
import torch

from rankone.core import architectures as arch
from rankone.edit.editor import Editor
from rankone.core.errors import RankoneError
from rankone.methods.rome import EditHParams
from rankone.artifacts.patch import Patch, apply_patch, compose, revert_patch
from rankone.core.tokens import EditRequest
from tiny import make_model
from conftest import handle_of  # noqa: E402

HP = EditHParams(v_steps=4, prefix_spec=[[3, 5]], layer=1, stats_tokens=20_000)
R1 = EditRequest.create("{} was born in", "Danielle Darrieux", "Rome")
R2 = EditRequest.create("{} plays the", "Toko Yasuda", "violin")


@pytest.fixture(scope="module")
def made(tok, corpus, tmp_path_factory):
    model = make_model("gpt2")
    ed = Editor(handle_of(model, tok), HP, corpus, progress=False)
    p1 = ed.edit([R1], author="ana", reason="wrong birthplace")
    p2 = ed.edit([R2])
    return model, p1, p2


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, st):
    return all(torch.equal(v, st[k]) for k, v in model.state_dict().items())


def test_save_load_roundtrip(made, tmp_path):
    model, p1, _ = made
    p1.save(tmp_path / "p")
    man = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert man["schema_version"] == 2 and man["edits"][0]["module"] == "transformer.h.1.mlp.c_proj"
    e = man["edits"][0]
    assert e["rank"] == 1 and sorted(man["payload_sha256"]) == ["edits.0.A", "edits.0.B", "edits.0.fix.idx", "edits.0.fix.val"]
    for k in ("B", "A", "request", "method", "layer", "hparams", "seed", "delta_fro", "sha256_before",
              "sha256_after", "author", "reason", "created_at"):
        assert k in e
    assert man["library_versions"]["torch"]
    q = Patch.load(tmp_path / "p")
    assert torch.equal(q.edits[0].B, p1.edits[0].B) and torch.equal(q.edits[0].A, p1.edits[0].A)
    assert q.edits[0].B.shape == (32, 1) and q.edits[0].A.shape == (1, 128)  # gpt2 c_proj [out 32, in 128], k = 1
    assert q.edits[0].author == "ana" and q.edits[0].hparams == HP.to_dict()
    assert abs(q.edits[0].delta_fro - float(p1.edits[0].B.norm() * p1.edits[0].A.norm())) < 1e-4
    assert not [f for f in (tmp_path).iterdir() if f.name.startswith(".")]  # no temp leftovers


def test_apply_then_revert_is_identity(made):
    model, p1, p2 = made
    st = state(model)
    h = apply_patch(model, p1)
    assert not same(model, st)
    h.revert()
    assert same(model, st)
    apply_patch(model, p1)
    revert_patch(model, p1)
    assert same(model, st)


def test_foreign_base_is_refused_and_model_untouched(made, tok, corpus):
    model, p1, _ = made
    other = make_model("gpt2", seed=1)
    st = state(other)
    with pytest.raises(RankoneError, match="does not fit this model"):
        apply_patch(other, p1)
    assert same(other, st)


def test_non_finite_delta_is_refused(made):
    model, p1, _ = made
    bad = Patch([p1.edits[0].__class__(**{**p1.edits[0].__dict__, "B": p1.edits[0].B.clone()})])
    bad.edits[0].B[0, 0] = float("nan")
    st = state(model)
    with pytest.raises(RankoneError, match="non-finite"):
        apply_patch(model, bad)
    assert same(model, st)


def test_overflow_in_half_precision_is_refused(made):
    model, p1, _ = made
    e = p1.edits[0]
    half = make_model("gpt2").half()
    w = arch.weight_oi(arch.get_module(half, e.module))
    from rankone.core.fingerprint import tensor_sha256

    huge = Patch([e.__class__(**{**e.__dict__, "B": e.B * 1e6, "A": e.A * 1e6, "sha256_before": tensor_sha256(w)})])
    st = state(half)
    with pytest.raises(RankoneError, match="overflow"):
        apply_patch(half, huge)
    assert same(half, st)


def test_independent_patches_stack_and_revert(made):
    model, p1, p2 = made  # both made on the same base, same module
    st = state(model)
    h = apply_patch(model, [p1, p2])
    w = arch.weight_oi(arch.get_module(model, p1.edits[0].module)).double()
    base = st[p1.edits[0].module + ".weight"].T.double()
    assert torch.allclose(w - base, p1.edits[0].delta() + p2.edits[0].delta(), atol=1e-5)
    h.revert()
    assert same(model, st)


def test_second_patch_failure_rolls_back_the_first(made):
    model, p1, p2 = made
    st = state(model)
    foreign = Patch([p2.edits[0].__class__(**{**p2.edits[0].__dict__, "sha256_before": "0" * 64})])
    with pytest.raises(RankoneError):
        apply_patch(model, [p1, foreign])
    assert same(model, st)


def test_compose_keeps_order(made, tmp_path):
    model, p1, p2 = made
    c = compose([p1, p2])
    assert [e.request["subject"] for e in c.edits] == ["Danielle Darrieux", "Toko Yasuda"]


def test_corrupt_and_missing_patch_files(made, tmp_path):
    model, p1, _ = made
    with pytest.raises(RankoneError, match="is not a patch"):
        Patch.load(tmp_path / "nothing")
    p1.save(tmp_path / "p")
    (tmp_path / "p" / "patch.safetensors").write_bytes(b"garbage")
    with pytest.raises(RankoneError, match="corrupt"):
        Patch.load(tmp_path / "p")
    p1.save(tmp_path / "q")
    man = json.loads((tmp_path / "q" / "patch.json").read_text())
    man["schema_version"] = 99
    (tmp_path / "q" / "patch.json").write_text(json.dumps(man))
    with pytest.raises(RankoneError, match="schema version 99"):
        Patch.load(tmp_path / "q")


def test_multi_edit_patch_stacks_on_another_patch_of_the_same_base(tok, corpus):
    model = make_model("gpt2")
    ed = Editor(handle_of(model, tok), HP, corpus, progress=False)
    first = ed.edit([R1])
    both = ed.edit([R2, EditRequest.create("{} speaks", "Toko Yasuda", "French")])  # two edits, one module
    st = state(model)
    h = apply_patch(model, [first, both])
    name = first.edits[0].module
    got = arch.weight_oi(arch.get_module(model, name)).double() - st[name + ".weight"].T.double()
    want = sum(e.delta() for e in first.edits + both.edits)
    assert torch.allclose(got, want, atol=1e-5)
    h.revert()
    assert same(model, st)
    # a patch whose second edit does not continue its own chain is refused, model untouched
    broken = Patch([both.edits[0], both.edits[0]])
    with pytest.raises(RankoneError, match="does not fit"):
        apply_patch(model, [first, broken])
    assert same(model, st)
