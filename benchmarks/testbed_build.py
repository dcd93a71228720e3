"""Build the testbed worlds, measure them, and write the figures into BENCHMARKS.md.

    python benchmarks/testbed_build.py                       # small (gpt2, llama), bench, counterfact
    python benchmarks/testbed_build.py --only small-gpt2 small-llama --edits 10

For each world: build time, parameters, training tokens/s, greedy accuracy on training and
held-out phrasings (CounterFact: trained prompts by first token), and - when the editing engine
is installed - how many of N r-ROME edits (fact -> another object of the same relation) flip the
greedy answer. Models go to runs/ (git-ignored). Only the `testbed` section of BENCHMARKS.md
is replaced (or the one named by --section, which holds the table alone).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import table as md_table, write_section  # noqa: E402

CF = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-train.json"

RUNS: dict[str, tuple[str, str]] = {  # name -> (world spec, arch)
    "small-gpt2": ("small", "gpt2"),
    "small-llama": ("small", "llama"),
    "bench-gpt2": ("bench", "gpt2"),
    "counterfact-gpt2": (f"counterfact:{CF}", "gpt2"),
    "counterfact-llama": (f"counterfact:{CF}:1000", "llama"),
}


def edit_flips(model_dir: Path, n: int, seed: int = 0, hparams: dict[str, Any] | None = None) -> dict[str, Any]:
    """r-ROME edits of n random facts to another object of the same relation, one at a time
    on the unedited model: how many make the new object the greedy answer (edited prompt,
    held-out phrasing), how many neighbouring facts (same relation, other subjects) keep theirs,
    how many of the edited subject's other facts keep theirs, and the value steps each edit ran.
    `hparams`: settings over the model card's (none: the card's, as `rankone edit`)."""
    from rankone.edit.editor import Editor
    from rankone.models.load import load_model
    from rankone.artifacts.patch import apply_patch
    from rankone.testbed.check import greedy_hits
    from rankone.testbed.world import World
    from rankone.core.tokens import EditRequest

    world = World.load(model_dir)
    handle = load_model(model_dir)
    model, tok = handle
    rng = random.Random(seed)
    facts = rng.sample(world.facts, n)
    ed = Editor(handle, dict(hparams or {}), progress=False)  # over the model card's, as `rankone edit`
    flips = para = para_n = kept = kept_n = own = own_n = 0
    steps: list[int] = []
    t0 = time.monotonic()
    for f in facts:
        rel = world.relation(f.relation)
        target = rng.choice([o for o in rel.objects if o != f.object])
        prompt = world.prompts(f, "train")[0]
        others = [g for g in world.facts if g.relation == f.relation and g.subject != f.subject]
        nb = rng.sample(others, min(5, len(others)))
        patch = ed.edit([EditRequest.create(prompt, f.subject, target)])
        steps.append(patch.edits[0].diagnostics["value"]["steps"])
        h = apply_patch(model, patch)
        try:
            held = [(p, target) for p in world.prompts(f, "heldout")]
            _, first = greedy_hits(model, tok, [(prompt, target)] + held)
            _, nb_hits = greedy_hits(model, tok, [(world.prompts(g, "train")[0], g.object) for g in nb])
            mine = [g for g in world.facts if g.subject == f.subject and g.relation != f.relation]
            _, own_hits = greedy_hits(model, tok, [(world.prompts(g, "train")[0], g.object) for g in mine])
        finally:
            h.revert()
        flips += first[0]
        para += sum(first[1:])
        para_n += len(first) - 1
        kept += sum(nb_hits)
        kept_n += len(nb_hits)
        own += sum(own_hits)
        own_n += len(own_hits)
    return {"n": n, "flipped": flips, "paraphrase": round(para / max(para_n, 1), 3),
            "neighbours_kept": round(kept / max(kept_n, 1), 3),
            "own_facts_kept": round(own / own_n, 3) if own_n else None,  # CounterFact: often none
            "value_steps": round(sum(steps) / len(steps), 1), "seconds": round(time.monotonic() - t0, 1)}


def run_one(name: str, seed: int, edits: list[int], budget: float | None, reuse: bool) -> dict[str, Any]:
    from rankone.testbed import build_testbed

    spec, arch = RUNS[name]
    out = ROOT / "runs" / f"testbed-{name}"
    if reuse and (out / "report.json").is_file():  # figures of the build already in runs/
        rep = json.loads((out / "report.json").read_text())
    else:
        rep = build_testbed(spec, arch, out, seed=seed, time_budget_s=budget)
    if any(edits):
        try:  # sample i draws its facts with seed i: sample 0 is the test's (10 facts, seed 0)
            rep["edits"] = [edit_flips(out, n, i) for i, n in enumerate(edits) if n]
        except ImportError as e:  # the engine is not installed in this checkout
            rep["edits"] = [{"error": f"engine unavailable: {e}"}]
    return rep


def _pooled(samples: list[dict[str, Any]], key: str) -> str:
    """A rate over all samples, weighted by the number of edits in each."""
    samples = [e for e in samples if e.get(key) is not None]
    n = sum(e["n"] for e in samples)
    return f"{sum(e[key] * e['n'] for e in samples) / n:.3f}" if n else "-"


FINDINGS = ("Exploratory findings from hand runs on variant builds (not reproduced by this command): "
            "[docs/testbed_findings.md](docs/testbed_findings.md).")


HEAD = ["model", "facts", "params", "build s", "tokens/s", "stop", "train acc", "held-out acc",
        "edits flipped", "paraphrase", "neighbours kept", "own other facts kept"]


def table(reps: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, r in reps.items():
        a, tr = r["accuracy"], r["train"]
        edits = r.get("edits", [])
        samples = [e for e in edits if "flipped" in e]
        train_acc = a.get("trained_prompts_first_token", a.get("train"))
        if samples:
            flips = " + ".join(f"{e['flipped']}/{e['n']}" for e in samples)
            if len(samples) > 1:
                flips += f" = {sum(e['flipped'] for e in samples)}/{sum(e['n'] for e in samples)}"
        else:
            flips = next((e["error"] for e in edits if "error" in e), "-")
        rates = [_pooled(samples, k) for k in ("paraphrase", "neighbours_kept", "own_facts_kept")]
        rows.append([name, r["n_facts"], f"{tr['params']:,}", f"{r['build_seconds']:.0f}",
                     f"{tr['tokens_per_s']:,}", tr["stop_reason"], f"{100 * train_acc:.1f} %",
                     f"{100 * a['heldout']:.1f} %", flips, *rates])
    return md_table(HEAD, rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=sorted(RUNS),
                    default=["small-gpt2", "small-llama", "bench-gpt2", "counterfact-gpt2"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edits", type=int, nargs="+", default=[10],
                    help="r-ROME edits per model, one number per sample of facts (sample i is "
                         "drawn with seed i; 0: none)")
    ap.add_argument("--time-budget", type=float, default=None, help="override the presets")
    ap.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    ap.add_argument("--section", default="testbed",
                    help="BENCHMARKS.md section to write; other than 'testbed': the table only, "
                         "for larger edit samples")
    ap.add_argument("--reuse", action="store_true",
                    help="take build figures from runs/testbed-NAME/report.json when present")
    args = ap.parse_args()
    torch.set_num_threads(1)  # 2 shared cores: 1 thread is faster than 2 under contention
    reps: dict[str, dict[str, Any]] = {}
    for name in args.only:
        print(f"== {name}", file=sys.stderr, flush=True)
        reps[name] = run_one(name, args.seed, args.edits, args.time_budget, args.reuse)
        r = reps[name]
        print(json.dumps({k: r[k] for k in ("accuracy", "train", "build_seconds", "edits") if k in r}))
    edits_how = ("Edits: r-ROME with the model's recommended hyper-parameters (world.json: "
                 "`v_steps` 100 for the synthetic worlds; ROME's defaults for the others), each "
                 "fact edited alone on the unedited model, then reverted; a sample of n facts "
                 "per number given to --edits, sample i drawn with seed i (sample 0 is the "
                 "test's). Flipped: the new object is the greedy answer to the edited prompt; "
                 "paraphrase: the same on the fact's held-out phrasing; neighbours kept: 5 "
                 "other subjects' facts of the relation keep their answer; own other facts "
                 "kept: the edited subject's 5 other facts keep theirs.")
    if args.section == "testbed":
        title = "Testbed models (`rankone testbed build`)"
        body = "\n".join([
            "1 torch thread (the 2 cores were shared with other jobs, so times are upper bounds). "
            "Accuracy is greedy top-1 on the object over every fact (CounterFact: every trained "
            "prompt, first token). " + edits_how + " bench-gpt2 and the CounterFact models were "
            "built before profile lines existed.",
            "",
            table(reps),
            "",
            FINDINGS,
        ])
    else:
        title = f"Testbed edits, larger samples ({', '.join(args.only)})"
        body = "\n".join(["1 torch thread. " + edits_how, "", table(reps)])
    print(f"## {title}\n\n{body}")
    if not args.no_write:
        write_section(args.section, title, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
