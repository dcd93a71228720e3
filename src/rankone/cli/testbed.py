"""`rankone testbed build|check`: a thin layer over rankone.testbed. Bad input -> RankoneError."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rankone.core.errors import RankoneError


def register(subparsers: Any) -> None:
    """Add the `testbed` command to the main parser's subparsers."""
    p = subparsers.add_parser("testbed", help="build and check the built-in knowledge testbed models",
                              description="Small models trained by rankone that know a world of facts.")
    sub = p.add_subparsers(dest="testbed_command", metavar="{build,check}")
    sub.required = True

    b = sub.add_parser("build", help="train a model on a world and write a model directory")
    b.add_argument("--world", default="small",
                   help="small | bench | counterfact:PATH[:N_RECORDS] (default small)")
    b.add_argument("--arch", default="gpt2", help="gpt2 (default) or llama")
    b.add_argument("--seed", type=int, default=0, help="seed of the world and the training (default 0)")
    b.add_argument("--time-budget", type=float, default=None, dest="time_budget",
                   help="training time limit in seconds (default: the world's preset)")
    b.add_argument("--out", default=None,
                   help="output directory (default runs/testbed-WORLD-ARCH); replaced atomically")
    b.add_argument("--json", action="store_true", help="print the build report as JSON")
    b.set_defaults(func=_build)

    c = sub.add_parser("check", help="greedy fact accuracy of a testbed model directory")
    c.add_argument("dir", help="testbed model directory (holds world.json)")
    c.add_argument("--json", action="store_true", help="print the figures as JSON")
    c.set_defaults(func=_check)


def _fmt(x: Any) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, float) and not math.isnan(x) else str(x)


def _build(args: argparse.Namespace) -> int:
    from rankone.testbed.build import build_testbed

    world = str(args.world)
    out = args.out
    if out is None:
        tag = "counterfact" if world.startswith("counterfact:") else world
        out = str(Path("runs") / f"testbed-{tag}-{args.arch}")
    rep = build_testbed(world, args.arch, out, seed=args.seed, time_budget_s=args.time_budget)
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    tr = rep["train"]
    acc = rep["accuracy"]
    print(f"built {rep['out_dir']}: {rep['world']} world ({rep['n_facts']} facts, "
          f"{rep['n_subjects']} subjects), {rep['arch']}, {tr['params']:,} parameters")
    print(f"  trained {tr['train_seconds']:.0f}s ({tr['steps']} steps, {tr['epochs']} epochs, "
          f"{tr['tokens_per_s']:,} tokens/s), stopped: {tr['stop_reason']}")
    print(f"  accuracy: training phrasings {_fmt(acc.get('train'))}, "
          f"held-out phrasings {_fmt(acc.get('heldout'))}")
    if "trained_prompts_first_token" in acc:
        print(f"  trained prompts (first token) {_fmt(acc['trained_prompts_first_token'])}, "
              f"rephrase {_fmt(acc.get('rephrase_first_token'))}, "
              f"locality {_fmt(acc.get('locality_first_token'))}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from rankone.testbed.check import check_testbed

    if not Path(args.dir).is_dir():
        raise RankoneError(f"testbed directory not found: {args.dir}; build one with "
                           "`rankone testbed build --out DIR`")
    res = check_testbed(args.dir)
    if args.json:
        print(json.dumps(res, indent=1))
        return 0
    print(f"{args.dir}: {res['world']} world, {res['arch']}, {res['n_facts']} facts")
    print(f"  training phrasings: {_fmt(res['train'])} of {res['n_train_prompts']} prompts "
          "(greedy reproduces the object)")
    print(f"  held-out phrasings: {_fmt(res['heldout'])} of {res['n_heldout_prompts']} prompts")
    for k in ("trained_prompts_first_token", "records_first_token", "rephrase_first_token",
              "locality_first_token"):
        if k in res:
            print(f"  {k.replace('_', ' ')}: {_fmt(res[k])}")
    return 0
