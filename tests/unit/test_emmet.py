"""EMMET: its equality constraints, its reduction to r-ROME for one fact, and a batch through the
Editor and the command line like every other method of the table."""

import json

import pytest
import torch

from rankone.artifacts.patch import Patch, apply_patch
from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.tokens import EditRequest
from rankone.edit.editor import Editor
from rankone.methods.emmet import EmmetHParams, emmet_update
from rankone.methods.rome import VARIANTS, compute_key, compute_value, rank_one_update
from rankone.methods.stats import LayerStats
from conftest import handle_of, run_cli
from tiny import BOS_ARCHS, make_model

F64 = dict(dtype=torch.float64)
REQS = [EditRequest.create("{} was born in", "Danielle Darrieux", "Rome"),
        EditRequest.create("{} plays the", "Toko Yasuda", "violin"),
        EditRequest.create("The capital of {} is", "France", "Berlin")]
TINY = dict(v_steps=4, v_lr=0.05, stats_tokens=20_000, prefixes=["The Eiffel Tower. {}"])


def _problem(d_in=40, d_out=16, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d_in, d_in, generator=g, **F64)
    C = x.T @ x / (4 * d_in) + 1e-3 * torch.eye(d_in, **F64)
    return C, torch.randn(d_in, n, generator=g, **F64), torch.randn(d_out, n, generator=g, **F64)


@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_equality_constraints_hold(n):
    C, K, R = _problem(n=n)
    B, A, diag = emmet_update(K, R, LayerStats(C, 1000), lam=0.0)
    assert B.shape == (16, n) and A.shape == (n, 40)
    err = (B @ A @ K - R).norm() / R.norm()  # ΔW K = V − W K for every fact of the batch
    assert err < 1e-5, err
    # and it is the least-C-norm update that does: ΔW = R (KᵀC⁻¹K)⁻¹ KᵀC⁻¹, literally
    Ci = torch.linalg.inv(C)
    ref = R @ torch.linalg.inv(K.T @ Ci @ K) @ K.T @ Ci
    assert (B @ A - ref).norm() / ref.norm() < 1e-8
    # any other update meeting the constraints costs more in the C-norm tr(ΔW C ΔWᵀ)
    other = B @ A + torch.randn(16, 40, generator=torch.Generator().manual_seed(1), **F64) @ (
        torch.eye(40, **F64) - K @ torch.linalg.pinv(K))
    assert torch.allclose(other @ K, R, atol=1e-6)
    assert torch.trace(other @ C @ other.T) > torch.trace(B @ A @ C @ (B @ A).T)


def test_lambda_relaxes_a_batch_and_is_not_used_for_one_fact():
    C, K, R = _problem(n=4)
    st = LayerStats(C, 1000)
    exact = torch.mm(*emmet_update(K, R, st, 0.0)[:2])
    relaxed = torch.mm(*emmet_update(K, R, st, 10.0)[:2])
    D = K.T @ torch.linalg.solve(C, K)
    assert torch.allclose(relaxed @ K, R @ D @ torch.linalg.inv(D + 10.0 * torch.eye(4, **F64)), atol=1e-8)
    assert not torch.allclose(relaxed, exact, atol=1e-6)
    one = [torch.mm(*emmet_update(K[:, :1], R[:, :1], st, lam)[:2]) for lam in (0.0, 10.0)]
    assert torch.equal(one[0], one[1])  # the authors add λ only when there are several facts


def test_a_repeated_key_is_one_clear_error():
    C, K, R = _problem(n=2)
    K = torch.cat([K[:, :1], K[:, :1]], 1)
    with pytest.raises(RankoneError, match="singular .* emmet_lambda"):
        emmet_update(K, R, LayerStats(C, 1000), 0.0)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_one_fact_is_r_rome(model_type, tok, tok_bos, corpus):
    """Given r-ROME's key k̄ and value v̄* = W k̄ + δ, EMMET's update of that one fact is r-ROME's."""
    t = tok_bos if model_type in BOS_ARCHS else tok
    h = handle_of(make_model(model_type), t)
    ed = Editor(h, {"method": "r-rome", "layer": 1, "v_steps": 5, "prefix_spec": [[3, 5]], "stats_tokens": 20_000},
                corpus, progress=False)
    key = compute_key(h, REQS[0], 1, ed.templates)
    value = compute_value(h, REQS[0], 1, ed.templates, ed.settings)
    W = arch.weight_oi(h.proj(1))
    rr = rank_one_update(W, key, value, ed.stats(1), VARIANTS["r-rome"])
    r_rome = torch.outer(rr.residual, rr.key_dir)
    B, A, _ = emmet_update(key.k_mean[:, None], rr.residual[:, None], ed.stats(1), lam=0.1)
    assert (B @ A - r_rome).norm() / r_rome.norm() < 1e-6


def test_a_batch_through_the_editor_meets_its_constraints_and_reverts(tok, corpus):
    model = make_model("gpt2")
    st = {k: v.clone() for k, v in model.state_dict().items()}
    ed = Editor(handle_of(model, tok), EmmetHParams(layer=2, emmet_lambda=0.0, **TINY), corpus, progress=False)
    assert ed.layers == [2]  # one layer by default, as the authors edit
    patch = ed.edit(REQS)
    assert all(torch.equal(v, st[k]) for k, v in model.state_dict().items())
    (e,) = patch.edits
    assert e.method == "emmet" and e.rank == 3 and e.hparams["layers"] == [2] and e.hparams["mom2_update_weight"] is None
    # the written ΔW meets every fact's constraint at the keys it was solved with (float32 factors)
    assert e.diagnostics["constraint_error"] < 1e-9
    dW = e.B.double() @ e.A.double()
    assert (dW @ e.keys - e.B.double()).norm() / e.B.double().norm() < 1e-5
    h = apply_patch(model, patch)
    h.revert()
    assert all(torch.equal(v, st[k]) for k, v in model.state_dict().items())


def test_emmet_on_the_command_line(model_dir, tmp_path, capsys):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in REQS))
    code, out, err = run_cli(capsys, "edit", "--quiet", "--model", model_dir, "--method", "emmet", "--requests", reqs,
                             "--hparams", json.dumps(TINY), "--out", tmp_path / "p")
    assert code == 0, err
    assert "emmet: 3 request(s) as one batch" in out
    p = Patch.load(tmp_path / "p")
    assert [e.method for e in p.edits] == ["emmet"] and p.edits[0].rank == 3
    code, _, err = run_cli(capsys, "edit", "--quiet", "--model", model_dir, "--method", "emmet", "--requests", reqs,
                           "--hparams", '{"emmet_lambda": -1}', "--out", tmp_path / "q")
    assert code == 2 and "emmet_lambda must be a finite number ≥ 0" in err and not (tmp_path / "q").exists()
