"""What the statistics corpus costs in edit quality (issue 14): C from the model's own samples, from
natural text, or no C at all (identity, EasyEdit's default), at two token budgets.

    python benchmarks/stats_corpus.py [--models smollm2-135m gemma3-270m] [--cases 30] [--budgets 20000 100000]

On the first CounterFact cases of counterfact-edit.json that the tokenizer aligns, at the model's
default layer: one r-ROME edit per case and configuration, scored (ES/PS/NS on the edit, rephrase
and locality prompts) and reverted. Checkpointed per case in runs/stats_corpus/<model>.jsonl and
resumed; the corpus sampled from the model is shared with benchmarks/edit_speed.py's cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, table, write_section  # noqa: E402
from edit_speed import COUNTERFACT, RUNS as SPEED_RUNS, TEXT, load, metrics  # noqa: E402
from real_counterfact import IdentityStatsEditor  # noqa: E402

from rankone.artifacts.patch import revert_patch  # noqa: E402
from rankone.edit.editor import Editor  # noqa: E402
from rankone.eval.cases import cases_from_records  # noqa: E402
from rankone.eval.metrics import alignable, hmean  # noqa: E402
from rankone.methods.corpus import sampled_corpus  # noqa: E402
from rankone.methods.hparams import EditHParams  # noqa: E402

RUNS = ROOT / "runs" / "stats_corpus"


def configs(budgets: list[int]) -> list[tuple[str, int]]:
    return [(src, b) for b in budgets for src in ("sampled", "text")] + [("identity", 0)]


def run_model(name: str, n: int, budgets: list[int]) -> None:
    model, tok, _ = load(name)
    cache = SPEED_RUNS / name / "cache"
    out = RUNS / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["source"], r["budget"], r["case_id"]) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    cases = alignable(model, tok, cases_from_records(json.loads(COUNTERFACT.read_text()), str(COUNTERFACT), n_neighbours=1))[0][:n]
    for src, budget in configs(budgets):
        hp = EditHParams.for_model(model, stats_tokens=max(budget, 1))
        if src == "identity":
            ed: Editor = IdentityStatsEditor(model, tok, hp, TEXT, progress=False)
        else:
            corpus = sampled_corpus(model, tok, budget, hp.seed, cache_dir=cache) if src == "sampled" else TEXT
            ed = Editor(model, tok, hp, corpus, cache_dir=cache / "stats", progress=False)
        for case in cases:
            if (src, budget, case.case_id) in done:
                continue
            patch = ed.edit([case.request], keep=True)
            m = metrics(model, tok, case)
            revert_patch(model, patch)
            rec = {"source": src, "budget": budget, "case_id": case.case_id, **m, "delta_fro": patch.edits[0].delta_fro,
                   "n_tokens": patch.edits[0].diagnostics["stats"]["n_tokens"]}
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        print(f"[{name}] {src} {budget}: done", flush=True)


def report(models: list[str], budgets: list[int]) -> str:
    parts = []
    for name in models:
        f = RUNS / f"{name}.jsonl"
        if not f.exists():
            continue
        recs = [json.loads(x) for x in f.read_text().splitlines()]
        rows = []
        for src, budget in configs(budgets):
            rs = [r for r in recs if r["source"] == src and r["budget"] == budget]
            if not rs:
                continue
            es, ps, ns = (statistics.mean(r[k] for r in rs) for k in ("es", "ps", "ns"))
            label = {"sampled": "sampled from the model", "text": f"natural text ({TEXT.name})", "identity": "none (C = I)"}[src]
            rows.append([label, f"{budget:,}" if budget else "-", len(rs), es, ps, ns, hmean([es, ps, ns]),
                         statistics.median(r["delta_fro"] for r in rs)])
        parts.append(f"### {name}\n\n" + table(["statistics corpus", "tokens", "cases", "ES", "PS", "NS", "S", "‖Δ‖ (median)"], rows))
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--budgets", nargs="+", type=int, default=[20_000, 100_000])
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if not args.report_only:
        for name in args.models:
            run_model(name, args.cases, args.budgets)
    body = ("r-ROME at each model's default layer, first alignable CounterFact cases of counterfact-edit.json, "
            "one edit per case and configuration, reverted after scoring.\n\n" + report(args.models, args.budgets))
    print(body)
    write_section("stats_corpus", "Which statistics corpus (issue 14)", body)


if __name__ == "__main__":
    main()
