"""The README's Python API example, run as written: its edit must take (the API uses the
hyper-parameters the model recommends, as the CLI does)."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_api_example_makes_a_working_edit(tmp_path):
    text = README.read_text(encoding="utf-8")
    code = text[text.index("## Python API"):].split("```python\n", 1)[1].split("```", 1)[0]
    cwd = os.getcwd()
    os.chdir(tmp_path)  # it writes patches/varo
    out = io.StringIO()
    try:
        scope: dict = {}
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    outcome = scope["patch"].edits[0].diagnostics["outcome"]
    assert outcome["reached"] and outcome["answer"].startswith("Lisbon"), outcome
    assert "'reached': True" in out.getvalue()
    assert (tmp_path / "patches" / "varo" / "patch.json").is_file()
    # the example left the model as it was; the saved patch flips the answer, and reverts exactly
    from rankone.models.generation import greedy

    model, tok = scope["handle"]
    prompt = scope["req"].text()[0]
    assert not greedy(model, tok, prompt, 3).strip().startswith("Lisbon")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    applied = scope["apply_patch"](model, scope["Patch"].load(tmp_path / "patches" / "varo"))
    assert greedy(model, tok, prompt, 3).strip().startswith("Lisbon")
    applied.revert()
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())
