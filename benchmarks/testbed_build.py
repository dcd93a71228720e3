"""Build the testbed worlds, measure them, and write the figures into BENCHMARKS.md.

    python benchmarks/testbed_build.py                       # small (gpt2, llama), bench, counterfact
    python benchmarks/testbed_build.py --only small-gpt2 small-llama --edits 10

For each world: build time, parameters, training tokens/s, greedy accuracy on training and
held-out phrasings (CounterFact: trained prompts by first token), and - when the editing engine
is installed - how many of N r-ROME edits (fact -> another object of the same relation) flip the
greedy answer. Models go to runs/ (git-ignored). Only the section between the testbed markers
in BENCHMARKS.md is replaced.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
CF = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"
BEGIN, END = "<!-- testbed:begin -->", "<!-- testbed:end -->"

RUNS: dict[str, tuple[str, str]] = {  # name -> (world spec, arch)
    "small-gpt2": ("small", "gpt2"),
    "small-llama": ("small", "llama"),
    "bench-gpt2": ("bench", "gpt2"),
    "counterfact-gpt2": (f"counterfact:{CF}", "gpt2"),
    "counterfact-llama": (f"counterfact:{CF}:1000", "llama"),
}


def edit_flips(model_dir: Path, n: int, seed: int = 0) -> dict[str, Any]:
    """r-ROME edits of n random facts to another object of the same relation, one at a time
    on the unedited model: how many make the new object the greedy answer (edited prompt,
    held-out phrasing), and how many neighbouring facts keep theirs."""
    from rankone.editor import Editor
    from rankone.hparams import EditHParams
    from rankone.models import load_model
    from rankone.patch import apply_patch
    from rankone.testbed.check import greedy_hits
    from rankone.testbed.world import World
    from rankone.tokens import EditRequest

    world = World.load(model_dir)
    model, tok = load_model(model_dir)
    rng = random.Random(seed)
    facts = rng.sample(world.facts, n)
    ed = Editor(model, tok, EditHParams.for_model(model), progress=False)  # as `rankone edit` does
    flips = para = para_n = kept = kept_n = 0
    t0 = time.monotonic()
    for f in facts:
        rel = world.relation(f.relation)
        target = rng.choice([o for o in rel.objects if o != f.object])
        prompt = world.prompts(f, "train")[0]
        others = [g for g in world.facts if g.relation == f.relation and g.subject != f.subject]
        nb = rng.sample(others, min(5, len(others)))
        patch = ed.edit([EditRequest.create(prompt, f.subject, target)])
        h = apply_patch(model, patch)
        try:
            held = [(p, target) for p in world.prompts(f, "heldout")]
            _, first = greedy_hits(model, tok, [(prompt, target)] + held)
            _, nb_hits = greedy_hits(model, tok, [(world.prompts(g, "train")[0], g.object) for g in nb])
        finally:
            h.revert()
        flips += first[0]
        para += sum(first[1:])
        para_n += len(first) - 1
        kept += sum(nb_hits)
        kept_n += len(nb_hits)
    return {"n": n, "flipped": flips, "paraphrase": round(para / max(para_n, 1), 3),
            "neighbours_kept": round(kept / max(kept_n, 1), 3),
            "seconds": round(time.monotonic() - t0, 1)}


def run_one(name: str, seed: int, edits: int, budget: float | None, reuse: bool) -> dict[str, Any]:
    from rankone.testbed import build_testbed

    spec, arch = RUNS[name]
    out = ROOT / "runs" / f"testbed-{name}"
    if reuse and (out / "report.json").is_file():  # figures of the build already in runs/
        rep = json.loads((out / "report.json").read_text())
    else:
        rep = build_testbed(spec, arch, out, seed=seed, time_budget_s=budget)
    if edits:
        try:
            rep["edits"] = edit_flips(out, edits, seed)
        except ImportError as e:  # the engine is not installed in this checkout
            rep["edits"] = {"error": f"engine unavailable: {e}"}
    return rep


NOTES = """
Findings while building these (same machine, same day; 10-40 edits each, so about ±10 %). The flip counts on
variant builds are exploratory: `edit_flips(model_dir, n, seed)` from this script, run by hand on models built
with `build_testbed` and the variant setting (seed 0 = the test's 10 facts; seeds 1 and 2 = 40 facts each);
only the table above is reproduced by the command:

- **Profile lines put the facts where ROME edits them.** Before them, a value optimisation at
  the subject's last token often could not reach the new object at all, whatever δ: the loss
  floored at 4-5 nats after 300 steps at any learning rate, with the norm clamp far away. The
  4-layer model looked facts up at the answer position from the raw name tokens. Lines that
  list a subject's objects right after its name, in a random order and with no relation words
  ("Varo Telnik Paris tennis French piano red Nokia.", 4 per subject), require the name's last
  token to carry all of its facts. Same world, GPT-2, layer 0, 20 edits: **17/20 -> 20/20**
  greedy flips (100 steps), 18/20 already with ROME's 20 steps. Accuracy is unchanged.
- The built-ins recommend `v_steps` 100 in world.json. GPT-2, 40 edits: 37/40 flips with 20
  steps or 100, paraphrases 0.95 / 0.975, and 10/10 on the test's 10-fact sample.
- Llama, 100 steps, flips on the test's 10 facts / 40 others / 40 more: label smoothing 0.1
  6/10, 36/40, not run; 0.2 9/10, 35/40, 33/40; **none (the built-in) 7/10, 38/40, 36/40**,
  81/90 in all. 8 profile lines instead of 4: 6/10, 26/40. Layer 1: 3/20. The failures are
  value optimisations that stall (instrument and colour facts in the test's sample).
- **Names.** A word unique to each name lets the model read the subject off the raw token at the
  answer position, and edits at the subject fail: 5/30. Names built in order from a small pool
  of words need composing at the subject's tokens: 18/30.
- Layer 1 of 4 hits the norm clamp (GPT-2 3/10, Llama 3/20), so 4-layer testbeds edit layer 0.
  Label smoothing 0.1 raised GPT-2 flips from 4/10 to 7/10 before profile lines existed.
- **CounterFact.** The CounterFact worlds (no profile lines) know 97-98 % of their trained
  prompts, but r-ROME flips 1/10. The single-edit table (eval_single_counterfact) agrees, with
  ES 0.03. Real names identify the subject from raw tokens. Profile lines were not tried on
  CounterFact.
"""


def table(reps: dict[str, dict[str, Any]]) -> str:
    head = ("| model | facts | params | build s | tokens/s | stop | train acc | held-out acc "
            "| edits flipped | paraphrase | neighbours kept |\n|" + "---|" * 11)
    rows = []
    for name, r in reps.items():
        a, tr, e = r["accuracy"], r["train"], r.get("edits", {})
        train_acc = a.get("trained_prompts_first_token", a.get("train"))
        flip = f"{e['flipped']}/{e['n']}" if "flipped" in e else e.get("error", "-")
        rows.append(f"| {name} | {r['n_facts']} | {tr['params']:,} | {r['build_seconds']:.0f} "
                    f"| {tr['tokens_per_s']:,} | {tr['stop_reason']} | {100 * train_acc:.1f} % "
                    f"| {100 * a['heldout']:.1f} % | {flip} | {e.get('paraphrase', '-')} "
                    f"| {e.get('neighbours_kept', '-')} |")
    return "\n".join([head] + rows)


def write_section(text: str, path: Path) -> None:
    old = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n"
    block = f"{BEGIN}\n{text.rstrip()}\n{END}"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(RUNS),
                    default=["small-gpt2", "small-llama", "bench-gpt2", "counterfact-gpt2"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edits", type=int, default=10, help="r-ROME edits per model (0: none)")
    ap.add_argument("--time-budget", type=float, default=None, help="override the presets")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    ap.add_argument("--reuse", action="store_true",
                    help="take build figures from runs/testbed-NAME/report.json when present")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # 2 shared cores: 1 thread is faster than 2 under contention
    reps: dict[str, dict[str, Any]] = {}
    for name in args.only:
        print(f"== {name}", file=sys.stderr, flush=True)
        reps[name] = run_one(name, args.seed, args.edits, args.time_budget, args.reuse)
        r = reps[name]
        print(json.dumps({k: r[k] for k in ("accuracy", "train", "build_seconds", "edits") if k in r}))
    cmd = "python benchmarks/testbed_build.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    text = "\n".join([
        "## Testbed models (`rankone testbed build`)",
        "",
        f"Command: `{cmd.strip()}` on {platform.machine()} CPU, "
        "1 torch thread (the 2 cores were shared with other jobs, so times are upper bounds). Accuracy is greedy top-1 on the object over every fact "
        "(CounterFact: every trained prompt, first token). Edits: r-ROME with the model's "
        "recommended hyper-parameters (world.json: `v_steps` 100 for the synthetic worlds built "
        "now; ROME's defaults for the others), each fact edited alone on the unedited model; "
        "bench-gpt2 and the CounterFact models were built before profile lines existed.",
        "",
        table(reps),
        NOTES,
    ])
    print(text)
    if not args.no_write:
        write_section(text, ROOT / "BENCHMARKS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
