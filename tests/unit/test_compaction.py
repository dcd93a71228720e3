"""Compaction: a chain of patches re-solved from the base as one edit per module meets every
replaced edit's constraint; each solve is the one it names; a fact edited again supersedes its
first key; a sequential run can compact as it goes and still resumes."""

from __future__ import annotations

import json

import pytest
import torch

from rankone.artifacts.patch import apply_patch, revert_patch
from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.tokens import EditRequest
from rankone.edit.compaction import CompactSettings, compact, recover_keys
from rankone.edit.editor import Editor
from rankone.methods.alphaedit import cached_null_basis
from rankone.methods.rome import compute_key
from conftest import handle_of, interrupt_and_resume
from tiny import make_model

REQS = [EditRequest.create("{} was born in", "Danielle Darrieux", "Rome"),
        EditRequest.create("{} plays the", "Toko Yasuda", "violin"),
        EditRequest.create("The capital of {} is", "France", "Berlin"),
        EditRequest.create("{} is a citizen of", "Ira Hayes", "Norway"),
        EditRequest.create("{} speaks", "Pierre Curie", "Dutch")]
TINY = dict(v_steps=4, v_lr=0.05, stats_tokens=20_000, prefixes=["The Eiffel Tower. {}"])


def weights(model, modules):
    return {m: arch.weight_oi(arch.get_module(model, m)).detach().double().clone() for m in modules}


@pytest.fixture(scope="module")
def chain(tok, corpus):
    """Three patches made one on top of the other on a tiny GPT-2: two r-ROME edits (rank one, no
    keys stored), an EMMET batch of two at the same layer, a MEMIT batch over layers 0–1; the
    weights after each patch; then everything reverted (the model is the base again)."""
    model = make_model("gpt2")
    h = handle_of(model, tok)
    mods = [h.proj_path(0), h.proj_path(1)]
    snaps = [weights(model, mods)]
    patches = []
    for settings, reqs in (({"method": "r-rome", "layer": 1}, REQS[:1]), ({"method": "r-rome", "layer": 1}, REQS[1:2]),
                           ({"method": "emmet", "layer": 1}, REQS[2:4]), ({"method": "memit", "layers": [0, 1]}, REQS[3:])):
        patches.append(Editor(h, {**TINY, **settings}, corpus, progress=False).edit(reqs, keep=True))
        snaps.append(weights(model, mods))
    for p in reversed(patches):
        revert_patch(model, p)
    assert all(torch.equal(snaps[0][m], w) for m, w in weights(model, mods).items())
    return h, patches, snaps


def _written(patches, snaps, module, K):
    """Edit i's constraint, from the weights themselves: (W after its patch − W₀) k_i, per key column."""
    cols, j = [], 0
    for n, p in enumerate(patches):
        for e in p.edits:
            if e.module == module:
                k = K[:, j:j + (e.keys.shape[1] if e.keys is not None else e.rank)]
                cols.append((snaps[n + 1][module] - snaps[0][module]) @ k)
                j += k.shape[1]
    return torch.cat(cols, dim=1)


@pytest.mark.parametrize("targets", ["written", "released"])
def test_the_compacted_patch_meets_every_replaced_edits_constraint(chain, corpus, targets):
    h, patches, snaps = chain
    done = compact(h, patches, CompactSettings("emmet", targets, {"emmet_lambda": 0.0}), stats_corpus=corpus,
                   progress=False)
    by = {e.module: e for e in done.patch.edits}
    assert sorted(by) == [h.proj_path(0), h.proj_path(1)]  # one edit per module
    e1 = by[h.proj_path(1)]
    # layer 1 holds 2 r-ROME keys (recovered from A and C), 2 EMMET keys and 2 MEMIT keys: rank 6
    assert e1.rank == 6 and e1.keys.shape == (e1.A.shape[1], 6) and e1.diagnostics["compaction"]["keys_recovered"] == 2
    assert [f["subject"] for f in e1.requests] == ["Danielle Darrieux", "Toko Yasuda", "France", "Ira Hayes",
                                                    "Ira Hayes", "Pierre Curie"]
    # a rank-one edit's key comes back exactly: r-ROME wrote at k̄, the mean over the templates
    kbar = compute_key(h, REQS[0], 1, ["{}", *TINY["prefixes"]]).k_mean
    assert torch.allclose(e1.keys[:, 0], kbar, rtol=1e-4, atol=1e-6)
    for m, e in by.items():
        K, dW = e.keys, e.B.double() @ e.A.double()
        T = _written(patches, snaps, m, K) if targets == "written" else (snaps[-1][m] - snaps[0][m]) @ K
        assert float((dW @ K - T).norm() / T.norm()) < 1e-5  # the stored float32 factors meet them
        d = e.diagnostics["compaction"]
        assert d["constraint_error"] < 1e-9 and d["constraint_error_stored"] < 1e-5
        assert e.diagnostics["stats"]["n_tokens"] > 0 and e.diagnostics["stats"]["corpus"] == str(corpus)
        assert e.hparams["stats_tokens"] == TINY["stats_tokens"]  # the budget the edits recorded
    # the factors merge onto the base exactly like any patch, and revert to the same bits
    before = weights(h.model, list(by))
    applied = apply_patch(h.model, done.patch)
    applied.revert()
    assert all(torch.equal(before[m], w) for m, w in weights(h.model, list(by)).items())
    # "released": the compacted model outputs what the whole chain outputs at every key
    if targets == "released":
        for m, e in by.items():
            assert torch.allclose((snaps[0][m] + e.B.double() @ e.A.double()) @ e.keys, snaps[-1][m] @ e.keys,
                                  rtol=1e-4, atol=1e-4)


def test_each_solve_is_the_one_it_names(chain, corpus):
    h, patches, _ = chain
    m = h.proj_path(1)
    out = {}
    for name, hp in (("emmet", {"emmet_lambda": 0.0}), ("memit", {"mom2_update_weight": 50.0}),
                     ("alphaedit", {"l2": 0.5, "nullspace_energy": 0.3})):
        done = compact(h, patches, CompactSettings(name, "written", hp), stats_corpus=corpus, progress=False)
        e = next(x for x in done.patch.edits if x.module == m)
        out[name] = e
        assert e.method == f"compact/{name}" and e.diagnostics["compaction"]["method"] == name
    K, T = out["emmet"].keys, out["emmet"].B.double()  # B = T for every solve
    ed = Editor(h, {**TINY, "method": "memit", "layer": 1}, corpus, progress=False)
    st = ed.stats(1)
    D = K.T @ st.solve(K)
    dW = out["memit"].B.double() @ out["memit"].A.double()
    # MEMIT's form writes T D (λI + D)⁻¹ at the keys
    assert torch.allclose(dW @ K, T @ D @ torch.linalg.inv(50.0 * torch.eye(6, dtype=torch.float64) + D), rtol=1e-4, atol=1e-5)
    # AlphaEdit's stays in C's null space: nothing reaches the directions it preserves
    U = cached_null_basis(st, 2e-2, None, 0.3)
    dWa = out["alphaedit"].B.double() @ out["alphaedit"].A.double()
    rest = torch.eye(U.shape[0], dtype=torch.float64) - U @ U.T
    assert float((dWa @ rest).norm()) < 1e-5 * float(dWa.norm())
    assert out["alphaedit"].diagnostics["compaction"]["null_dim"] == U.shape[1]


def test_recovered_keys_invert_any_rank_k():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 20, generator=g, dtype=torch.float64)
    from rankone.methods.stats import LayerStats

    st = LayerStats(x.T @ x / 80, 80)
    A = torch.randn(3, 20, generator=g, dtype=torch.float64)
    assert torch.allclose(A @ recover_keys(A, st), torch.eye(3, dtype=torch.float64), atol=1e-10)


def test_a_fact_edited_again_supersedes_its_first_key(tok, corpus):
    model = make_model("gpt2")
    h = handle_of(model, tok)
    again = EditRequest.create("{} was born in", "Danielle Darrieux", "Paris")
    ed = Editor(h, {**TINY, "method": "r-rome", "layer": 1}, corpus, progress=False)
    mod = h.proj_path(1)
    p1, p2 = ed.edit([REQS[0]], keep=True), ed.edit([REQS[1]], keep=True)
    w2 = weights(model, [mod])[mod]
    p3 = ed.edit([again], keep=True)
    for p in (p3, p2, p1):
        revert_patch(model, p)
    w0 = weights(model, [mod])[mod]
    done = compact(h, [p1, p2, p3], CompactSettings(hparams={"emmet_lambda": 0.0}), stats_corpus=corpus, progress=False)
    e = done.patch.edits[0]
    d = e.diagnostics["compaction"]
    assert (d["n_keys"], d["n_kept"], d["superseded"]) == (3, 2, ["Danielle Darrieux was born in -> Rome"])
    assert [f["target"] for f in e.requests] == ["violin", "Paris"]
    # Toko Yasuda's key keeps what it had when it was written, Rome's key is Paris's now
    k = e.keys[:, :1]
    assert torch.allclose((e.B.double() @ e.A.double()) @ k, (w2 - w0) @ k, rtol=1e-4, atol=1e-5)


def test_compaction_refuses_a_model_that_is_not_the_base_and_bad_settings(chain, corpus):
    h, patches, _ = chain
    applied = apply_patch(h.model, patches[0])
    try:
        with pytest.raises(RankoneError, match="does not hold the base weights"):
            compact(h, patches, stats_corpus=corpus, progress=False)
    finally:
        applied.revert()
    with pytest.raises(RankoneError, match="one of emmet, memit, alphaedit"):
        CompactSettings("rome")
    with pytest.raises(RankoneError, match="written or released"):
        CompactSettings(targets="all")
    with pytest.raises(RankoneError, match="unknown hyper-parameter"):
        compact(h, patches, CompactSettings(hparams={"emmet_lamda": 0}), stats_corpus=corpus, progress=False)
    with pytest.raises(RankoneError, match="nothing to compact"):
        compact(h, [], stats_corpus=corpus, progress=False)


# ---- inside a sequential run ----------------------------------------------------------------


def compacting_run(tok, corpus, out):
    from rankone.eval.sequential import SequentialConfig, SequentialRun
    from test_sequential import make_cases
    from tiny import corpus_text

    model = make_model("gpt2")
    cfg = SequentialConfig(n=6, every=2, batch_size=2, retention_sample=10, ns_sample=4, probe_sample=0, gen_prompts=0,
                           compact_every=4, compact_method="emmet", compact_hparams={"emmet_lambda": 0.0})
    settings = {"method": "alphaedit", "layers": [0, 1], "l2": 0.5, **TINY}
    return model, SequentialRun(handle_of(model, tok), make_cases(), settings, out, cfg, [],
                                ppl_text=corpus_text()[:600], stats_corpus=corpus, progress=False, checkpoint_s=None)


def test_a_sequential_run_compacts_as_it_goes_and_resumes_the_same(tok, corpus, tmp_path, monkeypatch):
    from rankone.artifacts.patch import Patch

    model, run = compacting_run(tok, corpus, tmp_path / "whole")
    recs = run.run()
    comp = [r for r in recs if r["type"] == "compact"]
    assert len(comp) == 1 and comp[0]["n"] == 4 and comp[0]["constraint_error"] < 1e-5
    assert (comp[0]["rank_before"], comp[0]["rank_after"], comp[0]["keys"]) == (4, 4, 8)  # 2 modules × 4 keys
    evals = {r["n"]: r for r in recs if r["type"] == "eval"}
    assert evals[4]["served_rank"] == 4 and evals[6]["served_rank"] == 6
    # the checkpoint holds the compaction (one edit per module) and the batch after it
    p = Patch.load(tmp_path / "whole" / "checkpoint" / "patch")
    assert [e.method for e in p.edits] == ["compact/emmet"] * 2 + ["alphaedit"] * 2
    # the batch after the compaction preserved its keys (AlphaEdit's store was rebuilt from it)
    assert p.edits[-1].diagnostics["n_preserved"] == 4
    # interrupted after the compaction's checkpoint, the run resumes to the same records
    model, cut = compacting_run(tok, corpus, tmp_path / "cut")
    got = interrupt_and_resume(monkeypatch, cut, lambda: compacting_run(tok, corpus, tmp_path / "cut")[1], at=4)
    key = lambda rs: [(r["type"], r.get("i", r.get("n")), r.get("delta_fro"), r.get("w_dist")) for r in rs]  # noqa: E731
    assert [k[:2] for k in key(got)] == [k[:2] for k in key(recs)]
    assert [k[2:] for k in key(got)] == pytest.approx([k[2:] for k in key(recs)], rel=1e-6)


def test_bench_sequential_compacts_from_the_command_line(capsys, model_dir, tmp_path):
    from rankone.eval.cases import save_cases
    from conftest import run_cli
    from test_sequential import make_cases

    cases = tmp_path / "cases.jsonl"
    save_cases(cases, make_cases())
    args = ["bench", "sequential", "--model", model_dir, "--cases", cases, "--n", "4", "--every", "2", "--method", "memit",
            "--batch-size", "2", "--hparams", '{"v_steps": 3, "stats_tokens": 20000, "layers": [1]}', "--gen-prompts",
            "0", "--probe-sample", "0", "--quiet", "--out", tmp_path / "s"]
    code, _, err = run_cli(capsys, *args, "--compact-every", "3")
    assert code == 2 and "--compact-every 3 must be a multiple of --batch-size 2" in err
    code, _, err = run_cli(capsys, *args, "--compact-every", "2", "--compact-hparams", '{"l2": 1}')
    assert code == 2 and "unknown hyper-parameter" in err and not (tmp_path / "s").exists()
    code, out, err = run_cli(capsys, *args, "--compact-every", "2", "--compact-method", "alphaedit",
                             "--compact-hparams", '{"l2": 1}')
    assert code == 0, err
    recs = [json.loads(x) for x in (tmp_path / "s" / "memit" / "run.jsonl").read_text().splitlines()]
    assert [r["n"] for r in recs if r["type"] == "compact"] == [2, 4]
    assert json.loads((tmp_path / "s" / "memit" / "run.json").read_text())["config"]["compact_method"] == "alphaedit"
