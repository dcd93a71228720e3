"""Sequential editing, ROME against r-ROME: N edits without reverting, measured every k edits.

Runs `rankone bench sequential` once per method (in parallel processes, one torch thread each),
then overlays the runs: PNGs into docs/sequential_NAME_*.png, the summary into BENCHMARKS.md
(section sequential_NAME). Resumable: rerun the same command after an interruption.

    python benchmarks/sequential.py --model runs/bench-gpt2 --cases runs/bench-gpt2 --n 1000 --name bench

A --methods entry LABEL=DIR (DIR under runs/sequential/) adds a run made elsewhere, e.g. the same
method with other --hparams, to the report under LABEL; it is not run by this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, write_section  # noqa: E402

from rankone.eval.plots import report  # noqa: E402
from rankone.eval.sequential import read_run  # noqa: E402
from rankone.methods.base import method  # noqa: E402
from rankone.methods.memit import GPTJ_D_IN, GPTJ_LAMBDA  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"


def denominators(runs: dict[str, Path], upto: int | None = None) -> str:
    """The mechanism in numbers: ROME's denominator against r-ROME's over the same requests
    (the first `upto` edits where given)."""
    lines = []
    for m, d in runs.items():
        ed = [r for r in read_run(d)[1] if r["type"] == "edit" and r.get("denom_mean_mean")
              and (upto is None or r["i"] < upto)]
        if not ed:
            continue
        ratio = sorted(r["denom_bare_mean"] / r["denom_mean_mean"] for r in ed)
        cos = [r["key_cosine"] for r in ed]
        w0 = ed[0]["weight_fro"]  # ‖W₀‖: the first update sees the unedited weight
        rel = sorted(r["delta_fro"] / w0 for r in ed)
        lines.append(
            f"| {m} | {len(ed)} | {statistics.median(r['denom_mean_mean'] for r in ed):.4g} | "
            f"{statistics.median(r['denom_bare_mean'] for r in ed):.4g} | {ratio[0]:.3g} | {statistics.median(ratio):.3g} | "
            f"{sum(x < 0.1 for x in ratio)} | {min(cos):.3f} / {statistics.mean(cos):.3f} | "
            f"{statistics.median(rel):.3g} / {rel[-1]:.3g} |")
    if not lines:  # no ROME-family run: nothing to show
        return ""
    head = ("| run | updates | median k̄ᵀC⁻¹k̄ (r-ROME) | median k_oᵀC⁻¹k̄ (ROME) | min ratio ROME/r-ROME | median ratio | "
            "ratio < 0.1 | key cosine min / mean | ‖Δ‖/‖W₀‖ median / max |\n|---|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(lines)


def method_words(label: str, settings: dict) -> str:
    """How one run edited, from its run.json."""
    hp, method = settings["hparams"], settings["method"]
    span = (f"layers {settings['layers'][0]}–{settings['layers'][-1]}" if len(settings.get("layers") or []) > 1
            else f"layer {settings['layer']}")
    where = (f"{span} in batches of {settings['config'].get('batch_size', 1)}"
             if settings.get("layers") else f"layer {settings['layer']}, one edit at a time")
    null = lambda: (f"null space holding ≤ {hp['nullspace_energy']:g} of the key energy"  # noqa: E731
                    if hp.get("nullspace_energy") else f"null-space threshold {hp['nullspace_threshold']:g}")
    extra = {"alphaedit": lambda: f", {null()}, α {hp['l2']:g}",
             "memit": lambda: f", λ {hp['mom2_update_weight']:g}" if hp.get("mom2_update_weight")
             else f", λ = {GPTJ_LAMBDA:g} · d_in / {GPTJ_D_IN} (the default)",
             "emmet": lambda: f", emmet_lambda {hp['emmet_lambda']:g}"}.get(method, lambda: "")()
    return f"{label} at {where} (v_steps {hp['v_steps']}, {hp['stats_tokens']:,} statistics tokens{extra})"


def gs_words(cfg: dict) -> str:
    if not cfg.get("gs_sample"):
        return ""
    return (f"; generation-based success on {cfg['gs_sample']} fixed edited cases spread over the run (greedy "
            f"{cfg['gs_tokens']} tokens of the prompt / its paraphrase state the new target)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--methods", default="rome,r-rome", help="comma-separated; LABEL=DIR adds a run from runs/sequential/DIR")
    ap.add_argument("--name", required=True)
    ap.add_argument("--title", default=None)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--hparams", default=None)
    ap.add_argument("--guard", action="store_true", help="refuse anomalous updates (default here: off, to show them)")
    ap.add_argument("--known-only", action="store_true")
    ap.add_argument("--glue", default=None, help="GLUE folder: few-shot scores at the start and the end of each run")
    ap.add_argument("--batch-size", type=int, default=100, help="edits per batch for the batch methods (memit, alphaedit, emmet)")
    ap.add_argument("--heldout-chars", type=int, default=0,
                    help="held-out perplexity on the last N characters of ../shared/data/text/tinyshakespeare.txt "
                         "(written to the run folder and passed as --ppl-text)")
    ap.add_argument("--extra", default="", help="more `rankone bench sequential` options, e.g. '--gs-sample 100'")
    ap.add_argument("--serial", action="store_true", help="one method after the other instead of in parallel")
    ap.add_argument("--report-only", action="store_true", help="only redraw the figures and the section")
    ap.add_argument("--upto", type=int, default=None, help="report the runs as they stood after this many edits")
    ap.add_argument("--note", default="", help="a sentence of interpretation appended to the section")
    args = ap.parse_args()

    out = ROOT / "runs" / "sequential" / args.name
    out.mkdir(parents=True, exist_ok=True)
    entries = [m.partition("=") for m in args.methods.split(",")]
    methods = [m for m, _, d in entries if not d]  # the ones this script runs
    places = {m: (ROOT / "runs" / "sequential" / d if d else out / m) for m, _, d in entries}
    if not args.report_only:
        procs = []
        for m in methods:
            cmd = [sys.executable, "-m", "rankone.cli.main", "bench", "sequential", "--model", args.model, "--cases", args.cases,
                   "--n", str(args.n), "--every", str(args.every), "--method", m, "--out", str(out)]
            cmd += ["--known-only"] if args.known_only else []
            cmd += [] if args.guard else ["--no-guard"]
            cmd += ["--layer", str(args.layer)] if args.layer is not None else []
            cmd += ["--hparams", args.hparams] if args.hparams else []
            cmd += ["--glue", args.glue] if args.glue else []
            cmd += [] if method(m).one_at_a_time else ["--batch-size", str(args.batch_size)]
            if args.heldout_chars:
                held = out / f"heldout-tinyshakespeare-{args.heldout_chars}.txt"
                if not held.is_file():
                    held.write_text(SHAKESPEARE.read_text()[-args.heldout_chars:])
                cmd += ["--ppl-text", str(held)]
            cmd += shlex.split(args.extra)
            log = open(out / f"{m}.log", "a")
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"started {m}: pid {p.pid}, log {out / (m + '.log')}", flush=True)
            procs.append((m, p))
            if args.serial:
                p.wait()
        for m, p in procs:
            if p.wait() != 0:
                raise SystemExit(f"{m} failed (exit {p.returncode}); see {out / (m + '.log')}")
    runs = {m: d for m, d in places.items() if (d / "run.jsonl").is_file()}
    title = args.title or Path(args.model).name
    rep = report(runs, out, title=title, upto=args.upto)
    docs = ROOT / "docs"
    figs = []
    for f in rep["figures"]:
        dst = docs / f"sequential_{args.name}_{f.name}"
        shutil.copyfile(f, dst)
        figs.append(dst)
    md = rep["markdown"].split("\n\n", 1)[1].split("\n\n![")[0]
    first = read_run(next(iter(runs.values())))[0]
    cfg = first["config"]
    dens = denominators(runs, args.upto)
    mechanism = ("The mechanism: the denominators of every update (all three are recorded whichever ROME variant "
                 f"wrote it).\n\n{dens}\n" if dens else "")
    how = "; ".join(method_words(m, read_run(d)[0]) for m, d in runs.items())
    body = f"""Model `{Path(args.model).name}`, cases `{args.cases}`{' (only those whose true answer the model gives)' if args.known_only else ''};
{args.upto or args.n} edits one after another without reverting, each method on its own copy of the model: {how};
{'guard on' if args.guard else 'guard off (anomalous updates are written and flagged)'}.
Measured every {args.every} edits: ES of the newest edits; ES and PS of earlier edits (an evenly spaced sample of
≤ {cfg['retention_sample']} of them{', i.e. all' if cfg['retention_sample'] >= args.n else ''}; "kept" = among those that worked when made);
never-edited facts (top-1 on ≤ {cfg['probe_sample']} later cases the unedited model knows, never edited); NS ({cfg['ns_sample']} fixed
cases' neighbours){gs_words(cfg)}; fluency (n-gram entropy of {cfg['gen_prompts']} prompts × {cfg['gen_tokens']} sampled
tokens); held-out perplexity; ‖W − W₀‖_F. A ‖Δ‖ spike = an update above 10× the running median of the earlier ones.

{md}

{mechanism}
{chr(10).join(f"![{f.stem}](docs/{f.name})" for f in figs)}

{args.note}

Runs, JSONL and checkpoints: {", ".join(f"`{d.relative_to(ROOT)}/`" for d in runs.values())} (not committed). Each method's wall time (the table) is summed from its records, over resumes.
"""
    print(body)
    write_section(f"sequential_{args.name}", f"Sequential editing, {' vs '.join(runs)} — {title}", body)
    (out / "section.md").write_text(body)
    print(json.dumps({"figures": [str(f) for f in figs]}))


if __name__ == "__main__":
    main()
