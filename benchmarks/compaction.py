"""Thousands of edits without decay: compaction and the key statistics, against AlphaEdit in sequence.

Each row is one `rankone bench sequential` run on the same known CounterFact cases with the
settings of the section "Sequential editing, alphaedit vs memit vs r-rome — SmolLM2-135M, 1,000
CounterFact edits" (layer 3, guard off, 100,000 statistics tokens of tinyshakespeare unless the
row says otherwise, the same samples and held-out text); that section's AlphaEdit column is the
baseline row, read from BENCHMARKS.md, not run again (only when --n is its 1,000). Rows are
LABEL=OPTIONS, the options added to the common ones (`--stats-corpus sampled:N`: N tokens sampled
from the model itself, seed 0, drawn once, resumable and cached), e.g.

    --row 'AlphaEdit, compacted every 200 (EMMET)=--method alphaedit --batch-size 100 --compact-every 200'
    --row 'one joint solve of all 1,000 (AlphaEdit)=--method alphaedit --batch-size 1000 --every 1000'

Runs go to runs/sequential/NAME/<row slug>/; rerunning the command resumes each one from its
checkpoints (rows run one after the other, niced), then writes the section compaction_NAME.
`--report-only` only reads the runs (a row not finished is shown at its last evaluation point).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import BENCH, ROOT, shown, table, write_section  # noqa: E402

from rankone.eval.plots import summarize_run  # noqa: E402
from rankone.eval.sequential import read_run  # noqa: E402

SHAKESPEARE = ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt"
BASELINE = "sequential_smollm2-1000"
# the targets after 1,000 edits (ns and perplexity relative to the unedited model)
TARGETS = {"efficacy": 0.95, "paraphrase": 0.85, "ns_ratio": 0.9, "never_edited": 0.9, "ppl_rise": 0.10}


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:60]


def baseline_row(n: int) -> dict | None:
    """The AlphaEdit column of the 1,000-edit section, as that section's table states it."""
    text = BENCH.read_text()
    m = re.search(rf"<!-- {BASELINE}:begin -->(.*?)<!-- {BASELINE}:end -->", text, re.S)
    if not m:
        return None
    rows = {}
    head = None
    for line in m.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| |"):
            head = cells[1:]
        elif head and line.startswith("| ") and len(cells) == len(head) + 1:
            rows[cells[0]] = dict(zip(head, cells[1:]))
    col = next((h for h in head or [] if h.startswith("alphaedit")), None)
    if col is None:
        return None
    num = lambda s: [float(x.replace(",", "")) for x in re.findall(r"[\d.,]+(?:e[+-]?\d+)?", s)]  # noqa: E731
    ret = num(rows["retention ES / kept / top-1 at the end"][col])
    gs = num(rows["generation-based success (prompt / paraphrase) at the end"][col])
    batch = int(num(col)[-1])
    return {"efficacy": ret[0], "paraphrase": num(rows["PS of earlier edits at the end"][col])[0],
            "ns": num(rows["NS start → end"][col]), "gs": gs[0], "gps": gs[1],
            "never_edited": num(rows["never-edited top-1 start → end"][col]),
            "ppl": num(rows["perplexity start → end"][col]), "w_dist": num(rows["‖W − W₀‖_F at the end"][col])[0],
            "hours": num(rows["wall time of the run (edits + evaluations)"][col])[0],
            "served": f"{n} ({n // batch} deltas of rank {batch})", "n": n}


def run_row(run_dir: Path) -> dict:
    settings, recs = read_run(run_dir)
    s = summarize_run(settings, recs)
    evals = [r for r in recs if r["type"] == "eval"]
    last = evals[-1] if evals else {}
    comp = [r for r in recs if r["type"] == "compact"]
    served = last.get("served_rank")
    return {"efficacy": s["retention_es_end"], "paraphrase": s.get("retention_ps_end"),
            "ns": [s["ns_start"], s["ns_end"]], "gs": s.get("gs_end"), "gps": s.get("gps_end"),
            "never_edited": [s["probe_top1_start"], s["probe_top1_end"]],
            "ppl": [s["perplexity_start"], s["perplexity_end"]], "w_dist": s["w_dist_end"],
            "hours": s["wall_seconds"] / 3600, "n": last.get("n", 0),
            "served": "–" if served is None else f"{served} ({_deltas(settings, comp, last.get('n', 0))})",
            "compactions": len(comp), "compact_seconds": sum(r["seconds"] for r in comp),
            "compact_error": max((r["constraint_error"] for r in comp), default=None)}


def _deltas(settings: dict, comp: list[dict], n: int) -> str:
    """How many deltas a module carries at the end: one per batch since the last compaction, plus it."""
    batch = settings["config"].get("batch_size", 1)
    since = n - max((r["n"] for r in comp), default=0)
    k = since // batch + (1 if comp else 0)
    return f"{k} delta{'s' if k != 1 else ''}"


def fmt(x: object, nd: int = 3) -> str:
    if x is None:
        return "–"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def verdicts(label: str, r: dict) -> str:
    """Each target met or missed, with its figure."""
    ns0, ns1 = r["ns"]
    p0, p1 = r["ppl"]
    checks = [("efficacy ≥ 0.95", r["efficacy"], r["efficacy"] is not None and r["efficacy"] >= TARGETS["efficacy"]),
              ("paraphrase ≥ 0.85", r["paraphrase"], r["paraphrase"] is not None and r["paraphrase"] >= TARGETS["paraphrase"]),
              (f"NS ≥ 0.9 × {ns0:.3f} = {0.9 * ns0:.3f}", ns1, ns1 is not None and ns1 >= TARGETS["ns_ratio"] * ns0),
              ("never-edited top-1 ≥ 0.9", r["never_edited"][1],
               r["never_edited"][1] is not None and r["never_edited"][1] >= TARGETS["never_edited"]),
              (f"perplexity ≤ 1.1 × {p0:.1f} = {1.1 * p0:.1f}", p1, p1 is not None and p1 <= (1 + TARGETS["ppl_rise"]) * p0)]
    parts = [f"{name}: {'met' if ok else 'missed'} ({fmt(v)})" for name, v, ok in checks]
    return f"- {label} (after {r['n']} edits): " + "; ".join(parts)


def sampled(model: str, spec: str) -> str:
    """`sampled:N` as a row's --stats-corpus: N tokens sampled from the model itself (seed 0, what
    `rankone edit` samples without a corpus), drawn once, resumable and cached; its file."""
    from rankone.methods.corpus import sampled_corpus
    from rankone.models.load import load_model

    h = load_model(os.path.expanduser(model))
    return str(sampled_corpus(h.model, h.tokenizer, int(spec.split(":", 1)[1]), seed=0))


def posthoc(source: Path, method: str, targets: str, hparams: dict, held: Path) -> dict:
    """A finished run's patch compacted once at its end (from the base weights, against the run's
    own C) and evaluated exactly as the run evaluates: the run rebuilt from its run.json, cases
    (matched by id), probes and edit records. Kept in posthoc-METHOD-TARGETS.json beside the run."""
    import json

    from rankone.artifacts.patch import Patch, apply_patch
    from rankone.core import architectures as arch
    from rankone.edit.compaction import CompactSettings, compact
    from rankone.eval.cases import load_cases
    from rankone.eval.sequential import SequentialConfig, SequentialRun
    from rankone.models.load import load_model

    out = source / f"posthoc-{method}-{targets}.json"
    if out.is_file():
        return json.loads(out.read_text())
    settings, recs = read_run(source)
    edits = [r for r in recs if r["type"] == "edit"]
    n = edits[-1]["i"] + 1
    patch = Patch.load(source / "checkpoint" / "patch")
    by_id = {c.case_id: c for c in load_cases(settings["meta"]["cases"])}
    h = load_model(settings["meta"]["model"])
    probes = [tuple(p) for p in json.loads((source / "probes.json").read_text())]
    run = SequentialRun(h, [by_id[r["case_id"]] for r in edits], settings["hparams"], source / "unused",
                        SequentialConfig.from_dict(settings["config"]), probes, held.read_text(), settings["meta"],
                        patch.edits[0].diagnostics["stats"]["corpus"], progress=False)
    run.lines = edits + [r for r in recs if r["type"] == "eval" and r["n"] == 0]
    run.w0 = {p: arch.weight_oi(arch.get_module(h.model, p)).detach().double().clone() for p in run.paths}
    done = compact(h, [patch], CompactSettings(method, targets, hparams), context=run.editor.context, replaces=[],
                   progress=False)
    applied = apply_patch(h.model, done.patch, h.spec)
    try:
        rec = run.evaluate(n)
    finally:
        applied.revert()
    rec.update(served_rank=max(e.rank for e in done.patch.edits), compact_seconds=done.seconds,
               constraint_error=done.max_constraint_error, source=str(source.relative_to(ROOT)))
    out.write_text(json.dumps(rec))
    return rec


def posthoc_row(base: dict, rec: dict) -> dict:
    """A post-hoc compaction as a row: its evaluation, the source run's start and time."""
    return dict(base, efficacy=rec.get("retention_es"), paraphrase=rec.get("retention_ps"),
                ns=[base["ns"][0], rec.get("ns")], gs=rec.get("gs"), gps=rec.get("gps"),
                never_edited=[base["never_edited"][0], rec.get("probe_top1")],
                ppl=[base["ppl"][0], rec.get("perplexity")], w_dist=rec.get("w_dist"),
                hours=base["hours"] + (rec["seconds"] + rec["compact_seconds"]) / 3600,
                served=f"{rec['served_rank']} (1 delta)", compactions=1, compact_seconds=rec["compact_seconds"],
                compact_error=rec["constraint_error"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--name", required=True)
    ap.add_argument("--row", action="append", default=[], help="LABEL=OPTIONS (repeat); OPTIONS are added to the common ones")
    ap.add_argument("--heldout-chars", type=int, default=30000)
    ap.add_argument("--common", default="--known-only --known-by over-new --layer 3 --no-guard --stats-tokens 100000 "
                                         "--retention-sample 1000 --ns-sample 200 --probe-sample 100 --gs-sample 100 "
                                         "--gen-prompts 8 --gen-tokens 40",
                    help="options every row shares (the baseline's)")
    ap.add_argument("--stats-corpus", default=str(SHAKESPEARE), help="the rows' default statistics corpus")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--posthoc", action="append", default=[],
                    help="LABEL=ROW LABEL;METHOD;TARGETS[;HPARAMS JSON]: that row's finished run compacted once at its "
                         "end and evaluated the same way (repeat)")
    ap.add_argument("--parallel", action="store_true", help="run the rows at once (default: one after the other)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--note", default="", help="sentences of interpretation appended to the section")
    args = ap.parse_args()

    out = ROOT / "runs" / "sequential" / args.name
    out.mkdir(parents=True, exist_ok=True)
    held = out / f"heldout-tinyshakespeare-{args.heldout_chars}.txt"
    if not held.is_file():
        held.write_text(SHAKESPEARE.read_text()[-args.heldout_chars:])
    rows = [r.partition("=") for r in args.row]
    procs = []
    for label, _, opts in ([] if args.report_only else rows):
        extra = [sampled(args.model, a) if a.startswith("sampled:") else a for a in shlex.split(opts)]
        cmd = [sys.executable, "-m", "rankone.cli.main", "bench", "sequential", "--model", args.model, "--cases",
               args.cases, "--n", str(args.n), "--every", str(args.every), "--out", str(out / slug(label)),
               "--ppl-text", str(held), "--quiet", *shlex.split(args.common)]
        cmd += [] if "--stats-corpus" in extra else ["--stats-corpus", args.stats_corpus]
        cmd += extra
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        print(f"{label}: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        log = open(out / f"{slug(label)}.log", "a")
        procs.append((label, subprocess.Popen(["nice", "-n", "10", *cmd], stdout=log, stderr=subprocess.STDOUT, env=env)))
        if not args.parallel:
            procs[-1][1].wait()
    for label, p in procs:
        if p.wait() != 0:
            raise SystemExit(f"{label} failed (exit {p.returncode}); see {out / (slug(label) + '.log')}")

    results = []
    base = baseline_row(args.n) if args.n == 1000 else None
    if base:
        results.append(("AlphaEdit in batches of 100, sequential (the baseline, its section)", base))
    for label, _, opts in rows:
        folder = out / slug(label)
        runs = [d for d in folder.iterdir() if (d / "run.jsonl").is_file()] if folder.is_dir() else []
        if runs:
            results.append((label, run_row(runs[0])))
    for spec in args.posthoc:
        label, _, rest = spec.partition("=")
        src, method, targets, *hp = rest.split(";")
        folder = out / slug(src)
        runs = [d for d in folder.iterdir() if (d / "run.jsonl").is_file()] if folder.is_dir() else []
        if runs:
            import json

            rec = posthoc(runs[0], method, targets, json.loads(hp[0]) if hp else {}, held)
            results.append((label, posthoc_row(run_row(runs[0]), rec)))
    head = ["row", "edits", "efficacy", "paraphrase", "NS (unedited → end)", "GS prompt / paraphrase",
            "never-edited top-1", "perplexity (unedited → end)", "‖W − W₀‖_F", "served per module: rank (deltas)",
            "wall time"]
    body_rows = [[label, r["n"], fmt(r["efficacy"]), fmt(r["paraphrase"]), f"{fmt(r['ns'][0])} → {fmt(r['ns'][1])}",
                  f"{fmt(r['gs'])} / {fmt(r['gps'])}", f"{fmt(r['never_edited'][0])} → {fmt(r['never_edited'][1])}",
                  f"{fmt(r['ppl'][0], 1)} → {fmt(r['ppl'][1], 1)}", fmt(r["w_dist"], 1), r["served"],
                  f"{r['hours']:.2f} h"] for label, r in results]
    comp = [f"- {label}: {r['compactions']} compaction(s), {r['compact_seconds']:.0f} s in all, largest constraint "
            f"error {fmt(r['compact_error'], 6) if r['compact_error'] is not None else '–'}"
            for label, r in results if r.get("compactions")]
    cfg = next((read_run(d)[0]["config"] for label, _, _ in rows if (folder := out / slug(label)).is_dir()
                for d in folder.iterdir() if (d / "run.json").is_file()), {})
    opts = "\n".join([f"- {label}: `{opts}`" for label, _, opts in rows]
                     + [f"- {s.partition('=')[0]}: the run of “{s.partition('=')[2].split(';')[0]}” compacted once at its "
                        f"end with {s.partition('=')[2].split(';')[1]} ({s.partition('=')[2].split(';')[2]} targets) and "
                        "evaluated the same way" for s in args.posthoc])
    body = f"""Model `{shown(args.model)}`, cases `{shown(args.cases)}`, the first {args.n} the model knows (P(true) > P(new)).
Every row: `rankone bench sequential` with `{args.common} --stats-corpus {shown(args.stats_corpus)} --ppl-text
{shown(held)} --every {args.every}` unless its options say otherwise:

{opts}

Efficacy and paraphrase: ES and PS over every edit made so far (up to {cfg.get('retention_sample')}); NS over
{cfg.get('ns_sample')} fixed cases' neighbours; GS: generation-based success on {cfg.get('gs_sample', 0)} fixed edited cases;
never-edited: top-1 of up to {cfg.get('probe_sample')} later known cases nobody edited; perplexity on the last
{args.heldout_chars:,} characters of tinyshakespeare. "Served per module": the rank a server adds per token at each
edited module (Σ k of its deltas) and how many deltas carry it; a compaction leaves one delta per module.

{table(head, body_rows)}

Targets after {args.n} edits:

{chr(10).join(verdicts(label, r) for label, r in results)}

{chr(10).join(comp)}

{args.note}

Runs, JSONL and checkpoints: `{out.relative_to(ROOT)}/` (not committed); rerun the command to resume unfinished rows.
"""
    print(body)
    write_section(f"compaction_{args.name}", f"Compaction and key statistics over many edits — SmolLM2-135M, "
                                             f"{args.n:,} CounterFact edits", body)


if __name__ == "__main__":
    main()
