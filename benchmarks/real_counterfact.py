"""CounterFact on real pretrained models: single edits the papers' way, with generation-based success.

Each case is edited alone on the unedited model, measured, and reverted (the edited weight is
checked bit for bit after every method). Cases come from a CounterFact file in file order, less
those the tokenizer cannot align, under two protocols:

    known  the first N cases the unedited model knows: P(true) > P(new) on the prompt
           (teacher forced, per-token mean: ROME's convention);
    all    the first N cases, known or not (the papers' protocol); the share known is reported.

Per case (`rankone.eval.metrics`): ES/EM, PS/PM, NS/NM as in ROME; GS = the greedy continuation
of the prompt (--gen-new tokens, not cut to the target's length) states the new target
(`generation_success`), GPS the same on the paraphrase, GNS the neighbour's continuation its own answer;
degenerate = a greedy continuation holds a special token or a four-token run (`degenerate`); OS = the edited subject's other facts in
the files (--cases, --facts) keep their true answer over the new target (P(true_j) > P(new)),
where the files have them (`other_facts`); fluency = ROME's generation entropy of the generation prompts; ‖Δ‖_F.

The key statistics C: --stats-corpus FILE (natural text), none (the library's default for the
model: its card's corpus, else text sampled from the model itself), or --no-cov (C = I,
EasyEdit's default `mom2_adjustment: false`). One script thus gives the statistics comparison too.

    python benchmarks/real_counterfact.py --model smollm2-135m --n 200
    python benchmarks/real_counterfact.py --model smollm2-135m --n 50 --methods r-rome --no-cov
    python benchmarks/real_counterfact.py --model gemma3-270m --n 100 \\
        --stats-corpus ../shared/data/text/tinyshakespeare.txt --stats-tokens 100000

Resumable: per-case results go to runs/real_counterfact/NAME/METHOD.jsonl (NAME: model, layer,
statistics; the settings in NAME/settings.json, and a rerun with other settings under the same NAME
is refused). `benchmarks/real_layers.py` sweeps the layer with the same machinery.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cf_measure import es_misses, measure, other_facts, ps_misses, subject_facts  # noqa: E402
from _report import ROOT, publish, table  # noqa: E402

from rankone.core import architectures as arch  # noqa: E402
from rankone.edit.editor import Editor, outcome  # noqa: E402
from rankone.eval.cases import Case, load_cases  # noqa: E402
from rankone.eval.metrics import alignable, score, summarize  # noqa: E402
from rankone.methods.base import resolve_settings  # noqa: E402
from rankone.methods.rome import VARIANTS, EditHParams, computed, rank_one_update  # noqa: E402
from rankone.methods.stats import LayerStats  # noqa: E402
from rankone.models import zoo  # noqa: E402
from rankone.models.handle import ModelHandle  # noqa: E402
from rankone.models.load import load_model  # noqa: E402

# ../shared beside the checkout (or beside a folder above it, for a git worktree)
SHARED = next((q / "shared" for q in ROOT.parents if (q / "shared" / "data").is_dir()), ROOT.parent / "shared")
CASES = SHARED / "data" / "counterfact" / "counterfact-edit.json"
RUNS = ROOT / "runs" / "real_counterfact"
PROTOCOLS = ("known", "all")
GEN_DEFAULTS = (20, 50)  # --gen-new, --gen-tokens; other values get their own run folders


# ---- model, cases, statistics -----------------------------------------------------------------


def resolve_model(spec: str) -> tuple[ModelHandle, str]:
    """A real model by name (downloaded and converted once, see rankone.models.zoo) or a path."""
    if spec in zoo.MODELS:
        try:
            return load_model(zoo.real_model_dir(spec)), spec
        except zoo.ModelUnavailable as e:
            sys.exit(f"{spec} cannot be obtained: {e}")
    p = Path(spec)
    return load_model(spec), (p.stem if p.suffix == ".gguf" else p.name)


def select(model: Any, tok: Any, cases: list[Case], n: int, chunk: int = 64, n_all: int | None = None) -> dict[str, Any]:
    """The first n known cases and the first n_all (default n) alignable ones ('all'), scanning the file in order."""
    n_all = n if n_all is None else n_all
    known, every, scanned, unaligned = [], [], 0, 0
    for i in range(0, len(cases), chunk):
        if len(known) >= n and len(every) >= n_all:
            break
        ok, why = alignable(model, tok, cases[i:i + chunk])
        unaligned += len(why)
        sc = score(model, tok, [x for c in ok for x in ((c.prompt, c.target_new), (c.prompt, c.target_true))])
        for j, c in enumerate(ok):
            scanned += 1
            if sc[2 * j + 1].p() > sc[2 * j].p():
                known.append(c)
            every.append(c)
    return {"known": known[:n], "all": every[:n_all], "scanned": scanned, "unaligned": unaligned,
            "share_known": len(known) / scanned if scanned else float("nan"), "n_known_scanned": len(known)}


def identity_stats(ed: Editor) -> Editor:
    """C = I (EasyEdit's ROME configs: mom2_adjustment false): u ∝ k̄ instead of C⁻¹k̄. The edit
    context is the one place the statistics enter, so giving it C is the whole hook."""
    d_in = arch.in_out_features(ed.handle.proj(ed.layer))[0]
    ed.context.use_stats(ed.layer, ed.settings.stats_tokens, LayerStats.identity(d_in))
    return ed


def stats_label(args: argparse.Namespace, tokens: int) -> tuple[str, str]:
    """(tag for the run folder, words for the report) of the statistics setting."""
    if args.no_cov:
        return "identity", "none: C = I (EasyEdit's default)"
    if args.stats_corpus:
        return f"{Path(args.stats_corpus).stem}-{tokens}", f"`{_where(args.stats_corpus)}`, {tokens:,} tokens"
    return f"default-{tokens}", f"the library's default for the model (its card's corpus, else samples of the model), {tokens:,} tokens"


# ---- measuring one case -------------------------------------------------------------------------


def read_jsonl(p: Path) -> dict[str, dict]:
    """case_id -> row; a last line cut short by a killed run is dropped (that case is redone)."""
    rows = {}
    for line in p.read_text().splitlines() if p.is_file() else []:
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[str(r["case_id"])] = r
    return rows


def append_jsonl(p: Path, row: dict) -> None:
    with open(p, "a+") as fh:
        fh.seek(0, 2)
        if fh.tell():  # after a line cut short, start a new one
            fh.seek(fh.tell() - 1)
            if fh.read(1) != "\n":
                fh.write("\n")
        fh.write(json.dumps(row) + "\n")


def unedited(handle: ModelHandle, label: str, cases: list[Case], facts: dict, args: argparse.Namespace) -> dict[str, dict]:
    """Per-case metrics of the unedited model (cached per model and generation settings)."""
    src = hashlib.sha256(json.dumps([_where(args.model), *map(_where, args.facts)]).encode()).hexdigest()[:8]
    f = RUNS / "_unedited" / f"{label}-{src}-gen{args.gen_new}-flu{args.gen_tokens}.jsonl"
    f.parent.mkdir(parents=True, exist_ok=True)
    done = read_jsonl(f)
    for c in cases:
        if c.case_id not in done:
            done[c.case_id] = dict(measure(handle.model, handle.tokenizer, c, other_facts(c, facts), args),
                                   case_id=c.case_id)
            append_jsonl(f, done[c.case_id])
    return done


def run_methods(handle: ModelHandle, cases: list[Case], facts: dict, hps: dict[str, Any], out: Path,
                args: argparse.Namespace, log: Any = lambda *a: print(*a, flush=True)) -> dict[str, dict[str, dict]]:
    """Each case edited alone by each method, measured, reverted; appended to out/METHOD.jsonl (resumes).

    The ROME variants share the key and the value (δ does not depend on the method: only which key
    is written, and from which output δ starts, does), so each case runs the value loop once
    (`Editor.compute` of the first method still to do) and each method's closed-form update is
    `rank_one_update` on those: the same functions `Editor.edit` calls, in the same order.
    """
    done = {m: read_jsonl(out / f"{m}.jsonl") for m in hps}
    todo = [c for c in cases if any(c.case_id not in done[m] for m in hps)]
    log(f"{out.name}: " + ", ".join(f"{m} {sum(c.case_id in done[m] for c in cases)}" for m in hps)
        + f" of {len(cases)} cases done; {len(todo)} cases to do")
    if not todo:
        return done
    eds = {m: Editor(handle, hp, args.stats_corpus, progress=False) for m, hp in hps.items()}  # each records its method
    if args.no_cov:
        eds = {m: identity_stats(ed) for m, ed in eds.items()}
    first = next(iter(hps))
    ed = eds[first]
    model, tok = handle
    layer = ed.layer
    path = handle.proj_path(layer)
    w = arch.weight_oi(arch.get_module(model, path))
    w0 = w.detach().clone()
    stats = ed.stats(layer)
    t_start = time.perf_counter()
    for i, c in enumerate(todo):
        t0 = time.perf_counter()
        step = ed.compute([c.request])  # the key, the value loop, the first method's update
        d = step.detail
        t_shared = time.perf_counter() - t0
        for m, hp in hps.items():
            if c.case_id in done[m]:
                continue
            t1 = time.perf_counter()
            upd = d.update if m == first else rank_one_update(w, d.key, d.value, stats, VARIANTS[m], d.normed, d.bias)
            (e,) = eds[m].write(computed(path, layer, upd, dict(step.diagnostics)), [c.request])
            t_edit = t_shared + time.perf_counter() - t1
            e.diagnostics["outcome"] = outcome(model, tok, c.request)
            try:
                r = measure(model, tok, c, other_facts(c, facts), args)
            finally:
                with torch.no_grad():
                    w.copy_(w0)
            val = e.diagnostics.get("value", {})
            r.update(case_id=c.case_id, delta_fro=e.delta_fro, edit_seconds=t_edit, reached=e.diagnostics["outcome"]["reached"],
                     value_prob=val.get("target_prob"), clamped=val.get("clamped"), value_steps=len(val.get("losses", [])),
                     **{k: e.diagnostics.get(k) for k in ("key_cosine", "denominator", "delta_norm", "weight_fro")})
            done[m][c.case_id] = r
            append_jsonl(out / f"{m}.jsonl", r)
        if not torch.equal(w0, w):
            raise RuntimeError(f"{path} differs from the unedited weight after reverting case {c.case_id}")
        if (i + 1) % 10 == 0 or i + 1 == len(todo):
            log(f"  {i + 1}/{len(todo)} cases, {time.perf_counter() - t_start:.0f} s")
    return done


def check_settings(out: Path, settings: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    f = out / "settings.json"
    if f.is_file() and json.loads(f.read_text()) != settings:
        sys.exit(f"{out} holds results made with other settings ({f}); pass another --name or remove the folder")
    f.write_text(json.dumps(settings, indent=1, sort_keys=True))


def run_name(label: str, layer: int, args: argparse.Namespace, hp: EditHParams) -> str:
    """label-L{layer}-{statistics}[-hp{hash of the hyper-parameters the user changed}]."""
    extra = {k: v for k, v in hp.given.items() if k not in ("method", "layer", "stats_tokens")}
    h = f"-hp{hashlib.sha256(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:8]}" if extra else ""
    gen = f"-gen{args.gen_new}-flu{args.gen_tokens}" if (args.gen_new, args.gen_tokens) != GEN_DEFAULTS else ""
    return f"{label}-L{layer}-{stats_label(args, hp.stats_tokens)[0]}{h}{gen}"


def _where(spec: str) -> str:
    """A path made absolute (the same run whether named relative or not); a model name as it is."""
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def settings_of(args: argparse.Namespace, layer: int, hp: EditHParams) -> dict:
    """What the run folder's results depend on (besides the method)."""
    return {"model": _where(args.model), "cases": _where(args.cases), "layer": layer, "stats": stats_label(args, hp.stats_tokens)[1],
            "hparams": {k: v for k, v in hp.to_dict().items() if k != "method"},
            "gen_new": args.gen_new, "gen_tokens": args.gen_tokens, "facts": [_where(f) for f in args.facts]}


# ---- summaries ------------------------------------------------------------------------------------


def _nanmean(xs: list) -> float:
    xs = [float(x) for x in xs if x is not None and not math.isnan(float(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def summary(rows: list[dict]) -> dict[str, float]:
    """summarize() (ES … S, fluency, ‖Δ‖ mean) plus GS, GPS, OS and medians over the cases."""
    s = summarize(rows)
    for k in ("gs", "gps", "gs_true", "gns", "degenerate", "os", "om"):
        s[k] = _nanmean([r.get(k) for r in rows])
    s["n_os"] = sum(r.get("n_other_facts", 0) > 0 for r in rows)
    if rows and "delta_fro" in rows[0]:
        s["delta_median"] = statistics.median(r["delta_fro"] for r in rows)
        s["reached"] = _nanmean([float(r["reached"]) for r in rows])
        s["seconds"] = statistics.median(r["edit_seconds"] for r in rows)
    return s


HEADER = ["protocol", "method", "n", "ES", "PS", "NS", "S", "EM", "PM", "NM", "GS", "GPS", "GNS", "degenerate", "OS (cases)",
          "fluency", "‖Δ‖_F median", "outcome reached", "s/edit"]


def row(protocol: str, method: str, s: dict) -> list:
    edited = "delta_median" in s
    return [protocol, method, s["n"], s["es"], s["ps"], s["ns"], s["score"], s["em"], s["pm"], s["nm"], s["gs"],
            s["gps"], s["gns"], s["degenerate"], f"{s['os']:.3f} ({s['n_os']})", s.get("fluency", float("nan")),
            f"{s['delta_median']:.3g}" if edited else "–", s["reached"] if edited else "–",
            f"{s['seconds']:.1f}" if edited else "–"]


# ---- main -----------------------------------------------------------------------------------------


def common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", required=True, help=f"{' or '.join(zoo.MODELS)} (downloaded once), or a model folder / .gguf file")
    ap.add_argument("--cases", default=str(CASES), help="CounterFact file (default: ../shared/data/counterfact/counterfact-edit.json)")
    ap.add_argument("--n", type=int, default=200, help="cases per protocol")
    ap.add_argument("--facts", nargs="*", default=[str(f) for f in (CASES.with_name("counterfact-train.json"),) if f.is_file()],
                    help="more case files whose facts of the edited subjects are checked (OS) besides --cases "
                         "(default: counterfact-train.json beside the default cases)")
    ap.add_argument("--stats-corpus", default=None, help="natural text for C (default: the library's default for the model)")
    ap.add_argument("--stats-tokens", type=int, default=None, help="tokens of statistics (default: EditHParams.stats_tokens)")
    ap.add_argument("--no-cov", action="store_true", help="C = I: no statistics at all (EasyEdit's default)")
    ap.add_argument("--hparams", default=None, help="JSON object of EditHParams overrides, e.g. '{\"v_steps\": 40}'")
    ap.add_argument("--gen-new", type=int, default=GEN_DEFAULTS[0], help="greedy tokens read for generation-based success")
    ap.add_argument("--gen-tokens", type=int, default=GEN_DEFAULTS[1], help="sampled tokens per generation prompt for fluency (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and docs/ alone")


def prepare(args: argparse.Namespace) -> tuple[ModelHandle, str, dict, dict, dict]:
    """Model, label, case selection, the subject-facts index and the EditHParams overrides."""
    if args.no_cov and args.stats_corpus:
        sys.exit("--no-cov uses no statistics; leave out --stats-corpus")
    torch.set_num_threads(args.threads)
    handle, label = resolve_model(args.model)
    cases = load_cases(args.cases)
    sel = select(handle.model, handle.tokenizer, cases, args.n, n_all=getattr(args, "n_all", None))
    more = [load_cases(f) for f in args.facts if Path(f).resolve() != Path(args.cases).resolve()]
    extra = json.loads(args.hparams) if args.hparams else {}
    if args.stats_tokens:
        extra["stats_tokens"] = args.stats_tokens
    return handle, label, sel, subject_facts(cases + [c for m in more for c in m]), extra


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(ap)
    ap.add_argument("--methods", nargs="+", default=["r-rome", "r-rome-bare", "p-rome", "rome"])
    ap.add_argument("--layer", type=int, default=None, help="default: the model card's layer, else n_layers // 8")
    ap.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    ap.add_argument("--n-all", type=int, default=None, help="cases of the all-cases protocol (default: --n)")
    ap.add_argument("--name", default=None, help="run folder under runs/real_counterfact (default from model, layer, statistics)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    handle, label, sel, facts, extra = prepare(args)
    layer = args.layer if args.layer is not None else handle.default_layer()
    hps = {m: resolve_settings(handle, {**extra, "method": m, "layer": layer}) for m in args.methods}  # refuses unknown methods
    hp0 = next(iter(hps.values()))
    name = args.name or run_name(label, layer, args, hp0)
    out = RUNS / name
    check_settings(out, settings_of(args, layer, hp0))
    print(f"{label}: {sel['scanned']} alignable cases scanned ({sel['unaligned']} not alignable), "
          f"{sel['n_known_scanned']} known ({sel['share_known']:.1%}); layer {layer}; results in {out}", flush=True)
    chosen = {p: sel[p] for p in args.protocols}
    union = list({c.case_id: c for p in args.protocols for c in chosen[p]}.values())
    before = unedited(handle, label, union, facts, args)
    results = run_methods(handle, union, facts, hps, out, args)
    rows = []
    for p in args.protocols:
        ids = [c.case_id for c in chosen[p]]
        rows.append(row(p, "unedited", summary([before[i] for i in ids])))
        rows += [row(p, m, summary([results[m][i] for i in ids])) for m in args.methods]
    body = f"""Model `{label}` ({handle.n_layers} layers), edit layer {layer}; cases `{args.cases}` in file order:
{sel['scanned']} alignable cases scanned ({sel['unaligned']} not alignable), of which **{sel['share_known']:.1%} known**
by the unedited model (P(true) > P(new) on the prompt). Protocol *known*: the first {len(chosen.get('known', []))} known
cases; *all*: the first {len(chosen.get('all', []))} cases. Each case edited alone, measured, reverted bit-exactly.
Key statistics: {stats_label(args, hp0.stats_tokens)[1]}. Hyper-parameters: {json.dumps({k: v for k, v in hp0.to_dict().items() if k != 'method'})}.

ES/PS/NS, EM/PM/NM: ROME's metrics (teacher forced over all target tokens, per-token mean probability);
S = harmonic mean of ES, PS, NS. GS / GPS: the greedy continuation ({args.gen_new} tokens, not cut to the
target's length) of the prompt / paraphrase states the new target as whole words (any case); in the
unedited row, GS of the true answer is {summary([before[c.case_id] for c in union])['gs_true']:.3f}. GNS: the neighbour prompt's greedy
continuation still states its own answer. Degenerate: share of cases where a greedy continuation (prompt,
paraphrase or neighbour) holds a special token or one token four times in a row (`degenerate`). OS: the edited subject's facts of
other relations in {', '.join(f'`{f}`' for f in [args.cases, *args.facts])} keep their true answer over the new target
(`other_facts`; in brackets the cases that have any). Fluency:
ROME's generation entropy of {args.gen_tokens} sampled tokens (top-5, seeded) per generation prompt.
"Outcome reached": the edit's own check (greedy answer starts with the target).

{table(HEADER, rows)}

{es_misses(results, [c.case_id for c in chosen[args.protocols[0]]], args.methods[0]) if "p-rome" in results else ""}
{ps_misses(results, [c.case_id for c in chosen[args.protocols[0]]], args.methods[0]) if "p-rome" in results else ""}

Total {time.perf_counter() - t_start:.0f} s for this invocation (finished cases are read back from runs/real_counterfact/{name}/).
"""
    publish(f"real_counterfact_{name}", f"CounterFact on a real model: {name}", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
