"""Honest outcomes: an edit that misses its target says so (and --require-success writes nothing);
eval says which cases the patch edited and warns when none of them is among the cases."""

from __future__ import annotations

import json
import logging

import pytest

from rankone.artifacts.patch import Patch, make_edit
from rankone.core.util import utcnow
from rankone.cli.main import main
from rankone.core import architectures as arch
from rankone.eval.cases import load_cases
from rankone.models.load import load_model
from rankone.testbed import builtin_model_dir

M = builtin_model_dir()
MISS = '{"v_steps": 1, "stats_tokens": 5000, "prefix_spec": [[2, 1]]}'  # one step cannot write a new fact


def test_an_edit_that_misses_its_target_says_so(tmp_path, capsys, caplog):
    argv = ["edit", "--model", str(M), "--prompt", "{} was born in", "--subject", "Stoukthen Fokai Thathai",
            "--target", "東京🎌", "--hparams", MISS, "--quiet", "--out", str(tmp_path / "p")]
    with caplog.at_level(logging.WARNING):
        assert main(argv) == 0
    assert any("did not reach its target" in r.getMessage() for r in caplog.records)
    out = capsys.readouterr().out
    assert "(target NOT reached)" in out and "1 not reaching the target" in out
    o = json.loads((tmp_path / "p" / "patch.json").read_text())["edits"][0]["diagnostics"]["outcome"]
    assert o["reached"] is False and o["p_target"] < 0.01 and not o["answer"].startswith("東京")
    assert main(argv[:-1] + [str(tmp_path / "q"), "--require-success"]) == 1
    assert "nothing written" in capsys.readouterr().err and not (tmp_path / "q").exists()


def _patch_for(request: dict, model, path) -> None:
    w = arch.weight_oi(arch.get_module(model, "transformer.h.0.mlp.c_proj")).detach().clone()
    import torch

    g = torch.Generator().manual_seed(0)
    e, _ = make_edit(w, torch.randn(w.shape[0], 1, generator=g) * 1e-3, torch.randn(1, w.shape[1], generator=g),
                     module="transformer.h.0.mlp.c_proj", layer=0, method="r-rome", hparams={}, seed=0, request=request)
    Patch([e], base={"model_type": "gpt2"}, created_at=utcnow()).save(path)


def test_eval_names_the_edited_cases_and_warns_when_none_is_among_them(tmp_path, capsys):
    model, _ = load_model(M)
    cases = load_cases(M)
    _patch_for(cases[300].request.to_dict(), model, tmp_path / "hit")  # far past --n: evaluated first all the same
    _patch_for({"prompt": "{} was born in", "subject": "Nobody Known", "target": "Rome"}, model, tmp_path / "miss")
    base = ["eval", "--model", str(M), "--cases", str(M), "--n", "2", "--gen-tokens", "0", "--quiet"]
    capsys.readouterr()
    assert main(base + ["--patch", str(tmp_path / "hit"), "--out", str(tmp_path / "a.json")]) == 0
    got = capsys.readouterr()
    assert f"edited cases among the 2: {cases[300].case_id}" in got.out and "warning" not in got.err
    assert json.loads((tmp_path / "a.json").read_text())["n_edited"] == 1
    assert main(base + ["--patch", str(tmp_path / "miss"), "--out", str(tmp_path / "b.json")]) == 0
    got = capsys.readouterr()
    warn = [x for x in got.err.splitlines() if "warning" in x]
    assert len(warn) == 1 and "none of the 2 case(s) is a fact the patch edited" in warn[0]
    assert "--n" not in warn[0]  # no advice to evaluate all 900 cases: the edited facts are not in the file
    assert "the patch edits 1 fact(s)" in got.out


def test_eval_takes_the_first_100_cases_unless_told_all(tmp_path, capsys):
    model, _ = load_model(M)
    _patch_for(load_cases(M)[0].request.to_dict(), model, tmp_path / "p")
    base = ["eval", "--model", str(M), "--cases", str(M), "--gen-tokens", "0", "--patch", str(tmp_path / "p")]
    assert main(base + ["--out", str(tmp_path / "a.json")]) == 0
    assert "evaluated 100 of the 900 usable cases, the edited ones first (--n all: every one)" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["n_cases"] == 100
    with pytest.raises(SystemExit) as e:  # a count is ≥ 1 or 'all'
        main(base + ["--n", "0", "--out", str(tmp_path / "b.json")])
    assert e.value.code == 2
    assert "--n" in capsys.readouterr().err and not (tmp_path / "b.json").exists()
