"""`rankone bench layers`: measured edit quality per layer, stored per model, read by `--layer auto`."""

import hashlib
import json

import pytest

from rankone.cli.main import main
from rankone.core.tokens import EditRequest
from rankone.eval.cases import Case, save_cases
from rankone.eval.metrics import hmean
from rankone.core.errors import RankoneError
from rankone.trace.layer_choice import MIN_SWEEP_CASES, EditSweep, cached_sweep, save_sweep
from conftest import run_cli  # noqa: E402

FAST = json.dumps(dict(v_steps=4, prefix_spec=[[3, 5]], stats_tokens=20_000))
FIRST = ["Danielle", "Toko", "Blaise", "Michel", "Anna"]
LAST = ["Darrieux", "Yasuda", "Pascal", "Rocard"]
SUBJECTS = [f"{a} {b}" for a in FIRST for b in LAST]  # MIN_SWEEP_CASES of them
CITIES = ["Rome", "Paris", "London", "Vienna"]


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory):
    n = len(SUBJECTS)
    cases = [Case.of(f"c{i}", EditRequest.create("{} was born in", s, CITIES[i % 4]), CITIES[(i + 1) % 4],
                     [f"The birthplace of {s} is"], [f"{SUBJECTS[(i + 1) % n]} was born in"], [CITIES[(i + 2) % 4]],
                     [f"{s} was born in"]) for i, s in enumerate(SUBJECTS)]
    p = tmp_path_factory.mktemp("c") / "cases.jsonl"
    save_cases(p, cases)
    return p



def folder_digest(d):
    return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(d.iterdir()) if f.is_file())).hexdigest()


def test_bench_layers_measures_stores_and_layer_auto_edits_the_best(capsys, model_dir, cases_file, tmp_path, monkeypatch):
    monkeypatch.setenv("RANKONE_CACHE", str(tmp_path / "cache"))
    before = folder_digest(model_dir)
    sweep = ["bench", "layers", "--model", model_dir, "--cases", cases_file, "--n", str(MIN_SWEEP_CASES), "--all-cases",
             "--hparams", FAST, "--quiet"]
    code, out, err = run_cli(capsys, *sweep, "--layers", "0", "1", "--out", tmp_path / "s.json")
    assert code == 0, err
    d = json.loads((tmp_path / "s.json").read_text())
    assert set(d["scores"]) == {"0", "1"} and d["n_cases"] == MIN_SWEEP_CASES and d["method"] == "r-rome"
    for s in d["scores"].values():
        assert s["n"] == MIN_SWEEP_CASES and all(0 <= s[k] <= 1 for k in ("es", "ps", "ns"))
        assert s["score"] == pytest.approx(hmean([s["es"], s["ps"], s["ns"]]))
    assert d["best_layer"] == EditSweep.from_dict(d).best_layer() and f"best layer {d['best_layer']}" in out
    assert folder_digest(model_dir) == before  # every edit was reverted; nothing written to the model

    # a second run with the same settings adds its layers to the stored sweep
    code, out, err = run_cli(capsys, *sweep, "--layers", "1", "2")
    assert code == 0, err
    stored = json.loads(next((tmp_path / "cache" / "layers").rglob("sweep-r-rome.json")).read_text())
    assert set(stored["scores"]) == {"0", "1", "2"} and stored["scores"]["1"] == d["scores"]["1"]  # deterministic
    best = EditSweep.from_dict(stored).best_layer()

    code, out, err = run_cli(capsys, "edit", "--model", model_dir, "--prompt", "{} was born in", "--subject", "Toko Yasuda",
                         "--target", "Rome", "--layer", "auto", "--hparams", FAST, "--out", tmp_path / "p")
    assert code == 0, err
    assert f"layer auto: layer {best} (S " in out and "rankone bench layers" in out
    e = json.loads((tmp_path / "p" / "patch.json").read_text())["edits"][0]
    assert e["layer"] == best and e["diagnostics"]["layer_choice"]["kind"] == "sweep"
    assert e["diagnostics"]["layer_choice"]["scores"] == stored["scores"]


def test_a_sweep_on_too_few_cases_warns_and_is_not_what_layer_auto_edits(capsys, model_dir, cases_file, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("RANKONE_CACHE", str(tmp_path / "cache"))
    code, out, err = run_cli(capsys, "bench", "layers", "--model", model_dir, "--cases", cases_file, "--n", "2",
                         "--all-cases", "--hparams", FAST, "--quiet", "--layers", "0", "1")
    assert code == 0 and "best" in out and f"fewer than the {MIN_SWEEP_CASES}" in err and "not stored" in err
    assert not (tmp_path / "cache" / "layers").exists()  # --layer auto never reads it
    with pytest.raises(RankoneError, match=f"at least {MIN_SWEEP_CASES}"):
        save_sweep(EditSweep({0: {"score": 1.0, "es": 1.0}, 1: {"score": 0.0, "es": 0.0}}, "r-rome", "x", 2, {}, "a" * 64))
    with pytest.raises(SystemExit):
        main(["bench", "layers", "--help"])
    assert f"fewer than {MIN_SWEEP_CASES} is shown but not stored" in " ".join(capsys.readouterr().out.split())


def test_best_layer_breaks_ties_by_es_plus_ps_then_the_earlier_layer():
    def sw(scores):
        return EditSweep({l: dict(es=e, ps=p, ns=n, score=hmean([e, p, n]), n=5) for l, (e, p, n) in scores.items()},
                         "r-rome", "x", 5, {}, "f" * 64)

    assert sw({1: (1.0, 0.5, 0.9), 2: (1.0, 0.9, 0.9), 3: (1.0, 0.8, 0.9)}).best_layer() == 2
    assert sw({1: (1.0, 1.0, 0.0), 2: (0.0, 0.0, 0.0)}).best_layer() == 1  # S 0 both: ES + PS decides
    assert sw({4: (1.0, 0.9, 0.9), 2: (1.0, 0.9, 0.9)}).best_layer() == 2


def test_a_sweep_with_other_settings_replaces_the_stored_one_and_other_models_are_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKONE_CACHE", str(tmp_path))
    one = dict(es=1.0, ps=1.0, ns=1.0, score=1.0, n=MIN_SWEEP_CASES)
    save_sweep(EditSweep({1: one, 2: one}, "r-rome", "a", MIN_SWEEP_CASES, {}, "a" * 64))
    save_sweep(EditSweep({3: one}, "r-rome", "a", MIN_SWEEP_CASES, {"v_steps": 4}, "a" * 64))  # other hyper-parameters
    assert set(cached_sweep("a" * 64).scores) == {3}
    assert cached_sweep("b" * 64) is None and cached_sweep("a" * 64, "rome") is None


@pytest.mark.parametrize("extra, message", [
    (["--layers", "1"], "at least two"),
    (["--layers", "0", "9"], "out of range"),
    (["--layers", "0", "1", "--layer", "1"], "leave out --layer"),
    (["--layers", "0", "1", "--n", "50"], f"only {len(SUBJECTS)} usable case"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, model_dir, cases_file, tmp_path, monkeypatch, extra, message):
    monkeypatch.setenv("RANKONE_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli(capsys, "bench", "layers", "--model", model_dir, "--cases", cases_file, "--all-cases",
                       "--hparams", FAST, "--quiet", "--n", "3", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cache" / "layers").exists()
