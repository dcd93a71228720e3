"""`rankone eval`, `rankone bench sequential` and `rankone bench layers`: the papers' evaluation as commands.

    rankone eval --model DIR --patch P --cases FILE [--known-only] [--out eval.json]
    rankone eval --model DIR --cases FILE --edit-each --method rome      # one edit per case, reverted
    rankone bench sequential --model DIR --cases FILE --n 1000 --method rome --method r-rome --out runs/seq
    rankone bench sequential --model DIR --cases FILE --n 1000 --method memit --batch-size 100 --every 100 --out runs/seq
    rankone bench layers --model DIR --cases FILE --layers 1 2 3 4 5 --n 30     # what --layer auto then edits
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from rankone.cli.common import hparams_from, hparams_help, layer_arg, load, methods_help, model_args
from rankone.cli.common import non_negative_float as _non_negative
from rankone.cli.common import positive_int as _positive
from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import read_text
from rankone.core.text import shown
from rankone.edit.compaction import DEFAULT_COMPACT, TARGET_MODES, compact_methods
from rankone.eval.cases import KNOWN_RULES
from rankone.methods.base import DEFAULT_METHOD, METHODS

log = logging.getLogger(__name__)


# ---- shared --------------------------------------------------------------------------------


def _hparam_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", type=layer_arg, default=None, help="layer to edit (default: the model's recorded one)")
    p.add_argument("--hparams", help=hparams_help())
    p.add_argument("--seed", type=int, default=None, help="seed of the sampled context prefixes and of the case order (default 0)")
    p.add_argument("--stats-corpus", help="corpus for the key statistics (default: corpus.txt in the model folder)")
    p.add_argument("--stats-tokens", type=int, default=None, help="tokens of the corpus for the key statistics (default 1,000,000)")


def _given(args: argparse.Namespace, method: str | None = None) -> dict[str, Any]:
    """The user's hyper-parameters, checked before anything loads (merged with the model's own later)."""
    if args.layer == "auto":
        raise RankoneError("--layer auto is not available here; give a layer number (or leave it out)")
    return hparams_from(argparse.Namespace(**{**vars(args), "method": method or args.method}))


def _compaction_args(args: argparse.Namespace) -> dict[str, Any]:
    """--compact-* as SequentialConfig fields (the method's --compact-hparams checked like --hparams)."""
    if not args.compact_every:
        return {}
    given = hparams_from(argparse.Namespace(hparams=args.compact_hparams, method=args.compact_method))
    given.pop("method")
    return {"compact_every": args.compact_every, "compact_method": args.compact_method,
            "compact_targets": args.compact_targets, "compact_hparams": given}


def _check_file(path: str | None, what: str) -> None:
    if path is not None and not os.path.isfile(path):
        raise RankoneError(f"{what} {path} does not exist")


EVAL_N = 100  # rankone eval's default number of cases; a whole CounterFact or testbed file is --n all


def _count_or_all(value: str) -> int | None:
    """--n: a whole number ≥ 1, or 'all' (None: no limit)."""
    if value == "all":
        return None
    return _positive("--n")(value)


def _print_selection(info: dict[str, Any]) -> None:
    if info["n_unalignable"]:
        print(f"skipped {info['n_unalignable']} case(s) the tokenizer cannot align (e.g. {shown(info['unalignable'][0])})")
    if "n_known" in info:
        how = {"greedy": "whose true answer the model gives (first token, greedy)",
               "over-new": "the model knows (P(true) > P(new) on the prompt)"}[info["known_rule"]]
        print(f"kept {info['n_known']} of {info['n_read']} case(s) read {how}")


def _known(args: argparse.Namespace) -> bool | str:
    """--known-only's rule (False without it): "greedy" is recorded as True, as before the rule existed."""
    return (True if args.known_by == "greedy" else args.known_by) if args.known_only else False


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.3f}" if isinstance(x, float) and abs(x) < 1000 else (f"{x:.4g}" if isinstance(x, float) else str(x))


def print_table(rows: Sequence[tuple[str, Any, Any]]) -> None:
    print(f"{'metric':<28}{'before':>10}{'after':>10}{'change':>10}")
    for name, b, a in rows:
        ch = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        print(f"{name:<28}{_fmt(b):>10}{_fmt(a):>10}{_fmt(ch):>10}")


NAMES = [("es", "efficacy ES"), ("em", "efficacy magnitude EM"), ("ps", "paraphrase PS"), ("pm", "paraphrase PM"),
         ("ns", "neighbourhood NS"), ("nm", "neighbourhood NM"), ("score", "score S (hmean ES,PS,NS)"),
         ("top1_new", "new target top-1"), ("paraphrase_top1", "paraphrase top-1"), ("fluency", "fluency (entropy)"),
         ("delta_fro", "‖Δ‖_F")]


# ---- rankone eval --------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from rankone.core.progress import status

    # what starts now, on stdout with the command's other notes (stderr stays one line on an error)
    status(f"eval: reading {args.cases} and loading {args.model}; the scoring shows its progress and time left",
           enabled=not args.quiet, stream=sys.stdout)
    from rankone.artifacts.patch import Patch
    from rankone.core.atomic import check_out_file, write_json
    from rankone.eval.cases import load_cases
    from rankone.eval.glue import GLUE_TASKS, load_glue
    from rankone.eval.protocol import EvalSettings, evaluate_before_after

    if args.patch and args.edit_each:
        raise RankoneError("give either --patch (evaluate a patch) or --edit-each (edit every case alone), not both")
    if not args.patch and not args.edit_each:
        raise RankoneError("nothing to compare: give --patch P (repeatable) or --edit-each")
    check_out_file(args.out, [("--model", args.model), ("--cases", args.cases)]  # not a folder, not an input, and
                   + [("--patch", p) for p in args.patch or []])  # writable: refused now, not after the measuring
    _check_file(args.ppl_text, "--ppl-text file")
    if args.glue:
        for t in GLUE_TASKS:
            load_glue(args.glue, t)
    hp = _given(args) if args.edit_each else None  # checked now, merged with the model card's once loaded
    cases = load_cases(args.cases)
    patches = [Patch.load(p) for p in (args.patch or [])]
    handle = load(args)
    settings = EvalSettings(norm=args.norm, gen_tokens=args.gen_tokens, glue_dir=args.glue, glue_shots=args.glue_shots,
                            glue_n=args.glue_n,
                            ppl_text=read_text(args.ppl_text) if args.ppl_text else None)
    rep = evaluate_before_after(handle, cases, patches, hp, args.stats_corpus, settings, _known(args), args.n,
                                progress=not args.quiet)
    if not args.quiet:
        _print_selection(rep.selection)
        if len(rep.cases) < rep.selection["n_usable"]:
            print(f"evaluated {len(rep.cases)} of the {rep.selection['n_usable']} usable cases"
                  f"{', the edited ones first' if patches else ''} (--n all: every one)")
    if patches:
        _say_edited(patches, rep.cases, [bool(m["edited"]) for m in rep.after], rep.same_fact)
    result: dict[str, Any] = {"model": args.model, "cases": args.cases, "patches": args.patch or [], "norm": args.norm,
                              **rep.to_dict()}
    groups = result["summary"]
    for g, s in groups.items():
        print(f"\n{g} cases (n={s['after']['n']}):" if len(groups) > 1 or not args.quiet else "")
        print_table([(name, s["before"].get(k), s["after"].get(k)) for k, name in NAMES
                     if k in s["before"] or k in s["after"]])
    extra_b, extra_a = rep.extra_before, rep.extra_after
    if "perplexity" in extra_b:
        print_table([("held-out perplexity", extra_b["perplexity"], extra_a.get("perplexity"))])
    for t, r in extra_b.get("glue", {}).items():
        ra = extra_a.get("glue", {}).get(t, {})
        print_table([(f"GLUE {t} acc", r["acc"], ra.get("acc")), (f"GLUE {t} F1", r["f1"], ra.get("f1"))])
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


def _say_edited(patches: list[Any], cases: list[Any], exact: list[bool], same_fact: list[bool]) -> None:
    """Which cases the patch edited; a warning when none is among them (ES/PS then measure untouched facts)."""
    facts = [f"{r['prompt'].replace('{}', r['subject'])} -> {r['target']}" for p in patches for r in p.facts()]
    print(f"the patch edits {len(facts)} fact(s): {shown('; '.join(facts[:5]))}" + (" …" if len(facts) > 5 else ""))
    hit = [str(c.case_id) for c, x in zip(cases, exact) if x]
    if hit:
        print(f"edited cases among the {len(cases)}: {shown(', '.join(hit[:20]))}" + (" …" if len(hit) > 20 else ""))
        return
    near = [f"{c.case_id} (target {c.target_new!r})" for c, x in zip(cases, same_fact) if x]
    why = (f"; case(s) {shown(', '.join(near[:3]))} ask the same question with another target" if near else "")
    print(f"rankone: warning: none of the {len(cases)} case(s) is a fact the patch edited, so ES and PS measure facts "
          f"it did not touch{why}; give --cases with the patch's facts", file=sys.stderr)


# ---- rankone bench layers --------------------------------------------------------------------


def cmd_bench_layers(args: argparse.Namespace) -> int:
    from rankone.core.atomic import check_out_file, write_json
    from rankone.eval.cases import load_cases
    from rankone.eval.layer_sweep import sweep_layers
    from rankone.trace.layer_choice import MIN_SWEEP_CASES

    if args.layer is not None:
        raise RankoneError("bench layers compares the layers given by --layers; leave out --layer")
    if args.out:
        check_out_file(args.out, [("--model", args.model), ("--cases", args.cases)])
    hp = _given(args, DEFAULT_METHOD)  # the default method's sweep is what --layer auto reads
    cases = load_cases(args.cases)
    handle = load(args)
    known: bool | str = False if args.all_cases else args.known_by
    sw = sweep_layers(handle, cases, args.layers, hp, args.n, known, args.stats_corpus, source=str(args.cases),
                      progress=not args.quiet, log=None if args.quiet else print)  # stored when it has enough cases
    stored = sw.n_cases >= MIN_SWEEP_CASES
    best = sw.best_layer()
    print(f"{'layer':>5}{'ES':>8}{'PS':>8}{'NS':>8}{'S':>8}")
    for layer, s in sorted(sw.scores.items()):
        print(f"{layer:>5}" + "".join(f"{s[k]:8.3f}" for k in ("es", "ps", "ns", "score")) + ("   best" if layer == best else ""))
    if stored:
        print(f"best layer {best} (of {len(sw.scores)} measured, {sw.n_cases} cases); `rankone edit --layer auto` now "
              f"edits it on this model (stored in {sw.cache_file})")
    else:
        print(f"rankone: warning: {sw.n_cases} case(s) are fewer than the {MIN_SWEEP_CASES} a sweep needs to decide "
              f"`--layer auto`, so this one is not stored and --layer auto chooses as before; run with --n "
              f"{MIN_SWEEP_CASES} or more to store it", file=sys.stderr)
    if args.out:
        write_json(args.out, dict(sw.to_dict(), best_layer=best))
        print(f"wrote {args.out}")
    return 0


# ---- rankone bench sequential ----------------------------------------------------------------


def cmd_bench_sequential(args: argparse.Namespace) -> int:
    from rankone.core.atomic import apart_from_inputs
    from rankone.eval.cases import heldout_text_of, load_cases
    from rankone.eval.glue import GLUE_TASKS, load_glue
    from rankone.eval.plots import report
    from rankone.eval.protocol import select_cases
    from rankone.eval.sequential import SequentialConfig, SequentialRun
    from rankone.methods.base import method

    methods = list(dict.fromkeys(args.method or [DEFAULT_METHOD]))
    batch = [m for m in METHODS if not method(m).one_at_a_time]
    if args.batch_size > 1 and not any(m in batch for m in methods):
        raise RankoneError(f"--batch-size is for the batch methods ({', '.join(batch)}); "
                           f"{', '.join(methods)} edit one request at a time")
    if any(m in batch for m in methods) and args.every % args.batch_size:
        raise RankoneError(f"--every {args.every} must be a multiple of --batch-size {args.batch_size}: "
                           "the model is measured between batches")
    _check_file(args.ppl_text, "--ppl-text file")
    if args.glue:
        for t in GLUE_TASKS:
            load_glue(args.glue, t)
    cfg = SequentialConfig(n=args.n, every=args.every, retention_sample=args.retention_sample, ns_sample=args.ns_sample,
                           probe_sample=args.probe_sample, gen_prompts=args.gen_prompts, gen_tokens=args.gen_tokens,
                           guard=not args.no_guard, guard_factor=args.guard_factor, denom_factor=args.denom_factor,
                           spike_factor=args.guard_factor, norm=args.norm, seed=args.seed or 0, glue_dir=args.glue,
                           glue_n=args.glue_n, batch_size=args.batch_size, gs_sample=args.gs_sample,
                           **_compaction_args(args))
    given = [_given(args, m) for m in methods]
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise RankoneError(f"--out {out} exists and is a file; choose a folder")
    apart_from_inputs(out, [("--model", args.model), ("--cases", args.cases)])
    cases = load_cases(args.cases, seed=args.seed or 0)
    handle = load(args)
    # the edited cases and the pool the never-edited probes are drawn from (`probe_pool`), read in file order
    cases, info = select_cases(handle.model, handle.tokenizer, cases, _known(args), limit=args.n + 5 * args.probe_sample)
    if not args.quiet:
        _print_selection(info)
    if len(cases) < args.n:
        raise RankoneError(f"only {len(cases)} usable case(s) for --n {args.n}; ask for fewer edits or give more cases")
    ppl = read_text(args.ppl_text) if args.ppl_text else heldout_text_of(handle.cases_file())
    meta = {"model": str(Path(args.model).resolve()), "cases": str(args.cases), "known_only": _known(args),
            "selection": {k: v for k, v in info.items() if k != "unalignable"}}
    runs = [SequentialRun(handle, cases, g, out / m, cfg, None, ppl, meta,
                          args.stats_corpus, progress=not args.quiet,
                          checkpoint_s=args.checkpoint_minutes * 60 or None) for m, g in zip(methods, given)]
    for r in runs:  # every folder is checked before any run starts
        r.preflight(args.force)
    for r in runs:
        r.run(force=args.force)
    order = ("rome", *(m for m in METHODS if m != "rome"))  # ROME first: the baseline column
    done = {m: out / m for m in order if (out / m / "run.jsonl").is_file()}
    rep = report(done, out, title=args.title or Path(args.model).name)
    print(rep["markdown"].split("\n\n![")[0])
    print(f"wrote {out}/summary.md, summary.json and {', '.join(f.name for f in rep['figures'])}")
    return 0


# ---- registration ----------------------------------------------------------------------------


def _subparsers(sub: Any, name: str, help: str) -> Any:
    """The sub-command group `name` (e.g. `bench`), shared with other plugins that add to it."""
    if name in sub.choices:
        grp = sub.choices[name]
        return next(a for a in grp._actions if isinstance(a, argparse._SubParsersAction))
    grp = sub.add_parser(name, help=help, description=help)
    return grp.add_subparsers(dest=f"{name}_command", required=True)


def register(sub: Any) -> None:
    p = sub.add_parser("eval", help="evaluate edits the papers' way (ES, PS, NS, S, fluency) before and after",
                       description="Evaluate a patch (or one edit per case) on CounterFact-style cases: "
                                   "efficacy, paraphrase and neighbourhood scores, fluency, perplexity, GLUE.")
    model_args(p)
    p.add_argument("--cases", required=True, help="CounterFact .json/.jsonl (flat or ROME format), or a testbed folder/world.json")
    p.add_argument("--patch", action="append", help="patch folder; repeat to apply several in order")
    p.add_argument("--edit-each", action="store_true", help="instead of a patch: edit every case alone, measure, revert")
    p.add_argument("--method", choices=list(METHODS), default=None, help="with --edit-each: " + methods_help())
    _hparam_args(p)
    p.add_argument("--n", type=_count_or_all, default=EVAL_N,
                   help=f"evaluate the first N usable cases, the facts the patch edits first (default {EVAL_N}: minutes "
                        "on a small model); 'all' for every case")
    p.add_argument("--known-only", action="store_true", help="keep cases whose true answer the model gives")
    p.add_argument("--known-by", choices=KNOWN_RULES, default="greedy",
                   help="with --known-only: greedy (the true answer is the greedy first token; default) or over-new "
                        "(P(true) > P(new) on the prompt, the CounterFact papers' known cases)")
    p.add_argument("--norm", choices=["mean", "sum"], default="mean",
                   help="compare per-token mean log-probs (ROME, default) or whole-target log-probs")
    p.add_argument("--gen-tokens", type=int, default=50, help="tokens generated per prompt for fluency (0: skip)")
    p.add_argument("--ppl-text", help="held-out text file for perplexity")
    p.add_argument("--glue", help="folder with sst2/mrpc/rte/cola .json for few-shot downstream scores")
    p.add_argument("--glue-n", type=_positive("--glue-n"), default=100, help="GLUE records per task (default 100)")
    p.add_argument("--glue-shots", type=int, default=4, help="solved examples shown before each GLUE query (default 4)")
    p.add_argument("--out", default="rankone-eval.json", help="JSON file to write (default rankone-eval.json)")
    p.add_argument("--quiet", action="store_true", help="no progress display and fewer notes")
    p.set_defaults(func=cmd_eval)

    bench = _subparsers(sub, "bench", "benchmarks on your own model and data")
    p = bench.add_parser("sequential", help="N edits in sequence without reverting, measured every k edits",
                         description="Sequential editing: ‖Δ‖ of every edit, ‖W−W₀‖, efficacy, retention of earlier "
                                     "and never-edited facts, NS, fluency and perplexity every k edits; JSONL, plots "
                                     "and a summary in --out; resumable.")
    model_args(p)
    p.add_argument("--cases", required=True, help="CounterFact file or testbed folder (edited in file order)")
    p.add_argument("--n", type=_positive("--n"), required=True, help="number of edits")
    p.add_argument("--method", action="append", choices=list(METHODS),
                   help="repeat to compare methods (each runs in OUT/METHOD; default r-rome); the batch methods (memit, alphaedit, emmet) "
                        "edit in batches of --batch-size. With several methods --hparams must suit all of them; "
                        "runs made one method at a time into the same --out are compared in one report")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=1,
                   help="edits per batch for the batch methods (default 1; the ROME family always edits one at a "
                        "time); --every must be a multiple of it")
    _hparam_args(p)
    p.add_argument("--out", required=True, help="folder for the runs, plots and summary")
    p.add_argument("--every", type=_positive("--every"), default=10, help="evaluate and checkpoint every k edits")
    p.add_argument("--checkpoint-minutes", type=_non_negative("--checkpoint-minutes"), default=10.0,
                   help="also checkpoint between evaluations once this many minutes have passed since the last "
                        "checkpoint, so an interrupted run loses at most that much (default 10; 0: only at evaluations)")
    p.add_argument("--no-guard", action="store_true", help="write every update, even anomalous ones (flag them only)")
    p.add_argument("--guard-factor", type=float, default=10.0, help="refuse/flag ‖Δ‖ above this × the running median")
    p.add_argument("--denom-factor", type=float, default=10.0, help="refuse a denominator below running median / this")
    p.add_argument("--known-only", action="store_true", help="edit only cases whose true answer the model gives")
    p.add_argument("--known-by", choices=KNOWN_RULES, default="greedy",
                   help="with --known-only: greedy (the true answer is the greedy first token; default) or over-new "
                        "(P(true) > P(new) on the prompt, the CounterFact papers' known cases)")
    p.add_argument("--retention-sample", type=_positive("--retention-sample"), default=100,
                   help="earlier edits re-tested at each evaluation (default 100)")
    p.add_argument("--ns-sample", type=_positive("--ns-sample"), default=100, help="neighbourhood prompts tested (default 100)")
    p.add_argument("--probe-sample", type=int, default=100, help="never-edited known facts tested (0: none)")
    p.add_argument("--gs-sample", type=int, default=0,
                   help="generation-based success (greedy continuation states the new target) of this many edited "
                        "cases spread over the run, at each evaluation (default 0: not measured)")
    p.add_argument("--gen-prompts", type=int, default=4, help="generation prompts for fluency at each evaluation (default 4)")
    p.add_argument("--gen-tokens", type=_positive("--gen-tokens"), default=40, help="tokens generated per fluency prompt (default 40)")
    p.add_argument("--norm", choices=["mean", "sum"], default="mean",
                   help="compare per-token mean log-probs (default) or whole-target log-probs")
    p.add_argument("--ppl-text", help="held-out text for perplexity (default for testbeds: held-out phrasings)")
    p.add_argument("--glue", help="folder with GLUE subsets: few-shot scores at the start and the end")
    p.add_argument("--glue-n", type=_positive("--glue-n"), default=40, help="GLUE records per task (default 40)")
    p.add_argument("--compact-every", type=int, default=0,
                   help="every this many edits, replace the run's patch by its compaction from the base weights "
                        "(one solve over every key so far, as `rankone registry compact`; a multiple of --batch-size; "
                        "default 0: never)")
    p.add_argument("--compact-method", choices=compact_methods(), default=DEFAULT_COMPACT,
                   help="with --compact-every: the compaction's solve (default emmet)")
    p.add_argument("--compact-targets", choices=TARGET_MODES, default="written",
                   help="with --compact-every: what each key keeps, as written by its edit (default) or as released")
    p.add_argument("--compact-hparams", default=None, help="with --compact-every: JSON of the compaction method's settings")
    p.add_argument("--title", help="title of the plots")
    p.add_argument("--force", action="store_true", help="start over in a folder that holds another run")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_bench_sequential)

    p = bench.add_parser("layers", help="single-edit ES/PS/NS/S at each of several layers; --layer auto then edits the best",
                         description="Edit each of the first N cases the model knows alone at every given layer, score "
                                     "it (ES, PS, NS, S) and revert it. The result is stored with the model's other "
                                     "caches, and `rankone edit --layer auto` edits the best layer from then on "
                                     "(causal tracing only where no sweep was measured).")
    model_args(p)
    p.add_argument("--cases", required=True, help="CounterFact file or testbed folder (read in file order)")
    p.add_argument("--layers", type=int, nargs="+", required=True, help="layers to compare, e.g. 1 2 3 4 5")
    p.add_argument("--n", type=_positive("--n"), default=30,
                   help="cases edited at each layer (default 30); a sweep of fewer than 20 is shown but not stored, "
                        "so --layer auto does not follow it")
    _hparam_args(p)
    p.add_argument("--known-by", choices=KNOWN_RULES, default="over-new",
                   help="which cases the model knows: over-new (P(true) > P(new), default) or greedy")
    p.add_argument("--all-cases", action="store_true", help="use every alignable case, known or not")
    p.add_argument("--out", help="also write the sweep to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_bench_layers)
