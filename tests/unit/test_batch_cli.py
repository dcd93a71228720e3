"""The batch methods on the command line and in the sequential benchmark: `rankone edit --method
memit|alphaedit --requests`, editing on top of a registry's release, bad combinations (one line,
exit 2, nothing written) and `rankone bench sequential --method memit|alphaedit --batch-size`."""

import json

import pytest
import torch

from rankone.artifacts.patch import Patch, apply_patch
from rankone.core.tokens import EditRequest
from rankone.edit.editor import Editor
from rankone.eval.cases import Case, save_cases
from rankone.eval.sequential import SequentialConfig, SequentialRun, read_run
from rankone.lifecycle.registry import Registry
from rankone.methods.alphaedit import AlphaEditHParams
from rankone.models.load import load_model
from tiny import corpus_text, make_model, make_testbed_requests
from conftest import handle_of, interrupt_and_resume, run_cli  # noqa: E402

TINY = dict(layers=[0, 1, 2], v_steps=4, v_lr=0.05, stats_tokens=20_000, prefixes=["The Eiffel Tower. {}"])
ALPHA = dict(TINY, method="alphaedit", nullspace_threshold=1e-4, l2=1e-10)  # see test_batch_edit
FIRST = [EditRequest.create("{} was born in", "Danielle Darrieux", "Rome"),
         EditRequest.create("{} plays the", "Toko Yasuda", "violin")]
SECOND = [EditRequest.create("{} was born in", "Blaise Pascal", "London"),
          EditRequest.create("{} speaks", "Michel Rocard", "English")]



def jsonl(path, reqs):
    path.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in reqs))
    return path


def test_memit_on_the_command_line_flips_a_batch_of_testbed_facts(tmp_path, capsys):
    from rankone.testbed import World, builtin_model_dir
    from rankone.testbed.check import greedy_hits

    d = builtin_model_dir()
    world = World.load(d)
    reqs, pairs = make_testbed_requests(world, 5)
    # the toy model needs δ ≈ 2–4 ‖h‖: ROME's clamp 4, not MEMIT's 0.75 (see test_memit)
    code, out, err = run_cli(capsys, "edit", "--quiet", "--model", d, "--method", "memit", "--requests",
                             jsonl(tmp_path / "r.jsonl", reqs), "--hparams", '{"clamp_norm_factor": 4.0}',
                             "--out", tmp_path / "p")
    assert code == 0, err
    assert "memit: 5 request(s) as one batch" in out and out.count("the model now says") == 5
    assert out.count("target NOT reached") <= 1, out
    handle = load_model(d)
    assert not any(greedy_hits(handle.model, handle.tokenizer, pairs)[1])
    patch = Patch.load(tmp_path / "p")
    assert len(patch.edits) == 1 and patch.edits[0].rank == 5 and patch.edits[0].method == "memit"
    apply_patch(handle.model, patch)
    assert sum(greedy_hits(handle.model, handle.tokenizer, pairs)[1]) >= 4


def test_alphaedit_on_top_of_a_registrys_release_is_the_unbroken_run(model_dir, tmp_path, capsys):
    hp = json.dumps({k: v for k, v in ALPHA.items() if k != "method"})
    base = ["--quiet", "--model", model_dir, "--method", "alphaedit", "--hparams", hp]
    code, _, err = run_cli(capsys, "edit", *base, "--requests", jsonl(tmp_path / "a.jsonl", FIRST), "--out", tmp_path / "a")
    assert code == 0, err
    db = tmp_path / "reg.db"
    with Registry(db) as reg:
        rec, _ = reg.add(tmp_path / "a", "alice", "r")
        reg.record_validation(rec.id, {"results": [{"passed": True}], "suite": {"sha256": "x"}}, True, "alice")
        reg.release(rec.id)
    code, _, err = run_cli(capsys, "edit", *base, "--requests", jsonl(tmp_path / "b.jsonl", SECOND), "--registry", db,
                           "--out", tmp_path / "b")
    assert code == 0, err
    got = Patch.load(tmp_path / "b")
    # the same two batches in one session, one Editor
    handle = load_model(model_dir)
    ed = Editor(handle, ALPHA, progress=False)  # the same settings over the model card, as `rankone edit` does
    first = ed.edit(FIRST, keep=True)
    want = ed.edit(SECOND)
    assert [e.sha256_before for e in got.edits] == [e.sha256_after for e in first.edits]  # made on the release
    assert got.edits[0].diagnostics["n_preserved"] == 2
    for a, b in zip(got.edits, want.edits):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    with Registry(db) as reg:  # and it releases on top of the first (recorded as depending on it)
        rec2, _ = reg.add(tmp_path / "b", "alice", "r")
        reg.record_validation(rec2.id, {"results": [{"passed": True}], "suite": {"sha256": "x"}}, True, "alice")
        assert reg.release(rec2.id)[0].state == "released"
        assert reg.dependents(rec.id) == [rec2.id]


@pytest.mark.parametrize("extra, message", [
    (["--method", "r-rome", "--registry", "{tmp}/reg.db"], "--registry .* is for the batch methods, not r-rome"),
    (["--method", "alphaedit", "--registry", "{tmp}/none.db"], "no registry at"),
    (["--method", "memit", "--hparams", '{"l2": 1.0}'], r"unknown hyper-parameter\(s\) \['l2'\]"),
    (["--method", "memit", "--hparams", '{"window": 0}'], "window must be at least 1"),
    (["--method", "alphaedit", "--hparams", '{"layers": [2, 1]}'], "must be a non-empty increasing list"),
    (["--hparams", '{"method": "memit", "nullspace_threshold": 0.1}'], r"unknown hyper-parameter\(s\) \['nullspace_threshold'\]"),
    (["--method", "memit", "--hparams", '{"layers": [0, 7]}'], "layer 7"),
])
def test_bad_batch_options_are_one_line_exit_2_and_write_nothing(extra, message, model_dir, tmp_path, capsys):
    import re

    extra = [x.replace("{tmp}", str(tmp_path)) for x in extra]
    code, out, err = run_cli(capsys, "edit", "--quiet", "--model", model_dir, "--requests",
                             jsonl(tmp_path / "r.jsonl", FIRST), *extra, "--out", tmp_path / "p")
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "p").exists()


# ---- the sequential benchmark in batches -----------------------------------------------------


SUBJECTS = ["Danielle Darrieux", "Toko Yasuda", "Blaise Pascal", "Michel Rocard", "Jean Gabin", "Edith Piaf",
            "Alba Rossi", "Edwin Smith"]
CITIES = ["Rome", "Paris", "London", "Vienna", "Madrid", "Berlin", "Prague", "Lisbon"]


def make_cases():
    return [Case.of(f"c{i}", EditRequest.create("{} was born in", s, CITIES[i]), CITIES[(i + 3) % 8],
                    [f"The birthplace of {s} is"], [f"{SUBJECTS[(i + 1) % 8]} was born in"], [CITIES[(i + 4) % 8]],
                    [f"{s} was born in"]) for i, s in enumerate(SUBJECTS)]


def test_bench_sequential_in_batches(model_dir, tmp_path, capsys):
    cases = tmp_path / "cases.jsonl"
    save_cases(cases, make_cases())
    hp = json.dumps(TINY)
    args = ["bench", "sequential", "--model", model_dir, "--cases", cases, "--n", "4", "--every", "2", "--batch-size", "2",
            "--method", "memit", "--hparams", hp, "--gen-prompts", "1", "--gen-tokens", "4", "--probe-sample", "2",
            "--quiet", "--out", tmp_path / "s"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    settings, recs = read_run(tmp_path / "s" / "memit")
    assert settings["layers"] == [0, 1, 2] and settings["config"]["batch_size"] == 2
    edits = [r for r in recs if r["type"] == "edit"]
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["batch"] for r in edits] == [0, 0, 2, 2] and [r["n"] for r in evals] == [0, 2, 4]
    assert all(r["accepted"] and r["delta_fro"] > 0 and r["denominator"] is None for r in edits)
    assert sorted(evals[-1]["w_dist_layers"]) == ["0", "1", "2"] and evals[-1]["w_dist"] > evals[1]["w_dist"] > 0
    assert "memit (layers 0–2, batches of 2)" in out
    assert (tmp_path / "s" / "delta_norms.png").is_file() and not (tmp_path / "s" / "denominators.png").exists()
    code, _, err = run_cli(capsys, *args[:-1], tmp_path / "bad", "--batch-size", "3")  # the last value counts
    assert code == 2 and "--every 2 must be a multiple of --batch-size 3" in err and not (tmp_path / "bad").exists()
    code, _, err = run_cli(capsys, "bench", "sequential", "--model", model_dir, "--cases", cases, "--n", "2",
                           "--batch-size", "2", "--every", "2", "--out", tmp_path / "bad")
    assert code == 2 and "--batch-size is for the batch methods" in err and not (tmp_path / "bad").exists()


def new_run(tok, corpus, out):
    model = make_model("gpt2")
    cfg = SequentialConfig(n=6, every=2, batch_size=2, retention_sample=6, ns_sample=2, probe_sample=0, gen_prompts=0)
    hp = AlphaEditHParams(**{k: v for k, v in ALPHA.items() if k != "method"})
    return model, SequentialRun(handle_of(model, tok), make_cases(), hp, out, cfg, ppl_text=corpus_text()[:400],
                                stats_corpus=corpus, progress=False)


def test_interrupted_alphaedit_run_resumes_to_the_same_result(tok, corpus, tmp_path, monkeypatch):
    model, run = new_run(tok, corpus, tmp_path / "ref")
    w0 = {p: run._weight(p).clone() for p in run.paths}
    want = run.run()
    assert all(torch.equal(run._weight(p), w) for p, w in w0.items())  # every window layer given back
    model, run = new_run(tok, corpus, tmp_path / "cut")
    # stopped after the checkpoint at 4: the third batch must be solved with the first two's keys
    got = interrupt_and_resume(monkeypatch, run, lambda: new_run(tok, corpus, tmp_path / "cut")[1], at=4)
    strip = lambda rs: [(r["type"], r.get("i", r.get("n")), r.get("batch"), r.get("es")) for r in rs]  # noqa: E731
    assert strip(got) == strip(want)
    assert [r["delta_fro"] for r in got if r["type"] == "edit"] == pytest.approx(
        [r["delta_fro"] for r in want if r["type"] == "edit"], rel=1e-9)
    last = Patch.load(tmp_path / "cut" / "checkpoint" / "patch").edits[-1]
    assert last.diagnostics["n_preserved"] == 4  # the resumed batch preserved both earlier batches' keys
