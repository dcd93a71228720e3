"""How many sampled tokens the key statistics need: the default `sampled_corpus_tokens`.

For each real model, the first --n CounterFact cases it knows (P(true) > P(new), as
benchmarks/real_counterfact.py selects them) are edited alone with r-ROME at the default layer,
with C from 100,000 tokens of natural text (tinyshakespeare) and from corpora sampled from the
model itself at several sizes, exactly as `rankone edit` samples one without --stats-corpus
(`Editor.corpus`: `sampled_corpus` of `sampled_corpus_tokens`, then every token of it). C enters
only the closed-form solve, so each case runs the key and the value loop once and every source's
update is `rank_one_update` on them: written, measured (ES, PS, NS, GS as real_counterfact
measures them), reverted bit-exactly.

    nice -n 10 python benchmarks/sampled_corpus.py --n 100      # both models, one after the other
    nice -n 10 python benchmarks/sampled_corpus.py --models gemma3-270m --no-write   # one model
    python benchmarks/sampled_corpus.py --report-only           # the section from what is finished

Resumable: each case's rows are appended to runs/sampled_corpus/MODEL.jsonl as it finishes (an
interrupted corpus sample resumes from its .partial file too); a rerun does what is left and
rewrites the section. The recommended default is the smallest size within --tolerance of
natural text on all four metrics on every model measured.
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
from _cf_measure import measure  # noqa: E402
from _report import ROOT, publish, table  # noqa: E402
from real_counterfact import CASES, SHARED, append_jsonl, resolve_model, select  # noqa: E402

from rankone.core import architectures as arch  # noqa: E402
from rankone.edit.editor import Editor  # noqa: E402
from rankone.eval.cases import load_cases  # noqa: E402
from rankone.methods import corpus as corpus_mod  # noqa: E402
from rankone.methods.rome import VARIANTS, EditHParams, computed  # noqa: E402
from rankone.methods.rome import rank_one_update  # noqa: E402

TEXT = SHARED / "data" / "text" / "tinyshakespeare.txt"
RUNS = ROOT / "runs" / "sampled_corpus"
METRICS = ("es", "ps", "ns", "gs")
MODELS = ("smollm2-135m", "gemma3-270m")


def sources(sizes: list[int], text_tokens: int) -> list[tuple[str, int]]:
    return [("text", text_tokens)] + [("sampled", s) for s in sorted(sizes)]


def editors(handle, sizes: list[int], text_tokens: int, cache: Path, log) -> tuple[dict, dict[int, float]]:
    """One Editor per source (they differ only in C) and the seconds each sampled corpus took
    (read back from the run's log of samplings when it was sampled by an earlier invocation)."""
    times_f = cache / "sampling_seconds.json"
    times = {int(k): v for k, v in json.loads(times_f.read_text()).items()} if times_f.is_file() else {}
    eds = {}
    for src, n in sources(sizes, text_tokens):
        if src == "text":
            eds[src, n] = Editor(handle, {"stats_tokens": n}, stats_corpus=TEXT, cache_dir=cache, progress=False)
            continue
        ed = Editor(handle, {"sampled_corpus_tokens": n}, cache_dir=cache, progress=False)
        if corpus_mod.cached_sampled_corpus(handle.model, handle.tokenizer, n, ed.settings.seed, cache_dir=cache) is None:
            log(f"  sampling {n:,} tokens from the model")
            t0 = time.perf_counter()
            ed.context.corpus()  # what `rankone edit` does without --stats-corpus (resumes a .partial sample)
            times[n] = time.perf_counter() - t0
            times_f.write_text(json.dumps(times))
        eds[src, n] = ed
    return eds, times


def run_model(name: str, args: argparse.Namespace, log=lambda *a: print(*a, flush=True)) -> None:
    handle, label = resolve_model(name)
    model, tok = handle
    cache = RUNS / label / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    # The default sampled size is what this benchmark chooses and every size here is explicit, so it is
    # left out of the settings that must match.
    hp = {k: v for k, v in EditHParams().to_dict().items() if k != "sampled_corpus_tokens"}
    check_settings(RUNS / label / "settings.json", {"sampler": corpus_mod.SCHEMA, "batch": corpus_mod.SAMPLE_BATCH,
                                                     "hparams": hp, "cases": str(args.cases)})
    out = RUNS / f"{label}.jsonl"
    sel = select(model, tok, load_cases(args.cases), args.n)
    cases = sel["known"]
    log(f"[{label}] {len(cases)} known cases of {sel['scanned']} scanned")
    eds, _ = editors(handle, args.sizes, args.text_tokens, cache, log)
    first = eds["text", args.text_tokens]
    layer = first.layer
    done = {(r["source"], r["tokens"], r["case_id"]) for r in rows_of(out)}
    todo = [c for c in cases if any((s, n, c.case_id) not in done for s, n in [("unedited", 0), *eds])]
    log(f"[{label}] layer {layer}: {len(cases) - len(todo)} of {len(cases)} cases done")
    stats = {key: ed.stats(layer) for key, ed in eds.items()}
    path = handle.proj_path(layer)
    w = arch.weight_oi(arch.get_module(model, path))
    w0 = w.detach().clone()
    margs = argparse.Namespace(gen_new=20, gen_tokens=0)  # GS as real_counterfact reads it; no fluency
    t_start = time.perf_counter()
    for i, case in enumerate(todo):
        if ("unedited", 0, case.case_id) not in done:
            append_jsonl(out, {"source": "unedited", "tokens": 0, "case_id": case.case_id, "layer": layer,
                               **_scores(measure(model, tok, case, [], margs))})
        step = first.compute([case.request])  # the key and the value loop, shared by every source
        d = step.detail
        for (src, n), ed in eds.items():
            if (src, n, case.case_id) in done:
                continue
            upd = rank_one_update(w, d.key, d.value, stats[src, n], VARIANTS[ed.settings.method], d.normed, d.bias)
            (e,) = ed.write(computed(path, layer, upd, dict(step.diagnostics)), [case.request])
            try:
                m = measure(model, tok, case, [], margs)
            finally:
                with torch.no_grad():
                    w.copy_(w0)
            append_jsonl(out, {"source": src, "tokens": n, "case_id": case.case_id, "layer": layer, **_scores(m),
                               "delta_fro": e.delta_fro, "stats_tokens": stats[src, n].n_tokens})
        if not torch.equal(w, w0):
            raise RuntimeError(f"the edited weight differs from the unedited one after case {case.case_id}")
        log(f"[{label}] {i + 1}/{len(todo)} cases, {time.perf_counter() - t_start:.0f} s")


def check_settings(f: Path, settings: dict) -> None:
    """Rows made with another sampler or other edit settings are not mixed in: such a run stops."""
    if f.is_file() and json.loads(f.read_text()) != settings:
        sys.exit(f"{f.parent} holds results made with other settings ({f}); move it away to start afresh")
    f.write_text(json.dumps(settings, indent=1, sort_keys=True))


def rows_of(path: Path) -> list[dict]:
    """The rows of a results file; a last line cut short by an interruption is left out (redone)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _scores(m: dict) -> dict:
    return {k: m[k] for k in METRICS}


def summaries(label: str, sizes: list[int], text_tokens: int, n: int) -> dict[tuple[str, int], dict]:
    """Means over the cases every source has finished (so that the rows compare the same cases)."""
    rows = rows_of(RUNS / f"{label}.jsonl")
    keys = [("unedited", 0), *sources(sizes, text_tokens)]
    by = {k: {r["case_id"]: r for r in rows if (r["source"], r["tokens"]) == k} for k in keys}
    common = set.intersection(*(set(v) for v in by.values())) if rows else set()
    out = {}
    for k in keys:
        rs = [by[k][c] for c in common]
        if rs:
            out[k] = {m: statistics.mean(r[m] for r in rs) for m in METRICS}
            out[k]["n"] = len(rs)
            if k[0] != "unedited":
                out[k]["delta"] = statistics.median(r["delta_fro"] for r in rs)
                out[k]["stats_tokens"] = statistics.median(r["stats_tokens"] for r in rs)
    return out


def other_sizes(label: str, args: argparse.Namespace) -> str:
    """Sampled sizes of the results file that this report leaves out (an earlier run's, on fewer
    cases), each against natural text on the cases it was run on."""
    sizes = sorted({r["tokens"] for r in rows_of(RUNS / f"{label}.jsonl") if r["source"] == "sampled"} - set(args.sizes))
    rows = []
    for n in sizes:
        s = summaries(label, [n], args.text_tokens, args.n)
        if ("sampled", n) in s:
            v, ref = s["sampled", n], s["text", args.text_tokens]
            rows.append([f"{n:,}", v["n"], *(f"{v[m]:.3f} / {ref[m]:.3f}" for m in METRICS),
                         f"{max(abs(v[m] - ref[m]) for m in METRICS):.3f}"])
    return ("\n\nSmaller sampled sizes, each on the cases it was run on (sampled / natural text):\n\n"
            + table(["tokens", "cases", "ES", "PS", "NS", "GS", "largest gap"], rows)) if rows else ""


def report(args: argparse.Namespace) -> str:
    parts, within = [], {}
    for name in args.report:
        label = Path(name).stem if Path(name).suffix == ".gguf" else Path(name).name
        s = summaries(label, args.sizes, args.text_tokens, args.n)
        if ("text", args.text_tokens) not in s:
            parts.append(f"### {label}\n\nNo finished cases yet.")
            continue
        ref = s["text", args.text_tokens]
        f = RUNS / label / "cache" / "sampling_seconds.json"
        secs = {int(k): v for k, v in json.loads(f.read_text()).items()} if f.is_file() else {}
        rows = []
        for (src, n), v in s.items():
            gap = max(abs(v[m] - ref[m]) for m in METRICS) if src == "sampled" else None
            short = max(ref[m] - v[m] for m in METRICS) if src == "sampled" else None  # > 0: sampled worse
            if src == "sampled":  # a size decides only on --n cases; 0.98 - 0.97 is 0.010000000000000009
                tol = args.tolerance + 1e-9
                within.setdefault(n, []).append({"near": gap <= tol, "no_worse": short <= tol, "decides": v["n"] >= args.n})
            rows.append([{"unedited": "(unedited model)", "text": f"natural text ({TEXT.name})",
                          "sampled": "sampled from the model"}[src], f"{n:,}" if n else "-", v["n"],
                         *(v[m] for m in METRICS), f"{gap:.3f}" if gap is not None else "-",
                         f"{short:+.3f}" if short is not None else "-",
                         f"{v['delta']:.3g}" if "delta" in v else "-",
                         f"{int(v['stats_tokens']):,}" if "stats_tokens" in v else "-",
                         f"{secs[n]:.0f}" if src == "sampled" and n in secs else "-"])
        parts.append(f"### {label}\n\n" + table(["statistics", "tokens", "cases", "ES", "PS", "NS", "GS",
                                                  "largest gap to text", "largest shortfall", "‖Δ‖_F median",
                                                  "tokens read for C",
                                                  "sampling s"], rows) + other_sizes(label, args))
    decided = {n: v for n, v in within.items() if len(v) == len(args.report) and all(x["decides"] for x in v)}
    both = sorted(n for n, v in decided.items() if all(x["near"] for x in v))
    no_worse = sorted(n for n, v in decided.items() if all(x["no_worse"] for x in v))
    verdict = (f"**Smallest sampled size within {args.tolerance} of natural text on ES, PS, NS and GS on every model "
               f"({args.n} cases each): {both[0]:,} tokens.**" if both else
               f"No sampled size is within {args.tolerance} of natural text on all four metrics on every model "
               f"({args.n} cases each)" + (f"; the smallest that is nowhere worse by more than {args.tolerance} "
                                           f"(the gap is a gain): **{no_worse[0]:,} tokens**." if no_worse else "."))
    return "\n\n".join(parts + [verdict])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="models to run")
    ap.add_argument("--report", nargs="+", default=list(MODELS), help="models the section reports (all: the verdict needs each)")
    ap.add_argument("--cases", default=str(CASES))
    ap.add_argument("--n", type=int, default=100, help="known cases per model")
    ap.add_argument("--sizes", nargs="+", type=int, default=[2_000, 5_000, 10_000, 20_000])
    ap.add_argument("--text-tokens", type=int, default=100_000)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print the section; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.report_only:
        for name in args.models:
            run_model(name, args)
    body = (f"r-ROME at each model's default layer on the first {args.n} CounterFact cases of "
            f"`{Path(args.cases).name}` the model knows (P(true) > P(new), as benchmarks/real_counterfact.py "
            f"selects them), each edited alone and reverted. C from {args.text_tokens:,} tokens of natural text, or "
            "from a corpus sampled from the model itself as `rankone edit` samples one without --stats-corpus "
            "(documents of 128 new tokens, seeded; all of it read for C). Per case one key and one value loop; "
            "the sources differ only in C. ES/PS/NS: ROME's metrics; GS: the greedy continuation (20 tokens) "
            "states the new target. Largest gap: the largest |sampled − text| over the four; largest shortfall: "
            "the largest text − sampled (negative: the sampled corpus scores higher on every metric). Rows compare "
            "the cases every source has finished. \"Sampling s\": wall "
            f"seconds to sample that corpus, {args.threads} torch thread(s), beside other jobs.\n\n" + report(args))
    publish("sampled_corpus", "How many sampled tokens the statistics need", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
