"""The guard, the sequential loop (JSONL, checkpoints, resume, restore), plots and the two commands."""

import json
import logging
import math

import pytest
import torch

from rankone.core import architectures as arch
from rankone.eval.cases import Case, save_cases
from rankone.cli.main import main
from rankone.edit.editor import Editor
from rankone.core.errors import RankoneError
from rankone.methods.rome import EditHParams
from rankone.eval.plots import report, summarize_run
from rankone.edit.guard import Guard
from rankone.eval.metrics import continuations
from rankone.eval.metrics import generation_scores
from rankone.eval.sequential import SequentialConfig, SequentialRun, read_run, spaced
from rankone.core.tokens import EditRequest
from tiny import corpus_text, make_model
from conftest import handle_of, run_cli  # noqa: E402

FAST = dict(v_steps=6, prefix_spec=[[3, 5]], layer=1, stats_tokens=20_000)
SUBJECTS = ["Danielle Darrieux", "Toko Yasuda", "Blaise Pascal", "Michel Rocard", "Jean Gabin", "Edith Piaf",
            "Alba Rossi", "Edwin Smith"]
CITIES = ["Rome", "Paris", "London", "Vienna", "Madrid", "Berlin", "Prague", "Lisbon"]


def make_cases():
    out = []
    for i, s in enumerate(SUBJECTS):
        other = SUBJECTS[(i + 1) % len(SUBJECTS)]
        out.append(Case.of(f"c{i}", EditRequest.create("{} was born in", s, CITIES[i]), CITIES[(i + 3) % 8],
                        [f"The birthplace of {s} is"], [f"{other} was born in"], [CITIES[(i + 4) % 8]],
                        [f"{s} was born in", f"{s} is"]))
    return out


def weight(model):
    return arch.weight_oi(arch.get_module(model, handle_of(model, None).proj_path(1))).detach().clone()


# ---- the guard ------------------------------------------------------------------------------


def test_guard_rules():
    g = Guard(norm_factor=10, denom_factor=10, warmup=3)
    assert g.check(5.0, -1.0).startswith("denominator") and "≤ 0" in g.check(5.0, -1.0)
    assert "non-finite" in g.check(float("inf"), 1.0)
    assert g.check(1e6, 1.0) is None  # no history yet: only the absolute rules apply
    for x in (1.0, 2.0, 3.0):
        g.accept(x, 100.0)
    assert g.check(19.9, 100.0) is None
    why = g.check(20.1, 100.0)
    assert "10.1× the running median 2" in why
    why = g.check(2.0, 9.0)
    assert "11.1× below the running median 100" in why
    assert g.check(2.0, 1e9) is None  # a large denominator only makes the update small
    with pytest.raises(RankoneError, match="factors must be > 1"):
        Guard(norm_factor=1.0)


def test_guard_refuses_instead_of_writing_and_logs_why(tok, corpus, caplog):
    model = make_model("gpt2")
    ed = Editor(handle_of(model, tok), EditHParams(**FAST), corpus, progress=False)
    w0 = weight(model)
    strict = Guard(warmup=2)
    for _ in range(2):
        strict.accept(1e-9, 1.0)  # history of tiny updates: any real update is a spike
    with caplog.at_level(logging.WARNING):
        patch = ed.edit([make_cases()[0].request], keep=True, guard=strict)
    assert patch.edits == [] and torch.equal(weight(model), w0)  # nothing written
    assert len(ed.rejected) == 1 and "running median" in ed.rejected[0].reason
    assert strict.refused and "guard refused Danielle Darrieux was born in -> Rome" in caplog.text
    lenient = Guard(warmup=2)
    for _ in range(2):
        lenient.accept(1e9, 1e-9)
    patch = ed.edit([make_cases()[0].request], keep=True, guard=lenient)
    assert len(patch.edits) == 1 and not torch.equal(weight(model), w0)
    assert lenient.norms[-1] == pytest.approx(patch.edits[0].delta_fro, rel=1e-6)


# ---- the loop -------------------------------------------------------------------------------


def new_run(tok, corpus, out, n=4, method="r-rome", checkpoint_s=None, **cfg):
    model = make_model("gpt2")
    c = SequentialConfig(**{"n": n, "every": 2, "retention_sample": 10, "ns_sample": 4, "probe_sample": 4,
                            "gen_prompts": 2, "gen_tokens": 6, **cfg})
    cases = make_cases()
    probes = [(x.prompt, x.target_true) for x in cases[n:]]
    run = SequentialRun(handle_of(model, tok), cases, EditHParams(method=method, **FAST), out, c, probes,
                        ppl_text=corpus_text()[:600], stats_corpus=corpus, progress=False, checkpoint_s=checkpoint_s)
    return model, run


@pytest.fixture(scope="module")
def ref(tok, corpus, tmp_path_factory):
    """One complete run (r-ROME, 4 edits, evaluated every 2), shared by the tests below."""
    out = tmp_path_factory.mktemp("ref") / "r"
    model, run = new_run(tok, corpus, out, guard=False)
    w0 = weight(model)
    recs = run.run()
    return out, recs, torch.equal(weight(model), w0)


def test_run_writes_jsonl_checkpoint_and_restores_the_model(ref):
    out, recs, restored = ref
    assert restored  # the base weights are given back after the run
    settings, again = read_run(out)
    assert again == json.loads(json.dumps(recs)) and settings["method"] == "r-rome" and settings["layer"] == 1
    edits = [r for r in recs if r["type"] == "edit"]
    evals = [r for r in recs if r["type"] == "eval"]
    assert [r["i"] for r in edits] == [0, 1, 2, 3] and [r["n"] for r in evals] == [0, 2, 4]
    assert all(r["accepted"] and r["delta_fro"] > 0 and r["denominator"] > 0 for r in edits)
    # ‖W − W₀‖ after the first edit is that edit's ‖Δ‖ (both in float64 from the same u, v up to fp32 rounding)
    assert edits[0]["w_dist"] == pytest.approx(edits[0]["delta_fro"], rel=1e-3)
    assert evals[0]["w_dist"] == 0.0 and evals[-1]["w_dist"] == pytest.approx(edits[-1]["w_dist"])
    assert evals[0].get("retention_es") is None and evals[-1]["retention_es"] is not None
    # only facts the unedited model knows are kept as probes: this random model knows none of them
    assert json.loads((out / "probes.json").read_text()) == [] and all("probe_top1" not in r for r in evals)
    for k in ("ns", "fluency", "perplexity"):
        assert all(math.isfinite(r[k]) for r in evals), k
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state == {**state, "next": 4, "lines": len(recs)}
    from rankone.artifacts.patch import Patch

    assert len(Patch.load(out / "checkpoint" / "patch").edits) == 4


def test_interrupted_run_resumes_to_the_same_result(ref, tok, corpus, tmp_path, monkeypatch):
    want = ref[1]
    model, run = new_run(tok, corpus, tmp_path / "cut", guard=False)
    real = SequentialRun._step

    def crash(self, i, j):
        if i == 3:  # after the checkpoint at 2 and the edit line of 2: that line must be dropped
            raise KeyboardInterrupt
        return real(self, i, j)

    monkeypatch.setattr(SequentialRun, "_step", crash)
    w0 = weight(model)
    with pytest.raises(KeyboardInterrupt):
        run.run()
    assert torch.equal(weight(model), w0)
    assert sum(1 for r in read_run(tmp_path / "cut")[1] if r["type"] == "edit") == 3
    monkeypatch.setattr(SequentialRun, "_step", real)
    _, again = new_run(tok, corpus, tmp_path / "cut", guard=False)
    got = again.run()
    strip = lambda rs: [(r["type"], r.get("i", r.get("n")), r.get("delta_fro"), r.get("retention_es")) for r in rs]  # noqa: E731
    assert strip(got) == strip(want)
    assert [r["delta_fro"] for r in got if r["type"] == "edit"] == pytest.approx(
        [r["delta_fro"] for r in want if r["type"] == "edit"], rel=1e-9)


def test_timed_checkpoints_between_evaluations_lose_less_and_resume_the_same(tok, corpus, tmp_path, monkeypatch):
    """Evaluated only at 0 and 4: without timed checkpoints a crash at edit 3 goes back to 0; with
    them (every 0 s: after each edit) it goes back to 3, and the resumed run, made without them,
    gives what an unbroken run gives: the interval is not a setting of the run."""
    _, whole = new_run(tok, corpus, tmp_path / "whole", every=4)
    want = whole.run()
    real = SequentialRun._step

    def crash(self, i, j):
        if i == 3:
            raise KeyboardInterrupt
        return real(self, i, j)

    monkeypatch.setattr(SequentialRun, "_step", crash)
    for name, every_s, back_to in (("plain", None, 0), ("timed", 0.0, 3)):
        _, run = new_run(tok, corpus, tmp_path / name, every=4, checkpoint_s=every_s)
        with pytest.raises(KeyboardInterrupt):
            run.run()
        state = json.loads((tmp_path / name / "checkpoint" / "state.json").read_text())
        assert state["next"] == back_to, name
    monkeypatch.setattr(SequentialRun, "_step", real)
    assert read_run(tmp_path / "timed")[0] == read_run(tmp_path / "whole")[0]  # the same run.json
    _, again = new_run(tok, corpus, tmp_path / "timed", every=4)
    got = again.run()
    strip = lambda rs: [(r["type"], r.get("i", r.get("n")), r.get("retention_es"), r.get("ns")) for r in rs]  # noqa: E731
    assert strip(got) == strip(want)
    assert [r["delta_fro"] for r in got if r["type"] == "edit"] == pytest.approx(
        [r["delta_fro"] for r in want if r["type"] == "edit"], rel=1e-9)


def test_other_settings_in_the_folder_are_refused(ref, tok, corpus, tmp_path):
    before = (ref[0] / "run.jsonl").read_text()
    _, other = new_run(tok, corpus, ref[0], method="rome", guard=False)
    with pytest.raises(RankoneError, match=r"holds a run with other settings \(hparams, method\).*--force"):
        other.run()
    assert (ref[0] / "run.jsonl").read_text() == before
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    _, stray = new_run(tok, corpus, tmp_path / "x", n=2)
    with pytest.raises(RankoneError, match="not empty and holds no sequential run"):
        stray.run()
    with pytest.raises(RankoneError, match="only 8 usable case"):
        new_run(tok, corpus, tmp_path / "y", n=9)


def test_a_run_from_before_a_setting_existed_still_resumes(ref, tok, corpus, tmp_path):
    """run.json written by an older version lacks a field added since (here: the seed); it had the
    default, so the run resumes; a stored value that differs from today's is still refused."""
    import shutil

    shutil.copytree(ref[0], tmp_path / "r")
    settings = json.loads((tmp_path / "r" / "run.json").read_text())
    assert settings["hparams"]["seed"] == EditHParams().seed
    del settings["hparams"]["seed"]
    (tmp_path / "r" / "run.json").write_text(json.dumps(settings))
    _, run = new_run(tok, corpus, tmp_path / "r", guard=False)
    assert run.preflight() == "resume"
    settings["hparams"]["seed"] = 7
    (tmp_path / "r" / "run.json").write_text(json.dumps(settings))
    with pytest.raises(RankoneError, match=r"other settings \(hparams\)"):
        run.preflight()


def test_another_statistics_corpus_is_refused_and_the_sampled_size_counts_only_without_one(ref, tok, corpus, tmp_path):
    """The run's statistics source is part of what it must match: resumed with another corpus it
    stops (C would change mid-run); the sampled size, unused when a corpus is given, is not compared;
    a run.json from before the corpus was recorded resumes, compared without either."""
    import shutil

    settings = json.loads((ref[0] / "run.json").read_text())
    assert settings["stats_corpus"] == str(corpus.resolve()) and "sampled_corpus_tokens" not in settings["hparams"]
    other = tmp_path / "other.txt"
    other.write_text(corpus.read_text()[::-1])
    _, run = new_run(tok, other, ref[0], guard=False)
    with pytest.raises(RankoneError, match=r"other settings \(stats_corpus\)"):
        run.preflight()
    shutil.copytree(ref[0], tmp_path / "old")
    del settings["stats_corpus"]
    settings["hparams"]["sampled_corpus_tokens"] = 100_000  # the default of the day
    (tmp_path / "old" / "run.json").write_text(json.dumps(settings))
    _, run = new_run(tok, corpus, tmp_path / "old", guard=False)
    assert run.preflight() == "resume"


def test_spike_flags_and_summary_and_plots(tok, corpus, tmp_path):
    # spike_factor just above 1 flags nearly every update that is larger than the running median
    _, run = new_run(tok, corpus, tmp_path / "rome", n=3, method="rome", guard=False, spike_factor=1.0001, warmup=1)
    recs = run.run()
    edits = [r for r in recs if r["type"] == "edit"]
    for j, r in enumerate(edits[1:], 1):
        med = sorted(e["delta_fro"] for e in edits[:j])[(j - 1) // 2: j // 2 + 1]
        spike = r["delta_fro"] > 1.0001 * sum(med) / len(med)
        assert bool(r["flags"]) == spike, (j, r["flags"])
    s = summarize_run(read_run(tmp_path / "rome")[0], recs)
    assert s["n_attempted"] == 3 and s["n_spikes"] == sum(bool(r["flags"]) for r in edits)
    rep = report({"rome": tmp_path / "rome"}, tmp_path / "out", title="tiny")
    for f in rep["figures"]:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| rome (layer 1) |" in md and "![delta_norms](delta_norms.png)" in md
    # the same run under another label, cut after its first 2 edits (runs compared at one point)
    cut = report({"early": tmp_path / "rome"}, tmp_path / "cut", upto=2)["summaries"][0]
    assert cut["label"] == "early" and cut["n_attempted"] == 2 and s["n_attempted"] == 3
    assert "| early (layer 1) |" in (tmp_path / "cut" / "summary.md").read_text()


def test_generation_scores_read_the_greedy_continuation(tok):
    import dataclasses

    model = make_model("gpt2")
    cases = make_cases()[:4]
    said = [tok.decode(x, skip_special_tokens=True) for x in
            continuations(model, tok, [c.prompt for c in cases] + [c.paraphrase_prompts[0] for c in cases], 8)]
    words = [t.split() for t in said]
    assert all(words), said  # the tiny model says something after every prompt
    # targets the continuation states: every prompt and paraphrase counts; a word it never says: none does
    stated = [dataclasses.replace(c, target_new=w[-1]) for c, w in zip(cases, words[:4])]
    hits = sum(w[-1] in words[4 + i] for i, w in enumerate(words[:4]))
    gs, gps = generation_scores(model, tok, stated, 8)
    assert gs == 1.0 and gps == hits / 4
    never = [dataclasses.replace(c, target_new="Xylophonequartz") for c in cases]
    assert generation_scores(model, tok, never, 8) == (0.0, 0.0)
    assert generation_scores(model, tok, [dataclasses.replace(cases[0], paraphrase_prompts=[])], 8)[1] is None


def test_run_measures_generation_on_a_fixed_sample(tok, corpus, tmp_path):
    _, run = new_run(tok, corpus, tmp_path / "gs", n=4, guard=False, gs_sample=2)
    evals = [r for r in run.run() if r["type"] == "eval"]
    # the sample is cases 0 and 3: one of them is edited by the first evaluation point, both by the last
    assert [r.get("gs_n") for r in evals] == [None, 1, 2]
    assert all(0.0 <= r["gs"] <= 1.0 and 0.0 <= r["gps"] <= 1.0 for r in evals[1:])
    assert json.loads((tmp_path / "gs" / "run.json").read_text())["config"]["gs_sample"] == 2


def test_spaced():
    assert spaced(3, 5) == [0, 1, 2]
    assert spaced(11, 3) == [0, 5, 10]
    assert len(spaced(1000, 100)) == 100


# ---- the commands ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("c") / "cases.jsonl"
    save_cases(p, make_cases())
    return p



HP = json.dumps(FAST)


def test_eval_command_with_a_patch_and_edit_each(capsys, model_dir, cases_file, tmp_path):
    ppl = tmp_path / "heldout.txt"
    ppl.write_text(corpus_text()[-800:])
    code, _, err = run_cli(capsys, "edit", "--quiet", "--model", model_dir, "--prompt", "{} was born in", "--subject",
                           "Danielle Darrieux", "--target", "Rome", "--hparams", HP, "--out", tmp_path / "p")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", "--model", model_dir, "--patch", tmp_path / "p", "--cases", cases_file,
                             "--gen-tokens", "4", "--ppl-text", ppl, "--out", tmp_path / "e.json")
    assert code == 0, err
    assert "efficacy ES" in out and "held-out perplexity" in out and "edited cases (n=1)" in out
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["n_cases"] == 8 and res["n_edited"] == 1
    assert res["per_case"][0]["after"]["edited"] and not res["per_case"][1]["after"]["edited"]
    # unedited cases are scored on the same weights before and after everywhere but the edited layer
    assert res["summary"]["edited"]["after"]["n"] == 1 and res["summary"]["not edited"]["after"]["n"] == 7
    code, out, err = run_cli(capsys, "eval", "--model", model_dir, "--edit-each", "--method", "rome", "--hparams", HP,
                             "--cases", cases_file, "--n", "2", "--gen-tokens", "0", "--quiet", "--out", tmp_path / "f.json")
    assert code == 0, err
    res = json.loads((tmp_path / "f.json").read_text())
    assert res["mode"] == "edit-each (rome)" and res["n_cases"] == 2
    assert all(c["after"]["delta_fro"] > 0 for c in res["per_case"])


def test_bench_sequential_command(capsys, model_dir, cases_file, tmp_path):
    args = ["bench", "sequential", "--model", model_dir, "--cases", cases_file, "--n", "3", "--every", "3",
            "--method", "rome", "--method", "r-rome", "--hparams", HP, "--gen-prompts", "1", "--gen-tokens", "4",
            "--probe-sample", "3", "--quiet", "--out", tmp_path / "s"]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    for m in ("rome", "r-rome"):
        assert (tmp_path / "s" / m / "run.jsonl").is_file()
    for f in ("summary.md", "summary.json", "delta_norms.png", "metrics.png", "denominators.png"):
        assert (tmp_path / "s" / f).is_file(), f
    assert "| rome (layer 1) | r-rome (layer 1) |" in out
    # run again: both are complete, nothing is recomputed, the JSONL is unchanged
    before = (tmp_path / "s" / "rome" / "run.jsonl").read_text()
    code, _, err = run_cli(capsys, *args)
    assert code == 0, err
    assert (tmp_path / "s" / "rome" / "run.jsonl").read_text() == before


@pytest.mark.parametrize("argv, message", [
    (["eval", "--cases", "{cases}", "--patch", "{tmp}/nope"], "is not a patch"),
    (["eval", "--cases", "{cases}"], "nothing to compare"),
    (["eval", "--cases", "{cases}", "--patch", "{tmp}/p", "--edit-each"], "not both"),
    (["eval", "--cases", "{tmp}/missing.json", "--edit-each"], "cases file .* does not exist"),
    (["eval", "--cases", "{cases}", "--edit-each", "--out", "{tmp}"], "is a folder"),
    (["eval", "--cases", "{cases}", "--edit-each", "--ppl-text", "{tmp}/none.txt"], "--ppl-text file .* does not exist"),
    (["eval", "--cases", "{cases}", "--edit-each", "--layer", "auto"], "--layer auto is not available"),
    (["bench", "sequential", "--cases", "{cases}", "--n", "20", "--out", "{tmp}/o"], "only 8 usable case"),
    (["bench", "sequential", "--cases", "{tmp}/missing.json", "--n", "2", "--out", "{tmp}/o"], "does not exist"),
    (["bench", "sequential", "--cases", "{cases}", "--n", "2", "--glue", "{tmp}", "--out", "{tmp}/o"], "GLUE file"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(capsys, model_dir, cases_file, tmp_path, argv, message):
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.format(cases=cases_file, tmp=tmp_path) for a in argv]
    code, out, err = run_cli(capsys, argv[0], *argv[1:2] if argv[0] == "bench" else [], "--model", model_dir,
                             *(argv[2:] if argv[0] == "bench" else argv[1:]))
    assert code == 2
    import re

    assert re.search(message, err), err
    assert err.startswith("rankone: error: ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_argument_errors_exit_2(capsys, model_dir, cases_file, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["bench", "sequential", "--model", str(model_dir), "--cases", str(cases_file), "--n", "0", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--n must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    for bad in ("-1", "nan", "soon"):
        with pytest.raises(SystemExit) as e:
            main(["bench", "sequential", "--model", str(model_dir), "--cases", str(cases_file), "--n", "2",
                  "--checkpoint-minutes", bad, "--out", str(tmp_path / "o")])
        assert e.value.code == 2 and "--checkpoint-minutes" in capsys.readouterr().err, bad
    assert not (tmp_path / "o").exists()


def test_a_batch_that_asks_a_question_twice_writes_the_later_case(tok, corpus, tmp_path):
    import dataclasses

    cases = make_cases()
    again = dataclasses.replace(cases[2], case_id="again", subject=cases[0].subject, target_new="Oslo")
    cases = [cases[0], cases[1], again] + cases[3:]  # case 2 asks case 0's question with another target
    model = make_model("gpt2")
    cfg = SequentialConfig(n=4, every=4, batch_size=4, retention_sample=10, ns_sample=2, probe_sample=0, gen_prompts=0)
    run = SequentialRun(handle_of(model, tok), cases, {"method": "memit", **FAST}, tmp_path / "r", cfg, [],
                        ppl_text=corpus_text()[:300], stats_corpus=corpus, progress=False)
    edits = [r for r in run.run() if r["type"] == "edit"]
    assert [r["accepted"] for r in edits] == [False, True, True, True]
    assert edits[0]["reason"] == "superseded by edit 2 of the same batch (it asks the same question)"
    assert len(run.patch.edits[0].requests) == 3 and run.patch.edits[0].requests[1]["target"] == "Oslo"
