"""The example files: every one the README names exists and reads, and the README's validation of
its edit on the built-in model passes with the shipped suite."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rankone.cli.common import load_requests
from rankone.eval.cases import load_cases
from rankone.lifecycle.gates import load_suite

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def test_every_example_file_the_readme_names_exists_and_reads():
    named = set(re.findall(r"examples/[\w/.-]+\.(?:jsonl|json)", (ROOT / "README.md").read_text(encoding="utf-8")))
    assert {"examples/builtin/edits.jsonl", "examples/builtin/cases.json", "examples/builtin/checks.jsonl"} <= named
    for model in ("builtin", "smollm2"):
        named |= {f"examples/{model}/{f}" for f in ("edits.jsonl", "cases.json", "checks.jsonl")}
    for rel in sorted(named):
        p = ROOT / rel
        assert p.is_file(), rel
        if rel.endswith("edits.jsonl"):
            assert len(load_requests(str(p))) >= 2
        elif rel.endswith("cases.json"):
            assert len(load_cases(p)) >= 30  # enough for the README's `bench layers --n 30`
        else:
            suite = load_suite(p)
            assert {c.type for c in suite.checks} == {"target", "keep", "perplexity"}


def test_the_readme_edit_on_the_builtin_model_passes_the_shipped_suite_and_leads_the_cases():
    from rankone.core.tokens import EditRequest
    from rankone.edit.editor import Editor
    from rankone.lifecycle.gates import GatePolicy, run_gates
    from rankone.models.load import load_model
    from rankone.testbed import builtin_model_dir

    handle = load_model(builtin_model_dir())
    req = EditRequest.create("{} was born in", "Stoukthen Fokai Thathai", "Lisbon")  # the README's `rankone edit`
    first = load_cases(EXAMPLES / "builtin" / "cases.json")[0]
    assert first.request == req and load_requests(str(EXAMPLES / "builtin" / "edits.jsonl"))[0] == req
    patch = Editor(handle, progress=False).edit([req])
    report = run_gates(handle.model, handle.tokenizer, patch, load_suite(EXAMPLES / "builtin" / "checks.jsonl"),
                       GatePolicy(), [])
    assert report.passed, [r for r in report.results if not r.passed]


@pytest.mark.parametrize("model", ["builtin", "smollm2"])
def test_the_suites_target_is_the_readme_edit(model):
    target = next(c for c in load_suite(EXAMPLES / model / "checks.jsonl").checks if c.type == "target")
    assert (target.prompt, target.target) == {
        "builtin": ("Stoukthen Fokai Thathai was born in", "Lisbon"),
        "smollm2": ("The Eiffel Tower is located in the city of", "Rome")}[model]
