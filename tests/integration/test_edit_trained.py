"""On the trained built-in testbeds, r-ROME edits flip facts and leave other subjects alone."""

import json
import random
from pathlib import Path

import pytest

from rankone.editor import Editor
from rankone.generation import first_word, greedy
from rankone.hparams import EditHParams
from rankone.models import load_model
from rankone.patch import apply_patch
from rankone.tokens import EditRequest


def world_prompts(d: Path, n_edit: int = 10, n_other: int = 30, seed: int = 0):
    world = json.loads((d / "world.json").read_text())
    rel = {r["id"]: r for r in world["relations"]}
    rng = random.Random(seed)
    edits = rng.sample(world["facts"], n_edit)
    subjects = {f["subject"] for f in edits}
    others = rng.sample([f for f in world["facts"] if f["subject"] not in subjects], n_other)

    def trained_prompt(f):
        r = rel[f["relation"]]
        i = next(i for i in range(len(r["phrasings"])) if i not in f.get("heldout", []))
        return r["phrasings"][i]

    reqs = [EditRequest.create(trained_prompt(f), f["subject"],
                               rng.choice([o for o in rel[f["relation"]]["objects"] if o != f["object"]])) for f in edits]
    return reqs, [(trained_prompt(f).replace("{}", f["subject"]), f["object"]) for f in others]


def builtin_dirs():
    from rankone.testbed import builtin_llama_dir, builtin_model_dir

    return {"gpt2": builtin_model_dir(), "llama": builtin_llama_dir()}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_r_rome_flips_at_least_9_of_10_and_keeps_other_subjects(arch):
    d = builtin_dirs()[arch]
    model, tok = load_model(d)
    reqs, others = world_prompts(d)
    answer = lambda prompt: first_word(greedy(model, tok, prompt, 4))  # noqa: E731
    base = [answer(p) for p, _ in others]
    assert sum(b == want for b, (_, want) in zip(base, others)) >= 0.9 * len(others)  # the model knows them

    ed = Editor(model, tok, EditHParams(method="r-rome"), progress=False)
    flips, kept, checked = 0, 0, 0
    for req in reqs:
        handle = apply_patch(model, ed.edit([req]))
        flips += answer(req.text()[0]) == req.target
        now = [answer(p) for p, _ in others]
        kept += sum(a == b for a, b in zip(now, base))
        checked += len(now)
        handle.revert()
    assert flips >= 9, f"only {flips}/10 edits took"
    assert kept / checked >= 0.97, f"other subjects' answers changed: kept {kept}/{checked}"
