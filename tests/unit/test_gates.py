"""Validation gates: policy and suite files, the checks on a real tiny model, the validate command."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from rankone.core import architectures as arch
from rankone.cli.main import main
from rankone.core.errors import RankoneError
from rankone.lifecycle.gates import GatePolicy, delta_norms, load_suite, run_gates
from rankone.models.generation import says
from rankone.models.generation import first_word, greedy
from rankone.artifacts.patch import compose
from rankone.lifecycle.registry import Registry
from test_registry import M1, M2, synth_patch  # noqa: E402  (tests/unit is on sys.path under pytest)
from tiny import make_model

DOCS = Path(__file__).resolve().parents[2] / "docs"
PROMPTS = ["The capital of France is", "Romeo and Juliet", "First Citizen: We are"]


def suite_file(tmp_path, lines, name="suite.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return p


def test_policy_round_trip_and_documented_defaults():
    pol = GatePolicy(keep_max_prob_change=0.1, max_delta_rel=None, answer_tokens=2)
    assert GatePolicy.from_dict(json.loads(json.dumps(pol.to_dict()))) == pol
    # the example file documents exactly the defaults
    assert GatePolicy.load(DOCS / "policy.example.json") == GatePolicy()
    assert GatePolicy.load(None) == GatePolicy()


@pytest.mark.parametrize("content,msg", [
    ('{"keep_max_prob_chnage": 0.1}', "unknown policy key"),
    ('{"max_perplexity_rise": -1}', "non-negative"),
    ('{"answer_tokens": 0}', "positive integer"),
    ('{"keep_answer_must_match": "yes"}', "true or false"),
    ("[1]", "JSON object"),
    ("{", "not valid JSON"),
])
def test_policy_errors(tmp_path, content, msg):
    p = tmp_path / "pol.json"
    p.write_text(content)
    with pytest.raises(RankoneError, match=msg) as ei:
        GatePolicy.load(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("lines,msg", [
    (["{not json"], ":1 is not valid JSON"),
    ([{"type": "target", "prompt": "x", "target": "y"}, {"type": "tagret", "prompt": "x"}], ":2: unknown check type 'tagret'"),
    ([{"type": "target", "prompt": "x"}], "needs a non-empty string 'target'"),
    ([{"type": "keep", "prompt": "x", "tolerance": 1}], "has no field(s) ['tolerance']"),
    ([{"type": "perplexity", "text": "a b c", "text_file": "f"}], "exactly one of 'text' or 'text_file'"),
    ([{"type": "perplexity", "text_file": "missing.txt"}], "does not exist"),
    ([{"type": "perplexity", "text": "word"}], "too short"),
    (["", "  "], "holds no checks"),
    (["[1, 2]"], "is not a JSON object"),
])
def test_suite_errors_name_file_and_line(tmp_path, lines, msg):
    with pytest.raises(RankoneError, match=None) as ei:
        load_suite(suite_file(tmp_path, lines))
    assert msg in str(ei.value) and "suite.jsonl" in str(ei.value)


def test_suite_reads_text_files_relative_to_itself(tmp_path):
    (tmp_path / "held.txt").write_text("the quick brown fox jumps over the lazy dog")
    s = load_suite(suite_file(tmp_path, [{"type": "perplexity", "text_file": "held.txt"},
                                         {"type": "keep", "prompt": "Rome is in "}]))
    assert s.checks[0].text.startswith("the quick") and s.checks[0].name == "held.txt"
    assert s.checks[1].prompt == "Rome is in" and len(s.sha256) == 64


def test_answer_matches_whole_words():
    assert says(" Paris. The", "Paris") and says("New  York city", "New York")
    assert not says(" Parisian", "Paris") and not says(" London", "Paris")


def test_delta_norms_are_exact():
    model = make_model("gpt2")
    p = compose([synth_patch(model, M1, seed=i, scale=0.1) for i in range(3)] + [synth_patch(model, M2, seed=9)])
    got = delta_norms(p)
    want = sum((e.delta() for e in p.edits if e.module == M1), torch.zeros(1))
    assert got[M1] == pytest.approx(float(want.norm()), rel=1e-9)
    assert got[M2] == pytest.approx(p.edits[-1].delta_fro, rel=1e-6)


def test_gates_pass_a_harmless_patch_and_fail_a_destructive_one(tmp_path, tok):
    model = make_model("gpt2")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    answers = {p: first_word(greedy(model, tok, p, 4)) for p in PROMPTS}
    lines = [{"type": "target", "prompt": PROMPTS[0], "target": answers[PROMPTS[0]]},
             {"type": "target", "prompt": PROMPTS[1], "target": "zebra"},
             *({"type": "keep", "prompt": p} for p in PROMPTS),
             {"type": "perplexity", "text": "First Citizen: Before we proceed any further, hear me speak. " * 4}]
    suite = load_suite(suite_file(tmp_path, lines))
    small = synth_patch(model, scale=1e-4)
    rep = run_gates(model, tok, small, suite, GatePolicy())
    by = [(r.type, r.passed) for r in rep.results]
    assert by == [("target", True), ("target", False), ("keep", True), ("keep", True), ("keep", True),
                  ("perplexity", True), ("delta", True)]
    assert not rep.passed and "FAIL" in rep.table() and "zebra" in rep.table()
    assert all(r.measure < 1e-3 for r in rep.results if r.type == "keep")

    # a huge update wrecks the model (a random model's ppl is near its vocabulary size, so it can
    # only rise a little: the limits are tight here, the comparison is what is under test)
    big = synth_patch(model, scale=30.0)
    tight = GatePolicy(max_perplexity_rise=0.005, keep_max_prob_change=1e-3)
    rep2 = run_gates(model, tok, big, load_suite(suite_file(tmp_path, lines[2:])), tight)
    kinds = {r.type: r for r in rep2.results}
    assert not rep2.passed
    assert not kinds["perplexity"].passed and kinds["perplexity"].measure > 0.005
    assert not kinds["delta"].passed and kinds["delta"].measure > 3.0
    keep_small = max(r.measure for r in rep.results if r.type == "keep")
    assert max(r.measure for r in rep2.results if r.type == "keep") > 10 * keep_small
    for k, v in model.state_dict().items():  # the model is given back bit for bit
        assert torch.equal(v, state[k]), k

    # with the big patch as the released reference, the harmless one measures against it
    rep3 = run_gates(model, tok, small, load_suite(suite_file(tmp_path, lines[5:])), GatePolicy(), [big], ["bigid"])
    assert rep3.reference == ["bigid"] and rep3.results[0].before != rep.results[5].before
    assert rep3.results[0].passed
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


# ---- the validate command ---------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path, tok):
    d = tmp_path / "base"
    m = make_model("gpt2")
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return d, m


def test_validate_command_stores_report_and_moves_state_only_on_pass(tmp_path, model_dir, tok, capsys):
    d, model = model_dir
    db = str(tmp_path / "r.db")
    p = synth_patch(model, scale=1e-4)
    p.save(tmp_path / "p")
    pid = Registry(db).add(tmp_path / "p", "a", "r")[0].id
    ans = first_word(greedy(model, tok, PROMPTS[0], 4))
    suite = suite_file(tmp_path, [{"type": "target", "prompt": PROMPTS[0], "target": ans},
                                  {"type": "keep", "prompt": PROMPTS[1]}])
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps({"max_delta_rel": 1e-9}))
    code = main(["registry", "validate", pid, "--model", str(d), "--suite", str(suite), "--policy", str(strict),
                 "--registry", db, "--author", "qa"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "state unchanged" in out
    reg = Registry(db)
    assert reg.get(pid).state == "proposed" and len(reg.validations(pid)) == 1
    assert reg.log(pid)[-1].action == "validate-failed" and reg.log(pid)[-1].actor == "qa"
    code = main(["registry", "validate", pid, "--model", str(d), "--suite", str(suite), "--registry", db])
    out = capsys.readouterr().out
    assert code == 0 and "3/3 checks passed: PASS" in out
    assert reg.get(pid).state == "validated"
    stored = reg.validations(pid)[-1]
    assert stored["passed"] == 1 and stored["report"]["suite"]["sha256"] == load_suite(suite).sha256
    assert [r["type"] for r in stored["report"]["results"]] == ["target", "keep", "delta"]


def test_validate_bad_suite_or_other_model_changes_nothing(tmp_path, model_dir, capsys):
    d, model = model_dir
    db = tmp_path / "r.db"
    synth_patch(model).save(tmp_path / "p")
    synth_patch(make_model("gpt2", seed=5)).save(tmp_path / "q")  # made for other weights
    reg = Registry(db)
    pid, qid = reg.add(tmp_path / "p", "a", "r")[0].id, reg.add(tmp_path / "q", "a", "r")[0].id
    dump = list(sqlite3.connect(str(db)).iterdump())
    bad = suite_file(tmp_path, ['{"type": "keep"}'])
    assert main(["registry", "validate", pid, "--model", str(d), "--suite", str(bad), "--registry", str(db)]) == 2
    assert "needs a non-empty string 'prompt'" in capsys.readouterr().err
    good = suite_file(tmp_path, [{"type": "keep", "prompt": "Rome"}], "good.jsonl")
    assert main(["registry", "validate", qid, "--model", str(d), "--suite", str(good), "--registry", str(db)]) == 2
    assert "patch does not fit this model" in capsys.readouterr().err
    assert list(sqlite3.connect(str(db)).iterdump()) == dump


def test_layer_weights_unchanged_by_failed_apply(model_dir, tmp_path, tok):
    # run_gates applies reference + patch in one call: a misfit patch leaves the model as it was
    d, model = model_dir
    w = arch.weight_oi(arch.get_module(model, M1)).detach().clone()
    alien = synth_patch(make_model("gpt2", seed=3))
    with pytest.raises(RankoneError, match="does not fit"):
        run_gates(model, tok, alien, load_suite(suite_file(tmp_path, [{"type": "keep", "prompt": "Rome"}])), GatePolicy(),
                  [synth_patch(model, M2)])
    assert torch.equal(arch.weight_oi(arch.get_module(model, M1)), w)
