"""Build a testbed directory end to end: world -> tokenizer -> model -> training -> check.

The directory is built in a temporary sibling and moved into place with os.replace, so a
failed or interrupted build never leaves a half-written model where one is expected.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from rankone.core.atomic import apart_from_inputs, atomic_dir
from rankone.core.errors import RankoneError
from rankone.testbed.check import evaluate_world
from rankone.testbed.train import (ARCHS, TrainConfig, build_model, build_tokenizer,
                                   default_config, save_testbed, train)
from rankone.testbed.counterfact import counterfact_world
from rankone.testbed.world import SIZES, World, check_profile_style, corpus_lines, synthetic_world


def build_world(spec: str | World, seed: int = 0) -> World:
    """'small' | 'bench' | 'counterfact:PATH[:N]' (or a World, returned as is)."""
    if isinstance(spec, World):
        return spec
    if not isinstance(spec, str) or not spec:
        raise RankoneError(f"world must be a name or spec string, not {spec!r}")
    return parse_world_spec(spec, seed)


def edit_layer_for(n_layer: int) -> int:
    """The MLP layer ROME should edit. Measured on 4-layer testbeds (10 r-ROME edits each,
    default hyper-parameters): layer 0 flipped 4-7/10, layer 1 3/10 (its value vector hits the
    norm clamp), the last layer cannot work. Deeper models: a quarter of the way up, minus one."""
    return max(0, n_layer // 4 - 1)


def edit_hparams_for(world: World) -> dict[str, Any]:
    """The hyper-parameters the testbed recommends to the engine (written to world.json, read by
    `rankone edit`). A new fact needs a value shift several times the size of these 4-layer
    models' MLP output, which Adam's fixed step reaches only after tens of steps: ROME's 20 (and
    MEMIT's 25) value steps often stop short, 100 do not (BENCHMARKS.md, testbed section). The
    mean p(target) over the prefixed prompts then levels off near 0.9-0.95, below ROME's early
    stop of 0.99, because many of the model's own prefixes repeat words of the subject's name
    (names are made from a small pool of words); so it stops at 0.9, which flips as many facts
    in half the steps (BENCHMARKS.md, "rankone demo: time and value steps")."""
    return {"v_steps": 100, "early_stop_prob": 0.9} if world.kind == "synthetic" else {}


def _check_out_dir(out: Path) -> None:
    apart_from_inputs(out, [])  # never the folder the user is in (it cannot be replaced by a rename)
    if out.exists() and not out.is_dir():
        raise RankoneError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / "world.json").is_file():
        raise RankoneError(f"--out {out} is a non-empty directory that is not a testbed; "
                           "choose an empty or new directory")


def build_testbed(world: str | World, arch: str = "gpt2", out_dir: str | os.PathLike[str] = "",
                  seed: int = 0, time_budget_s: float | None = None,
                  config: TrainConfig | None = None, verbose: bool = True) -> dict[str, Any]:
    """Train a model that knows `world` and write it to `out_dir`. Returns the build report."""
    if arch not in ARCHS:
        raise RankoneError(f"unknown arch {arch!r}; use one of {', '.join(ARCHS)}")
    if not out_dir:
        raise RankoneError("an output directory is required (--out DIR)")
    if time_budget_s is not None and not 0 < time_budget_s < 1e9:  # inf or 1e300 s: no sensible budget
        raise RankoneError(f"--time-budget must be a positive number of seconds, "
                           f"not {time_budget_s}")
    out = Path(out_dir).resolve()
    _check_out_dir(out)
    w = build_world(world, seed)  # validates the spec before anything is written
    cfg = config or default_config(w, arch)
    cfg = dataclasses.replace(cfg, arch=arch, seed=seed)
    if time_budget_s is not None:
        cfg = dataclasses.replace(cfg, time_budget_s=float(time_budget_s))

    def log(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    w.profile_style = check_profile_style(cfg.profile_style)  # before the corpus and tokenizer

    t0 = time.monotonic()
    lines = corpus_lines(w, cfg.filler_ratio)
    objects = sorted({o for r in w.relations for o in r.objects}
                     | {str(r.get("target_new", "")).strip() for r in w.records} - {""})
    tok = build_tokenizer(lines, objects, cfg)
    model = build_model(cfg, tok)
    log(f"world {w.name}: {len(w.facts)} facts, {len(w.subjects)} subjects, "
        f"{len(lines)} corpus lines; {cfg.arch} {cfg.n_layer}x{cfg.n_embd}, vocab {len(tok)}")
    rep = train(model, tok, w, cfg, log=log, progress=verbose)
    t_eval = time.monotonic()
    acc = evaluate_world(model, tok, w)  # full evaluation, every fact
    log(f"final accuracy: {acc}")
    w.arch = cfg.arch
    w.edit_layer = edit_layer_for(cfg.n_layer)
    w.edit_hparams = edit_hparams_for(w)
    w.accuracy = {k: round(float(v), 4) for k, v in acc.items()
                  if isinstance(v, float) and not k.startswith("n_")}
    report = {"world": w.name, "kind": w.kind, "arch": cfg.arch, "seed": seed,
              "n_facts": len(w.facts), "n_subjects": len(w.subjects),
              "n_records": len(w.records), "vocab": len(tok),
              "accuracy": w.accuracy, "train": dataclasses.asdict(rep),
              "eval_seconds": round(time.monotonic() - t_eval, 1),
              "build_seconds": round(time.monotonic() - t0, 1), "config": dataclasses.asdict(cfg)}

    with atomic_dir(out, overwrite=True) as tmp:  # the folder appears complete or not at all
        save_testbed(tmp, model, tok, w, cfg, lines)
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    report["out_dir"] = str(out)
    return report


def parse_world_spec(spec: str, seed: int) -> World:
    """'small' | 'bench' | 'counterfact:PATH[:N]' -> World. Raises RankoneError on bad input."""
    if spec in SIZES:
        return synthetic_world(spec, SIZES[spec], seed)
    if spec.startswith("counterfact:"):
        rest = spec[len("counterfact:"):]
        n = None
        head, _, tail = rest.rpartition(":")
        if head and tail.isdigit():
            rest, n = head, int(tail)
        if not rest:
            raise RankoneError("counterfact world needs a path: --world counterfact:PATH[:N]")
        return counterfact_world(rest, seed=seed, n_records=n)
    raise RankoneError(f"unknown world {spec!r}; use one of {', '.join(SIZES)} "
                       "or counterfact:PATH[:N_RECORDS]")
