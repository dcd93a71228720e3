"""What the statistics corpus costs in edit quality: C from the model's own samples, from
natural text, or no C at all (identity, EasyEdit's default), at two token budgets.

    python benchmarks/stats_corpus.py [--models smollm2-135m gemma3-270m] [--cases 30] [--budgets 20000 100000]

On the first CounterFact cases of counterfact-edit.json that the tokenizer aligns, at the model's
default layer. C enters only the closed-form solve: the key k̄ and the value loop's δ do not depend
on it. So each case runs the value loop once (`Editor.compute`) and every configuration's r-ROME
update is `rank_one_update` on that key and value with its own C, written, scored (ES/PS/NS on the
edit, rephrase and locality prompts) and reverted. The sampled corpus is sampled once at the
largest budget (shared with benchmarks/edit_speed.py's cache); a smaller budget reads its first
tokens, as `--stats-tokens` does. Checkpointed per case in runs/stats_corpus/<model>.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish, table  # noqa: E402
from edit_speed import COUNTERFACT, RUNS as SPEED_RUNS, TEXT, load, metrics  # noqa: E402
from real_counterfact import identity_stats  # noqa: E402

from rankone.core import architectures as arch  # noqa: E402
from rankone.edit.editor import Editor  # noqa: E402
from rankone.eval.cases import cases_from_records  # noqa: E402
from rankone.eval.metrics import alignable, hmean  # noqa: E402
from rankone.methods.corpus import sampled_corpus  # noqa: E402
from rankone.methods.base import resolve_settings  # noqa: E402
from rankone.methods.rome import VARIANTS, computed, rank_one_update  # noqa: E402
from rankone.models.handle import ModelHandle  # noqa: E402

RUNS = ROOT / "runs" / "stats_corpus"


def configs(budgets: list[int]) -> list[tuple[str, int]]:
    return [(src, b) for b in budgets for src in ("sampled", "text")] + [("identity", 0)]


def editors(handle: ModelHandle, budgets: list[int], cache: Path) -> dict[tuple[str, int], Editor]:
    """One editor per configuration; they differ only in where C comes from."""
    eds: dict[tuple[str, int], Editor] = {}
    sampled = None
    for src, budget in configs(budgets):
        hp = resolve_settings(handle, {"stats_tokens": max(budget, 1)})
        if src == "identity":
            eds[src, budget] = identity_stats(Editor(handle, hp, TEXT, progress=False))
            continue
        if src == "sampled" and sampled is None:
            sampled = sampled_corpus(handle.model, handle.tokenizer, max(budgets), hp.seed, cache_dir=cache)
        eds[src, budget] = Editor(handle, hp, sampled if src == "sampled" else TEXT, cache_dir=cache / "stats",
                                  progress=False)
    return eds


def run_model(name: str, n: int, budgets: list[int]) -> None:
    model, tok, _ = load(name)
    handle = ModelHandle.of(model, tok)
    cache = SPEED_RUNS / name / "cache"
    out = RUNS / f"{name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    eds = editors(handle, budgets, cache)
    first = next(iter(eds.values()))
    layer = first.layer
    done = {(r["source"], r["budget"], r["case_id"]) for r in map(json.loads, out.read_text().splitlines())
            if r.get("layer") == layer} if out.exists() else set()
    cases = alignable(model, tok, cases_from_records(json.loads(COUNTERFACT.read_text()), str(COUNTERFACT), n_neighbours=1))[0][:n]
    todo = [c for c in cases if any((src, b, c.case_id) not in done for src, b in eds)]
    print(f"[{name}] layer {layer}: {len(cases) - len(todo)} of {len(cases)} cases done", flush=True)
    with open(out, "a") as f:  # the unedited model on the same prompts: what NS is measured against
        for case in cases:
            if ("unedited", 0, case.case_id) not in done:
                f.write(json.dumps({"source": "unedited", "budget": 0, "case_id": case.case_id, "layer": layer,
                                    **metrics(model, tok, case), "delta_fro": 0.0, "n_tokens": 0}) + "\n")
                f.flush()  # a row per finished case, so an interrupted run resumes after it
    stats = {key: ed.stats(layer) for key, ed in eds.items()}
    path = handle.proj_path(layer)
    w = arch.weight_oi(arch.get_module(model, path))
    w0 = w.detach().clone()
    t_start = time.perf_counter()
    for i, case in enumerate(todo):
        step = first.compute([case.request])  # the key and the value loop, shared by every configuration
        d = step.detail
        for (src, budget), ed in eds.items():
            if (src, budget, case.case_id) in done:
                continue
            upd = rank_one_update(w, d.key, d.value, stats[src, budget], VARIANTS[ed.settings.method], d.normed, d.bias)
            (e,) = ed.write(computed(path, layer, upd, dict(step.diagnostics)), [case.request])
            try:
                m = metrics(model, tok, case)
            finally:
                with torch.no_grad():
                    w.copy_(w0)
            rec = {"source": src, "budget": budget, "case_id": case.case_id, "layer": layer, **m,
                   "delta_fro": e.delta_fro, "n_tokens": stats[src, budget].n_tokens}
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        print(f"[{name}] {i + 1}/{len(todo)} cases, {time.perf_counter() - t_start:.0f} s", flush=True)


def report(models: list[str], budgets: list[int]) -> str:
    parts = []
    for name in models:
        f = RUNS / f"{name}.jsonl"
        if not f.exists():
            continue
        recs = [json.loads(x) for x in f.read_text().splitlines()]
        layer = max(r.get("layer", -1) for r in recs)  # rows of an earlier default layer are not mixed in
        recs = [r for r in recs if r.get("layer", -1) == layer]
        rows = []
        for src, budget in [("unedited", 0), *configs(budgets)]:
            rs = [r for r in recs if r["source"] == src and r["budget"] == budget]
            if not rs:
                continue
            es, ps, ns = (statistics.mean(r[k] for r in rs) for k in ("es", "ps", "ns"))
            label = {"sampled": "sampled from the model", "text": f"natural text ({TEXT.name})", "identity": "none (C = I)",
                     "unedited": "(unedited model)"}[src]
            rows.append([label, f"{budget:,}" if budget else "-", len(rs), es, ps, ns, hmean([es, ps, ns]),
                         statistics.median(r["delta_fro"] for r in rs) if src != "unedited" else "-"])
        parts.append(f"### {name} (layer {layer})\n\n" + table(["statistics corpus", "tokens", "cases", "ES", "PS", "NS", "S", "‖Δ‖ (median)"], rows))
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--cases", type=int, default=30)
    ap.add_argument("--budgets", nargs="+", type=int, default=[20_000, 100_000])
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print the section without writing BENCHMARKS.md")
    args = ap.parse_args()
    if not args.report_only:
        for name in args.models:
            run_model(name, args.cases, args.budgets)
    body = ("r-ROME at each model's default layer on the first alignable CounterFact cases of "
            "counterfact-edit.json: per case one value loop, then one update per statistics configuration, scored "
            "and reverted (C changes only the solve, so the rows differ only by C). The sampled corpus is drawn "
            "from the model itself (seeded), as `rankone edit` does without `--stats-corpus`.\n\n"
            + report(args.models, args.budgets))
    publish("stats_corpus", "Which statistics corpus", body, write=not args.no_write)


if __name__ == "__main__":
    main()
