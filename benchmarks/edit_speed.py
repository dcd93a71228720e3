"""Edit speed on real models, side by side with the published ROME recipe.

    python benchmarks/edit_speed.py [--models smollm2-135m gemma3-270m] [--cases 50 20]
                                    [--stats-tokens 100000] [--parts stats cli edits]
                                    [--layer N] [--report-only]

Per model (from `rankone.models.zoo.real_model_dir`), each part checkpointed under
runs/edit_speed/<model>/ and skipped (cases: resumed) when re-run:

* stats.json: key-statistics tokens/s of the truncated pass against a full forward pass over
  the same batches, whether the two C are bit-identical, and the RSS growth of each pass;
* cli.json: wall time of `rankone edit` run twice on the model folder with no --stats-corpus
  (the first run samples a corpus and templates, the second finds them cached), and the second
  run's split into import, load, templates, statistics, edit and write;
* cases-published.jsonl: on the same CounterFact cases (counterfact-edit.json, in file order,
  those the tokenizer aligns) at --layer (default: the model's), with the same templates, cached
  statistics and C⁻¹, rankone's edit with ROME's update (method rome), rankone with its default
  method, and the published ROME recipe re-implemented step for step (benchmarks/rome_reference.py),
  each timed (key, value, solve, and the wall time of the whole edit), scored (ES/PS/NS on the
  edit, rephrase and locality prompts) and reverted exactly; the three run in one process, in
  rotating order, so that the machine's load falls on all of them. Its section of BENCHMARKS.md
  is written every 5 cases.

Threads are torch's default (not set here), and so is OpenMP's wait policy unless OMP_WAIT_POLICY is
set for the run (recorded with each case, as is the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, table, write_section  # noqa: E402
from rome_reference import inverse_cov, reference_edit  # noqa: E402

from rankone.artifacts.patch import revert_patch  # noqa: E402
from rankone.core import architectures as arch  # noqa: E402
from rankone.core.errors import RankoneError  # noqa: E402
from rankone.edit.editor import Editor  # noqa: E402
from rankone.eval.cases import cases_from_records  # noqa: E402
from rankone.eval.metrics import alignable, evaluate_cases, hmean  # noqa: E402
from rankone.methods.base import resolve_settings  # noqa: E402
from rankone.methods.rome import EditHParams  # noqa: E402
from rankone.methods.stats import BATCH_TOKENS, collect_mom2  # noqa: E402
from rankone.models.handle import ModelHandle  # noqa: E402
from rankone.models.load import load_model  # noqa: E402
from rankone.models.zoo import models_cache_dir, real_model_dir  # noqa: E402

RUNS = Path(os.environ.get("RANKONE_BENCH_RUNS", ROOT / "runs" / "edit_speed"))
DATA = Path(os.environ.get("RANKONE_DATA", ROOT.parent / "shared" / "data"))  # beside the checkout
COUNTERFACT = DATA / "counterfact" / "counterfact-edit.json"
TEXT = DATA / "text" / "tinyshakespeare.txt"
# Module paths for a model type the table does not list (Gemma 3 is laid out like Llama).
LLAMA_LIKE = {"layers": "model.layers", "mlp": "model.layers.{}.mlp", "proj": "model.layers.{}.mlp.down_proj",
              "attn": "model.layers.{}.self_attn", "embed": "model.embed_tokens"}
QUIET_RUNS = ROOT / "runs" / "edit_speed_quiet"  # a short check of the same comparison with nothing else running
PUBLISHED_CASES = "cases-published.jsonl"  # the side-by-side edits (the recipe as published)
SIDES = ["rankone", "reference", "rankone_default"]
CLI_EDIT = ["--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower", "--target", "Rome"]


def models_root() -> Path:
    """The zoo's usual model cache, also in the subprocesses to which this script gives its own
    RANKONE_CACHE (for templates, statistics and corpora, never for models)."""
    if os.environ.get("RANKONE_BENCH_MODELS"):
        return Path(os.environ["RANKONE_BENCH_MODELS"])
    own = os.environ.get("RANKONE_CACHE", "").startswith(str(RUNS))
    return Path.home() / ".cache" / "rankone" / "models" if own else models_cache_dir()


def model_dir(name: str) -> Path:
    return real_model_dir(name, cache=models_root())


def load(name: str) -> tuple[Any, Any, str | None]:
    d = model_dir(name)
    try:
        model, tok = load_model(d)
        return model, tok, None
    except RankoneError:
        return (*load_model(d, arch_spec=LLAMA_LIKE), json.dumps(LLAMA_LIKE))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss(every_s: float = 0.002) -> Iterator[dict[str, float]]:
    """RSS before, and its peak while the body runs (sampled by a thread), in MB."""
    out = {"before_mb": rss() / 2**20, "peak_mb": 0.0}
    stop = threading.Event()

    def watch() -> None:
        peak = rss()
        while not stop.wait(every_s):
            peak = max(peak, rss())
        out["peak_mb"] = max(peak, rss()) / 2**20

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["growth_mb"] = out["peak_mb"] - out["before_mb"]


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


# ---- statistics -------------------------------------------------------------------------------


def stats_part(name: str, model: Any, tok: Any, n_tokens: int, cmp_batch: int) -> dict[str, Any]:
    layer = ModelHandle.of(model, tok).default_layer()
    res: dict[str, Any] = {"layer": layer, "tokens": n_tokens, "cmp_batch_tokens": cmp_batch,
                           "default_batch_tokens": BATCH_TOKENS, "load_start": load_avg()}
    runs = {}
    for how, truncate in (("truncated", True), ("full", False)):
        with peak_rss() as mem:
            t = time.perf_counter()
            c, count = collect_mom2(ModelHandle.of(model, tok), [layer], TEXT, n_tokens, batch_tokens=cmp_batch, progress=False, truncate=truncate)
            dt = time.perf_counter() - t
        runs[how] = c[layer]
        res[how] = {"seconds": dt, "tokens_per_s": count / dt, "count": count, **mem}
    res["c_bit_identical"] = bool(torch.equal(runs["truncated"], runs["full"]))
    res["max_abs_diff"] = float((runs["truncated"] - runs["full"]).abs().max())
    # The statistics pass as an edit runs it (truncated, default batch), in a fresh process: the
    # allocator of this one still holds what the full pass used.
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--mem-probe", name], env=cli_env(RUNS / name / "cache"),
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"memory probe failed: {p.stderr[-2000:]}")
    res["default_batch_memory"] = json.loads(p.stdout.strip().splitlines()[-1])
    res["load_end"] = load_avg()
    return res


def mem_probe(name: str) -> None:
    model, tok, _ = load(name)
    with peak_rss() as mem:
        collect_mom2(ModelHandle.of(model, tok), [ModelHandle.of(model, tok).default_layer()], TEXT, 4 * BATCH_TOKENS, progress=False)
    print(json.dumps(mem))


# ---- the CLI ----------------------------------------------------------------------------------


def cli_env(cache: Path) -> dict[str, str]:
    return dict(os.environ, RANKONE_CACHE=str(cache), PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1",
                RANKONE_BENCH_MODELS=str(models_root()))


def cli_part(name: str, spec: str | None, hparams: str | None) -> dict[str, Any]:
    cache = RUNS / name / "cache"
    d = str(model_dir(name))
    res: dict[str, Any] = {"load_start": load_avg()}
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, "-m", "rankone.cli.main", "edit", "--model", d, *CLI_EDIT, "--quiet",
                "--out", f"{tmp}/p", "--force"] + (["--arch-spec", spec] if spec else []) + (["--hparams", hparams] if hparams else [])
        for run in ("first", "second"):
            t = time.perf_counter()
            p = subprocess.run(argv, env=cli_env(cache), capture_output=True, text=True)
            res[f"{run}_wall_s"] = time.perf_counter() - t
            if p.returncode:
                raise SystemExit(f"rankone edit failed ({p.returncode}): {p.stderr[-2000:]}")
            res[f"{run}_stderr"] = p.stderr.strip().splitlines()[-3:]
        split = [sys.executable, str(Path(__file__).resolve()), "--cli-split", name, "--out", f"{tmp}/q"]
        split += (["--arch-spec", spec] if spec else []) + (["--cli-hparams", hparams] if hparams else [])
        p = subprocess.run(split, env=cli_env(cache), capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"split run failed: {p.stderr[-2000:]}")
        res["split"] = json.loads(p.stdout.strip().splitlines()[-1])
    res["load_end"] = load_avg()
    return res


def cli_split(name: str, out: str, spec: str | None, hparams: str | None) -> None:
    """What `rankone edit` does, step by step, timed (run in a fresh process with warm caches)."""
    import psutil

    started = psutil.Process().create_time()
    from rankone.cli.common import hparams_from, load as cli_load
    from rankone.cli.main import build_parser
    from rankone.core.tokens import EditRequest

    argv = ["edit", "--model", str(model_dir(name)), *CLI_EDIT, "--quiet", "--out", out]
    argv += (["--arch-spec", spec] if spec else []) + (["--hparams", hparams] if hparams else [])
    args = build_parser().parse_args(argv)  # imports the command's modules (torch, transformers)
    given = hparams_from(args)
    clock = {"import_s": time.time() - started}
    t = time.perf_counter()
    ed = Editor(cli_load(args), given, args.stats_corpus, progress=False)
    clock["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ed.templates  # noqa: B018 (sampled or read now, to time it)
    clock["templates_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ed.stats()
    clock["statistics_s"] = time.perf_counter() - t
    t = time.perf_counter()
    patch = ed.edit([EditRequest.create(args.prompt, args.subject, args.target)])
    clock["edit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    patch.save(out, overwrite=True)
    clock["write_s"] = time.perf_counter() - t
    clock["total_s"] = time.time() - started
    print(json.dumps(clock))


# ---- edits, side by side ---------------------------------------------------------------------


def metrics(model: Any, tok: Any, case: Any) -> dict[str, float]:
    m = evaluate_cases(model, tok, [case])[0]
    return {k: m[k] for k in ("es", "ps", "ns", "p_new", "p_true")}


def edits_part(name: str, model: Any, tok: Any, n: int, stats_tokens: int, layer: int | None,
               checkpoint: Callable[[], None]) -> None:
    """rankone beside the published ROME recipe on the same cases, interleaved, checkpointed per case."""
    out = RUNS / name / PUBLISHED_CASES
    done = {json.loads(x)["case_id"] for x in out.read_text().splitlines()} if out.exists() else set()
    cases = cases_from_records(json.loads(COUNTERFACT.read_text()), str(COUNTERFACT), n_neighbours=1)
    cases = alignable(model, tok, cases)[0][:n]
    given = {"layer": layer} if layer is not None else {}
    handle = ModelHandle.of(model, tok)
    hp = resolve_settings(handle, {"stats_tokens": stats_tokens, "method": "rome", **given})  # ROME's update, as published
    cache = RUNS / name / "cache" / "edits"
    editors = {"rankone": Editor(handle, hp, TEXT, cache_dir=cache, progress=False),
               "rankone_default": Editor(handle, hp.replace(method=EditHParams().method), TEXT, cache_dir=cache, progress=False)}
    layer, templates = editors["rankone"].layer, editors["rankone"].templates
    inv_cov = inverse_cov(editors["rankone"].stats(layer))  # the published code inverts C once per layer and keeps it
    w = arch.weight_oi(handle.proj(layer))
    for i, case in enumerate(cases):
        if case.case_id in done:
            continue
        rec: dict[str, Any] = {"case_id": case.case_id, "layer": layer, "load": load_avg(), "threads": torch.get_num_threads(),
                               "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "base": metrics(model, tok, case)}
        before = w.detach().clone()
        for side in SIDES[i % 3:] + SIDES[: i % 3]:  # rotated, so that no side always runs first
            t = time.perf_counter()
            if side in editors:
                patch = editors[side].edit([case.request], keep=True)
                wall = time.perf_counter() - t
                e = patch.edits[0]
                m = metrics(model, tok, case)
                revert_patch(model, patch)
                timing, v = e.diagnostics["timing"], e.diagnostics["value"]
                extra = {"steps": v["steps"], "target_prob": v["target_prob"], "stopped_early": v["stopped_early"],
                         "early_stop_prob": v["early_stop_prob"], "passes": v["passes"], "delta_fro": e.delta_fro}
            else:
                upd, timing, trace = reference_edit(handle, case.request, layer, templates, inv_cov, hp)
                with torch.no_grad():
                    w.add_(upd.to(w.dtype))
                wall = time.perf_counter() - t
                m = metrics(model, tok, case)
                with torch.no_grad():
                    w.copy_(before)
                extra = {"steps": len(trace.losses), "target_prob": trace.target_prob, "stopped_early": trace.stopped_early,
                         "delta_fro": float(upd.norm())}
            assert torch.equal(w, before), "revert was not exact"
            rec[side] = {**timing, "total_s": sum(timing.values()), "wall_s": wall, **m, **extra}
        rec["load_end"] = load_avg()
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"[{name}] case {case.case_id}: " + ", ".join(f"{k} {rec[k]['wall_s']:.1f} s" for k in SIDES)
              + f", load {rec['load']}-{rec['load_end']}", flush=True)
        if (i + 1) % 5 == 0:
            checkpoint()  # the section so far, in case the run is stopped


# ---- the report -------------------------------------------------------------------------------


def summary(rows: list[dict[str, Any]], side: str) -> dict[str, float]:
    keys = ("key_s", "value_s", "solve_s", "total_s", "steps") + (("wall_s",) if "wall_s" in rows[0][side] else ())
    med = {k: statistics.median(r[side][k] for r in rows) for k in keys}
    mean = {k: statistics.mean(r[side][k] for r in rows) for k in ("es", "ps", "ns", "target_prob")}
    mean["s"] = hmean([mean["es"], mean["ps"], mean["ns"]])
    return {**med, **mean}


def published_report(models: list[str]) -> str:
    """The per-edit comparison with the published recipe (cases-published.jsonl of each model)."""
    parts = []
    for name in models:
        f = RUNS / name / PUBLISHED_CASES
        if not f.exists():
            continue
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        s = {side: summary(rows, side) for side in SIDES}
        ratio = lambda side, k: statistics.median(r["reference"][k] / r[side][k] for r in rows)  # noqa: E731
        spread = lambda side: "{:.1f}-{:.1f}×".format(*(f(r["reference"]["wall_s"] / r[side]["wall_s"] for r in rows)  # noqa: E731
                                                      for f in (min, max)))
        base = {k: statistics.mean(r["base"][k] for r in rows) for k in ("es", "ps", "ns")}
        loads, same = load_range(rows), agreeing(rows)
        policy = sorted({r.get("omp_wait_policy") or "default" for r in rows})
        labels = {"rankone": "rankone, method rome (ROME's update)",
                  "rankone_default": f"rankone, method {EditHParams().method} (its default)",
                  "reference": "published ROME recipe (benchmarks/rome_reference.py)"}
        parts.append(
            f"### {name}\n\n{len(rows)} CounterFact cases (counterfact-edit.json, first alignable), layer {rows[0]['layer']}, "
            f"statistics cached ({TEXT.name}), the same 21 context templates and C for every side; the three sides run "
            f"in one process, in rotating order per case; torch threads {sorted({r['threads'] for r in rows})}, "
            f"OMP_WAIT_POLICY {', '.join(policy)}; load average {loads} on {os.cpu_count()} cores "
            f"(a shared machine). Wall: the whole edit call (rankone's `Editor.edit`, which also writes the patch entry "
            f"and checks the outcome; the recipe's edit and adding ΔW); compute: key + value + solve.\n\n"
            + table(["recipe", "key s", "value s", "solve s", "compute s (median)", "wall s / edit (median)",
                     "value passes (median)", "p(target)", "ES", "PS", "NS", "S"],
                    [[labels[k], v["key_s"], v["value_s"], v["solve_s"], v["total_s"], v["wall_s"], v["steps"],
                      v["target_prob"], v["es"], v["ps"], v["ns"], v["s"]] for k, v in s.items()])
            + f"\n\nPer edit, rankone (method rome) is **{ratio('rankone', 'wall_s'):.2f}×** faster than the published "
            f"recipe in wall time (median of per-case ratios, which range {spread('rankone')} as the load moves; "
            f"{ratio('rankone', 'total_s'):.2f}× in compute; ratio of "
            f"median walls {s['reference']['wall_s'] / s['rankone']['wall_s']:.2f}×), and with its default method "
            f"{ratio('rankone_default', 'wall_s'):.2f}×. The recipe's loss-based early stop fired in "
            f"{sum(r['reference']['stopped_early'] for r in rows)} of {len(rows)} cases, rankone's p(target) ≥ "
            f"{rows[0]['rankone']['early_stop_prob']} stop in {sum(r['rankone']['stopped_early'] for r in rows)}. rankone "
            f"(method rome) and the recipe agree on ES, PS and NS in {same} of {len(rows)} cases. Unedited model on the "
            f"same prompts: ES {base['es']:.2f}, PS {base['ps']:.2f}, NS {base['ns']:.2f}." + quiet_check(name))
    return "\n\n".join(parts)


def load_range(rows: list[dict[str, Any]]) -> str:
    """The load average over the cases, from their starts and ends: "lo-hi"."""
    loads = [x for r in rows for x in (r["load"], r.get("load_end", r["load"]))]
    return f"{min(loads):.1f}-{max(loads):.1f}"


def agreeing(rows: list[dict[str, Any]]) -> int:
    """Cases where rankone (method rome) and the recipe score the same ES, PS and NS."""
    return sum(all(r["rankone"][k] == r["reference"][k] for k in ("es", "ps", "ns")) for r in rows)


def quiet_check(name: str) -> str:
    """The first cases again on a quiet machine (nothing else running), where such a run exists:
    RANKONE_BENCH_RUNS=runs/edit_speed_quiet, the same command with fewer --cases."""
    f = QUIET_RUNS / name / PUBLISHED_CASES
    if not f.exists():
        return ""
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    per = {side: [r["reference"]["wall_s"] / r[side]["wall_s"] for r in rows] for side in ("rankone", "rankone_default")}
    return (f"\n\nThe first {len(rows)} of these cases again on a quiet machine (nothing else running, load average "
            f"{load_range(rows)}; `OMP_WAIT_POLICY=PASSIVE RANKONE_BENCH_RUNS=runs/edit_speed_quiet python "
            f"benchmarks/edit_speed.py --models {name} --cases {len(rows)} --parts edits --layer {rows[0]['layer']}`): "
            f"rankone (method rome) **{statistics.median(per['rankone']):.2f}×** (per case "
            f"{min(per['rankone']):.1f}-{max(per['rankone']):.1f}×, median walls {statistics.median(r['rankone']['wall_s'] for r in rows):.1f} s "
            f"against {statistics.median(r['reference']['wall_s'] for r in rows):.1f} s), its default method "
            f"{statistics.median(per['rankone_default']):.2f}×; ES, PS and NS agree in {agreeing(rows)} of {len(rows)} cases.")


def report(models: list[str]) -> str:
    parts = []
    for name in models:
        d = RUNS / name
        sec = [f"### {name}"]
        if (d / "cases-early-stop-0.95.jsonl").exists():  # an earlier run with early_stop_prob = 0.95
            old = [json.loads(x) for x in (d / "cases-early-stop-0.95.jsonl").read_text().splitlines()]
            o, f = summary(old, "rankone"), summary(old, "rankone_no_stop")
            sec.append(f"With the earlier threshold p(target) ≥ 0.95 ({len(old)} cases, same protocol, runs/edit_speed/{name}/"
                       f"cases-early-stop-0.95.jsonl): ES/PS/NS {o['es']:.2f}/{o['ps']:.2f}/{o['ns']:.2f} against "
                       f"{f['es']:.2f}/{f['ps']:.2f}/{f['ns']:.2f} without the early stop (median {o['steps']:.0f} against 20 "
                       f"passes): stopping at 0.95 lost paraphrases, hence the default 0.99.")
        if (d / "stats.json").exists():
            s = json.loads((d / "stats.json").read_text())
            sec.append(
                f"Key statistics at layer {s['layer']}, {s['truncated']['count']:,} tokens of {TEXT.name} in batches of "
                f"{s['cmp_batch_tokens']} tokens: truncated pass **{s['truncated']['tokens_per_s']:,.0f} tokens/s**, full "
                f"forward pass {s['full']['tokens_per_s']:,.0f} tokens/s (**{s['truncated']['tokens_per_s'] / s['full']['tokens_per_s']:.2f}×**); "
                f"C bit-identical: **{s['c_bit_identical']}** (max |ΔC| {s['max_abs_diff']:.1e}). RSS growth during the pass: "
                f"truncated {s['truncated']['growth_mb']:,.0f} MB, full {s['full']['growth_mb']:,.0f} MB; at the default batch "
                f"({s['default_batch_tokens']} tokens, in a fresh process) the truncated pass grows RSS by "
                f"**{s['default_batch_memory']['growth_mb']:,.0f} MB** (process peak, model loaded: "
                f"**{s['default_batch_memory']['peak_mb']:,.0f} MB**). Load average {s['load_start']}-{s['load_end']}.")
        if (d / "cli.json").exists():
            c = json.loads((d / "cli.json").read_text())
            sp = c["split"]
            sec.append(
                f"`rankone edit` on the model folder with no --stats-corpus: first run {c['first_wall_s']:.1f} s (samples the "
                f"statistics corpus and the templates), **second run {c['second_wall_s']:.1f} s**. The second run's split "
                f"(same steps in a fresh process): " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in sp.items() if k != "total_s")
                + f" (total {sp['total_s']:.1f} s). Load average {c['load_start']}-{c['load_end']}.")
        parts.append("\n\n".join(sec))
    return "\n\n".join(parts)


def write_reports(models: list[str], parts: list[str]) -> None:
    """The sections whose data this run has: the published-recipe comparison (edits), the rest."""
    if "edits" in parts and published_report(models):
        body = published_report(models)
        print(body)
        write_section("edit_speed_published", "Per edit against the published ROME recipe", body)
    has_data = any((RUNS / m / f).exists() for m in models for f in ("stats.json", "cli.json", "cases-early-stop-0.95.jsonl"))
    if {"stats", "cli"} & set(parts) and has_data:  # never replace the section by one without its figures
        body = report(models)
        print(body)
        write_section("edit_speed", "Edit speed on real models", body)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--cases", nargs="+", type=int, default=[50, 20], help="cases per model, in --models order")
    ap.add_argument("--stats-tokens", type=int, default=100_000, help="statistics budget of the side-by-side edits")
    ap.add_argument("--cmp-tokens", type=int, default=16_384, help="tokens of the truncated-vs-full statistics comparison")
    ap.add_argument("--parts", nargs="+", default=["stats", "cli", "edits"])
    ap.add_argument("--layer", type=int, default=None, help="the edited layer of the side-by-side edits (default: the model's)")
    ap.add_argument("--cli-hparams", default=None, help="--hparams for the CLI runs (default: none, as a user types it)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--cli-split", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mem-probe", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--arch-spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem_probe:
        return mem_probe(args.mem_probe)
    if args.cli_split:
        return cli_split(args.cli_split, args.out, args.arch_spec, args.cli_hparams)
    for name, n in zip(args.models, args.cases + args.cases[-1:] * len(args.models)):
        if args.report_only:
            break
        (RUNS / name).mkdir(parents=True, exist_ok=True)
        model, tok, spec = load(name)
        cmp_batch = BATCH_TOKENS if model.config.vocab_size <= 65_536 else 1024  # full-pass logits must fit in memory
        if "stats" in args.parts and not (RUNS / name / "stats.json").exists():
            (RUNS / name / "stats.json").write_text(json.dumps(stats_part(name, model, tok, args.cmp_tokens, cmp_batch), indent=1))
        if "edits" in args.parts:
            edits_part(name, model, tok, n, args.stats_tokens, args.layer, lambda: write_reports(args.models, ["edits"]))
        if "cli" in args.parts and not (RUNS / name / "cli.json").exists():  # last: its first run samples a corpus
            (RUNS / name / "cli.json").write_text(json.dumps(cli_part(name, spec, args.cli_hparams), indent=1))
    write_reports(args.models, args.parts)


if __name__ == "__main__":
    main()
