"""`rankone demo`: one r-ROME edit on the built-in testbed model, answers before and after."""

from __future__ import annotations

import random
import time
from pathlib import Path

from rankone.edit.editor import Editor
from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import json_file
from rankone.models.generation import first_word, greedy
from rankone.models.load import load_model
from rankone.artifacts.patch import apply_patch
from rankone.core.tokens import EditRequest


def _builtin() -> Path:
    from rankone.testbed import builtin_model_dir

    return Path(builtin_model_dir())


def run_demo(model_dir: str | None = None, device: str = "cpu", quiet: bool = False, seed: int = 0) -> int:
    t0 = time.perf_counter()
    d = Path(model_dir) if model_dir else _builtin()
    if not (d / "world.json").is_file():
        raise RankoneError(f"{d} is not a testbed model (no world.json); build one with `rankone testbed build`")
    world = json_file(d / "world.json", "rebuild the testbed")
    handle = load_model(d, device)
    model, tok = handle
    rng = random.Random(seed)
    rel = {r["id"]: r for r in world["relations"]}
    fact = rng.choice(world["facts"])
    r = rel[fact["relation"]]
    train_ph = [i for i in range(len(r["phrasings"])) if i not in fact.get("heldout", [])]
    prompt = r["phrasings"][train_ph[0]]
    para = r["phrasings"][fact["heldout"][0]] if fact.get("heldout") else r["phrasings"][train_ph[-1]]
    target = rng.choice([o for o in r["objects"] if o != fact["object"]])
    other = rng.choice([f for f in world["facts"] if f["subject"] != fact["subject"]])
    other_prompt = rel[other["relation"]]["phrasings"][0]

    probes = [("edited prompt", prompt, fact["subject"], target),
              ("paraphrase (never trained)", para, fact["subject"], target),
              ("another subject", other_prompt, other["subject"], other["object"])]
    req = EditRequest.create(prompt, fact["subject"], target)
    print(f"Model: {d.name} ({world.get('arch', model.config.model_type)}, {sum(p.numel() for p in model.parameters()):,} parameters)")
    print(f"Edit:  {req.text()[0]} {fact['object']}  ->  {target}   (r-ROME)\n")
    before = {name: greedy(model, tok, pr.replace("{}", s), 4) for name, pr, s, _ in probes}
    ed = Editor(handle, progress=not quiet)  # the model card's recommended hyper-parameters
    patch = ed.edit([req])
    handle = apply_patch(model, patch)
    after = {name: greedy(model, tok, pr.replace("{}", s), 4) for name, pr, s, _ in probes}
    handle.revert()
    print(f"{'':28} {'before':>14}   {'after':<14} expected after")
    for name, pr, s, want in probes:
        print(f"{name:28} {first_word(before[name]):>14} → {first_word(after[name]):<14} {want}")
        print(f"{'':28} ({pr.replace('{}', s)})")
    e = patch.edits[0]
    print(f"\n|Δ|_F = {e.delta_fro:.4g} on {e.module}; patch = rank {e.rank}, B {list(e.B.shape)} and A {list(e.A.shape)} "
          f"({e.B.numel() + e.A.numel()} floats); "
          f"done in {time.perf_counter() - t0:.1f}s")
    ok = first_word(after["edited prompt"]) == target
    print("edit took effect" if ok else "edit did NOT take effect")
    return 0 if ok else 1
