"""`rankone trace` and `rankone edit --layer auto` on a real tiny model folder."""

import json
from pathlib import Path

import pytest

from rankone.cli.main import main
from rankone.eval.cases import fact_set
from tiny import corpus_text, make_model
from conftest import run_cli  # noqa: E402

FAST_EDIT = json.dumps(dict(v_steps=4, prefix_spec=[[3, 5]], stats_tokens=20_000))
ONE = ["--prompt", "The home of {} is", "--subject", "Danielle Darrieux"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("m") / "tiny-gpt2"
    make_model("gpt2", initializer_range=0.5).save_pretrained(d)
    tok.save_pretrained(d)
    (d / "corpus.txt").write_text(corpus_text()[:50_000])
    return d



def trace(capsys, model_dir, out, *extra):
    return run_cli(capsys, "trace", "--model", model_dir, "--samples", "2", "--out", out, "--quiet", *extra)


def test_trace_writes_heatmaps_and_json_of_tokens_by_layers(capsys, model_dir, tmp_path):
    code, out, err = trace(capsys, model_dir, tmp_path / "t", *ONE)
    assert code == 0, err
    d = json.loads((tmp_path / "t" / "trace.json").read_text())
    n_tokens = len(d["tokens"])
    assert d["correct"] and n_tokens >= 6 and d["subject_range"][1] < n_tokens - 1
    for kind in ("hidden", "mlp", "attn"):
        scores = d["scores"][kind]
        assert len(scores) == n_tokens and all(len(row) == 3 for row in scores)  # [n_tokens, n_layers]
        png = (tmp_path / "t" / f"trace_{kind}.png").read_bytes()
        assert png.startswith(PNG) and len(png) > 5_000
    assert d["settings"]["n_samples"] == 2 and d["noise_scale"] > 0


def test_trace_refuses_an_answer_the_model_gets_wrong(capsys, model_dir, tmp_path):
    code, _, err = trace(capsys, model_dir, tmp_path / "w", *ONE, "--target", "the")
    assert code == 1 and "not traced" in err and "the" in err
    assert not (tmp_path / "w").exists()


def test_cases_give_the_aie_per_layer_and_a_plot(capsys, model_dir, tmp_path):
    cases = tmp_path / "cases.json"
    # CounterFact records as they are: the true answer is ground_truth, never target_new
    cases.write_text(json.dumps([
        {"prompt": "The home of Danielle Darrieux is", "subject": "Danielle Darrieux", "target_new": "Rome"},
        {"prompt": "{} was born in", "subject": "Toko Yasuda", "target_new": "Paris", "ground_truth": "Tokyo"},
    ]))
    fs = fact_set(cases)
    facts, subjects = fs.facts, fs.subjects
    assert facts[0].answer is None and facts[0].prompt == "The home of {} is" and facts[1].answer == "Tokyo" and subjects == ["Danielle Darrieux", "Toko Yasuda"]
    code, out, err = trace(capsys, model_dir, tmp_path / "a", "--cases", cases, "--heatmaps", "1", "--kinds", "mlp,attn")
    assert code == 0, err
    d = json.loads((tmp_path / "a" / "aie.json").read_text())
    assert set(d["aie"]) == {"mlp", "attn"} and all(len(v) == 3 for v in d["aie"].values())
    assert d["n_facts"] + d["n_wrong"] == 2 and d["n_facts"] >= 1
    assert d["chosen_layer"] == max(range(3), key=d["aie"]["mlp"].__getitem__)
    assert (tmp_path / "a" / "aie.png").read_bytes().startswith(PNG)
    assert (tmp_path / "a" / "case0_mlp.png").exists() and not (tmp_path / "a" / "case0_hidden.png").exists()


def test_edit_layer_auto_records_the_choice_and_its_evidence(capsys, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKONE_CACHE", str(tmp_path / "cache"))  # no AIE of this model cached yet

    def edit(out):
        code, stdout, err = run_cli(capsys, "edit", "--model", model_dir, *ONE, "--target", "Rome", "--layer", "auto",
                                "--hparams", FAST_EDIT, "--out", tmp_path / out)
        assert code == 0, err
        assert "layer auto: layer" in stdout
        return json.loads((tmp_path / out / "patch.json").read_text())["edits"][0]

    e = edit("p1")  # nothing cached, no testbed: the request itself is traced with the model's own answer
    choice = e["diagnostics"]["layer_choice"]
    assert len(choice["aie"]) == 3 and choice["n_facts"] == 1 and choice["kind"] == "mlp"
    assert choice["layer"] == max(range(3), key=choice["aie"].__getitem__) == e["layer"]
    assert "edit requests" in choice["source"] and (tmp_path / "cache") in Path(choice["cache_file"]).parents
    assert e["module"] == f"transformer.h.{choice['layer']}.mlp.c_proj"

    cases = tmp_path / "cases.jsonl"  # a traced case file with more facts is preferred from then on
    cases.write_text("".join(json.dumps({"prompt": p, "subject": s}) + "\n" for p, s in
                             [("{} was born in", "Toko Yasuda"), ("{} is a", "Danielle Darrieux"), ("The king of {} is", "France")]))
    code, _, err = trace(capsys, model_dir, tmp_path / "a", "--cases", cases, "--kinds", "mlp")
    assert code == 0, err
    e2 = edit("p2")
    choice2 = e2["diagnostics"]["layer_choice"]
    assert choice2["source"] == str(cases) and choice2["n_facts"] == 3
    assert e2["layer"] == choice2["layer"] == json.loads((tmp_path / "a" / "aie.json").read_text())["chosen_layer"]


@pytest.mark.parametrize("argv, message", [
    (ONE + ["--cases", "x.jsonl"], "not both"),
    (["--prompt", "{} is"], "needs both --prompt and --subject"),
    ([], "needs --prompt and --subject"),
    (["--prompt", "The home of Paris is", "--subject", "Rome"], "contains neither"),
    (["--cases", "{missing}"], "does not exist"),
    (["--cases", "{bad_jsonl}"], "is not valid JSON"),
    (["--cases", "{no_subject}"], "needs a 'prompt' and a 'subject'"),
    (ONE + ["--samples", "0"], "noise samples"),
    (ONE + ["--kinds", "mlp,neurons"], "unknown trace kind"),
    (ONE + ["--window", "0"], "window"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, model_dir, tmp_path, argv, message):
    files = {"missing": tmp_path / "nope.jsonl", "bad_jsonl": tmp_path / "bad.jsonl", "no_subject": tmp_path / "ns.jsonl"}
    files["bad_jsonl"].write_text('{"prompt": "{} was born in", "subject": "A"}\n{oops\n')
    files["no_subject"].write_text('{"prompt": "{} was born in", "answer": "Paris"}\n')
    for k, f in files.items():
        argv = [str(f) if a == "{" + k + "}" else a for a in argv]
    code, out, err = trace(capsys, model_dir, tmp_path / "o", *argv)
    assert code == 2
    assert err.startswith("rankone: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_clobbered(capsys, model_dir, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    code, _, err = trace(capsys, model_dir, tmp_path / "o", *ONE)
    assert code == 2 and "--force" in err
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["keep.txt"]


def test_choose_layer_falls_back_to_the_requests_when_the_card_facts_are_unknown(tmp_path, tok, monkeypatch):
    import shutil

    from rankone.core.errors import RankoneError
    from rankone.core.tokens import EditRequest
    from rankone.models.card import ModelCard
    from rankone.models.load import load_model
    from rankone.testbed.world import SyntheticSpec, synthetic_world
    from rankone.eval.cases import known_fact_set
    from rankone.trace.layer_choice import choose_layer

    monkeypatch.setenv("RANKONE_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "tiny-testbed"
    make_model("gpt2", initializer_range=0.5).save_pretrained(d)
    tok.save_pretrained(d)
    synthetic_world("tiny", SyntheticSpec(n_subjects=3, n_relations=2), seed=0).save(d)  # facts it never learnt
    ModelCard(cases="world.json").save(d / "rankone.json")  # the card says the model knows them
    handle = load_model(d)
    req = EditRequest.create("The home of {} is", "Danielle Darrieux", "Rome")
    choice = choose_layer(handle, [req], known=lambda: known_fact_set(handle))
    ev = choice.evidence()
    assert "edit requests" in ev["source"] and ev["n_facts"] == 1 and choice.layer == ev["layer"]
    assert "the model card's cases" in ev["not_used"][0] and "none of the 6 facts" in ev["not_used"][0]
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(RankoneError, match="needs edit requests"):
        choose_layer(handle, [])


def test_edit_layer_auto_on_the_builtin_testbed_traces_its_facts(capsys, tmp_path, monkeypatch):
    from rankone.testbed import builtin_model_dir

    d = builtin_model_dir()
    if not (d / "world.json").is_file():
        pytest.skip("the built-in testbed model is not in this checkout")
    monkeypatch.setenv("RANKONE_CACHE", str(tmp_path / "cache"))
    w = json.loads((d / "world.json").read_text())
    f = w["facts"][0]
    rel = next(r for r in w["relations"] if r["id"] == f["relation"])
    new = next(o for o in rel["objects"] if o != f["object"])
    code, out, err = run_cli(capsys, "edit", "--model", d, "--prompt", rel["phrasings"][0], "--subject", f["subject"],
                         "--target", new, "--layer", "auto", "--hparams", FAST_EDIT, "--out", tmp_path / "p")
    assert code == 0, err
    e = json.loads((tmp_path / "p" / "patch.json").read_text())["edits"][0]
    choice = e["diagnostics"]["layer_choice"]
    assert choice["source"] == f"{d / 'world.json'} (the model card's cases)" and choice["n_facts"] >= 90
    assert len(choice["aie"]) == 4 and e["layer"] == choice["layer"]  # the built-in has 4 layers
    assert max(choice["aie"]) > 0.01  # the testbed knows its facts: restoring some MLP matters
