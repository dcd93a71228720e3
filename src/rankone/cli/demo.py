"""`rankone demo`: one r-ROME edit on the built-in testbed model, answers before and after."""

from __future__ import annotations

import random
import time
from pathlib import Path

from rankone.edit.editor import Editor
from rankone.core.errors import RankoneError
from rankone.models.generation import first_word, greedy, says
from rankone.models.load import load_model
from rankone.artifacts.patch import apply_patch
from rankone.testbed.world import WORLD_FILE, World
from rankone.core.tokens import EditRequest


def _builtin() -> Path:
    from rankone.testbed import builtin_model_dir

    return Path(builtin_model_dir())


def run_demo(model_dir: str | None = None, device: str = "cpu", quiet: bool = False, seed: int = 0) -> int:
    t0 = time.perf_counter()
    d = Path(model_dir) if model_dir else _builtin()
    if not (d / WORLD_FILE).is_file():
        raise RankoneError(f"{d} is not a testbed model (no {WORLD_FILE}); build one with `rankone testbed build`")
    world = World.load(d)
    handle = load_model(d, device)
    model, tok = handle
    rng = random.Random(seed)
    fact = rng.choice(world.facts)
    rel = world.relation(fact.relation)
    prompt = world.prompts(fact, "train")[0]
    para = (world.prompts(fact, "heldout") or world.prompts(fact, "train")[-1:])[0]  # a phrasing never trained, if any
    target = rng.choice([o for o in rel.objects if o != fact.object])
    other = rng.choice([f for f in world.facts if f.subject != fact.subject])
    other_prompt = world.relation(other.relation).phrasings[0]

    probes = [("edited prompt", prompt, fact.subject, target),
              ("paraphrase (never trained)", para, fact.subject, target),
              ("another subject", other_prompt, other.subject, other.object)]
    req = EditRequest.create(prompt, fact.subject, target)
    print(f"Model: {d.name} ({world.arch or model.config.model_type}, {sum(p.numel() for p in model.parameters()):,} parameters)")
    print(f"Edit:  {req.text()[0]} {fact.object}  ->  {target}   (r-ROME)\n")
    before = {name: greedy(model, tok, pr.replace("{}", s), 4) for name, pr, s, _ in probes}
    ed = Editor(handle, progress=not quiet)  # the model card's recommended hyper-parameters
    patch = ed.edit([req])
    applied = apply_patch(model, patch)
    after = {name: greedy(model, tok, pr.replace("{}", s), 4) for name, pr, s, _ in probes}
    applied.revert()
    print(f"{'':28} {'before':>14}   {'after':<14} expected after")
    for name, pr, s, want in probes:
        print(f"{name:28} {first_word(before[name]):>14} → {first_word(after[name]):<14} {want}")
        print(f"{'':28} ({pr.replace('{}', s)})")
    e = patch.edits[0]
    print(f"\n|Δ|_F = {e.delta_fro:.4g} on {e.module}; patch = rank {e.rank}, B {list(e.B.shape)} and A {list(e.A.shape)} "
          f"({e.B.numel() + e.A.numel()} floats); "
          f"done in {time.perf_counter() - t0:.1f}s")
    ok = says(after["edited prompt"], target)
    print("edit took effect" if ok else "edit did NOT take effect")
    return 0 if ok else 1
