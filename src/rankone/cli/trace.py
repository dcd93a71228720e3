"""`rankone trace`: one prompt's heatmaps, or the average indirect effect over a case file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from rankone.core.errors import RankoneError
from rankone.core.text import shown
from rankone.trace import KINDS, MAX_CASES

if TYPE_CHECKING:  # imported where they are used: the parser must not pay for torch
    from rankone.trace.runs import TraceSettings


# ---- the command ------------------------------------------------------------------------------


def register(sub: Any) -> None:
    from rankone.cli.common import model_args, text_arg

    p = sub.add_parser("trace", help="causal tracing: where the model keeps a fact (heatmaps, average indirect effect)",
                       description="Corrupt the subject's embeddings with noise and restore clean hidden states, MLP "
                       "and attention outputs one (token, layer) at a time (Meng et al. 2022). One prompt gives "
                       "heatmaps; --cases gives the average indirect effect per layer that `edit --layer auto` uses.")
    model_args(p)
    p.add_argument("--prompt", type=text_arg("--prompt"), help="e.g. '{} was born in' ({} marks the subject, or write it literally)")
    p.add_argument("--subject", type=text_arg("--subject"), help="the entity in the prompt whose tokens are corrupted, e.g. 'Danielle Darrieux'")
    p.add_argument("--target", type=text_arg("--target"), help="the true answer (default: the model's own prediction)")
    p.add_argument("--cases", help="facts for the average indirect effect: .jsonl/.json of {prompt, subject, answer}, "
                   "CounterFact records, or a testbed folder")
    p.add_argument("--max-cases", type=int, default=MAX_CASES, help=f"trace at most this many facts (default {MAX_CASES}; 0 = all)")
    p.add_argument("--heatmaps", type=int, default=0, help="with --cases: also write heatmaps for the first N correct facts")
    p.add_argument("--samples", type=int, default=10, help="noise samples per restoration (default 10)")
    p.add_argument("--noise-factor", type=float, default=3.0, help="noise = FACTOR × std of subject embeddings (default 3)")
    p.add_argument("--noise-scale", type=float, default=None, help="an absolute noise standard deviation instead")
    p.add_argument("--noise-from", help="case file or testbed whose subjects set the embedding std "
                   "(default: the cases, else the model's testbed, else the traced subject)")
    p.add_argument("--window", type=int, default=None, help="MLP/attention layers restored together (default min(10, n_layers//4), at least 1)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of hidden,mlp,attn")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise samples (default 0)")
    p.add_argument("--batch-rows", type=int, default=128, help="rows per forward pass (lower for big models)")
    p.add_argument("--out", required=True, help="folder for the JSON and PNG files")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_trace)


def settings_from(args: argparse.Namespace) -> TraceSettings:
    kinds = [k.strip() for k in str(args.kinds).split(",") if k.strip()]
    from rankone.trace.runs import TraceSettings

    return TraceSettings(n_samples=args.samples, noise_factor=args.noise_factor, noise_scale=args.noise_scale,
                         window=args.window, kinds=kinds, seed=args.seed, batch_rows=args.batch_rows)


def cmd_trace(args: argparse.Namespace) -> int:
    from rankone.cli.common import load
    from rankone.core.atomic import check_out_dir
    from rankone.eval.cases import fact_set, known_fact_set
    from rankone.trace.tracing import sample_facts

    single = args.prompt is not None or args.subject is not None or args.target is not None
    if single and args.cases:
        raise RankoneError("give either --prompt/--subject [--target] or --cases FILE, not both")
    if not single and not args.cases:
        raise RankoneError("trace needs --prompt and --subject (one fact) or --cases FILE (average over facts)")
    if single and not (args.prompt and args.subject):
        raise RankoneError("tracing one fact needs both --prompt and --subject")
    if args.max_cases < 0 or args.heatmaps < 0:
        raise RankoneError("--max-cases and --heatmaps must be zero or positive")
    settings = settings_from(args)
    cases = fact_set(args.cases) if args.cases else None
    if single:
        from rankone.core.tokens import EditRequest

        EditRequest.create(args.prompt, args.subject, args.target or "x")  # bad prompt/subject: fail before loading
    noise_subjects = fact_set(args.noise_from).subjects if args.noise_from else (cases.subjects if cases else [])
    check_out_dir(args.out, args.force, [("--model", args.model), ("--cases", args.cases), ("--noise-from", args.noise_from)])
    handle = load(args)
    if not noise_subjects:
        known = known_fact_set(handle)
        noise_subjects = known.subjects if known else [args.subject]
    if single:
        return _trace_one(handle, args, settings, noise_subjects)
    assert cases is not None
    return _trace_cases(handle, args, settings, sample_facts(cases.facts, args.max_cases, args.seed), noise_subjects)


def _trace_one(handle: Any, args: argparse.Namespace, settings: TraceSettings, noise_subjects: list[str]) -> int:
    from rankone.core.atomic import atomic_dir, write_json
    from rankone.trace.plot import plot_trace
    from rankone.trace.runs import trace_case
    from rankone.trace.tracing import resolve_noise

    nu = resolve_noise(handle, settings, noise_subjects)
    tr = trace_case(handle, args.prompt, args.subject, args.target, nu, settings)
    if not tr.correct:
        print(f"rankone: not traced: the model continues {tr.prompt!r} with {tr.predicted!r}, not {tr.answer_token!r}; "
              "causal tracing explains answers the model gets right", file=sys.stderr)
        return 1
    name = Path(args.model).name
    with atomic_dir(args.out, args.force) as d:
        write_json(d / "trace.json", dict(tr.to_dict(), model=str(args.model), settings=settings.to_dict(),
                                          noise_subjects=len(set(noise_subjects))))
        for kind in settings.kinds:
            plot_trace(tr, kind, d / f"trace_{kind}.png", name)
    if not args.quiet:
        print(f"{shown(tr.prompt)} -> {shown(tr.answer_token.strip())}: p clean {tr.p_clean:.3f}, corrupted {tr.p_corrupted:.3f} "
              f"(noise {nu:.4g}, {settings.n_samples} samples)")
        i = tr.positions.index(tr.subject_range[1])
        for kind in settings.kinds:
            row = tr.scores[kind][i]
            best = max(range(len(row)), key=row.__getitem__)
            print(f"  {kind:6} at the last subject token: strongest at layer {best} (p {row[best]:.3f})")
    print(f"wrote {args.out}: trace.json and {len(settings.kinds)} heatmap(s)")
    return 0


def _trace_cases(handle: Any, args: argparse.Namespace, settings: TraceSettings,
                 facts: Sequence[Any], noise_subjects: list[str]) -> int:
    from rankone.core.atomic import atomic_dir, write_json
    from rankone.trace.plot import plot_aie, plot_trace
    from rankone.trace.runs import trace_case
    from rankone.core.progress import Stepper
    from rankone.trace.tracing import cached_aie

    step = Stepper("tracing", "facts", enabled=not args.quiet)
    try:
        aie = cached_aie(handle, facts, settings, noise_subjects, source=str(args.cases), progress=step)
    finally:
        step.close()
    chosen = aie.best_layer("mlp") if "mlp" in aie.aie else None
    with atomic_dir(args.out, args.force) as d:
        write_json(d / "aie.json", dict(aie.to_dict(), model=str(args.model), chosen_layer=chosen))
        plot_aie(aie, d / "aie.png", chosen)
        done = 0
        for prompt, subject, answer in facts:
            if done >= args.heatmaps:
                break
            tr = trace_case(handle, prompt, subject, answer, aie.noise_scale, settings)
            if tr.correct:
                write_json(d / f"case{done}.json", tr.to_dict())
                for kind in settings.kinds:
                    plot_trace(tr, kind, d / f"case{done}_{kind}.png", Path(args.model).name)
                done += 1
    if not args.quiet:
        print(f"average indirect effect at the last subject token over {aie.n_facts} facts "
              f"({aie.n_wrong} answered wrongly, {len(aie.skipped)} not alignable: not traced); total effect {aie.ate:.3f}")
        print("layer " + " ".join(f"{k:>8}" for k in aie.aie))
        for layer in range(len(next(iter(aie.aie.values())))):
            print(f"{layer:5} " + " ".join(f"{aie.aie[k][layer]:8.4f}" for k in aie.aie))
        if chosen is not None:
            print(f"tracing picks layer {chosen} (largest MLP indirect effect): what --layer auto edits unless "
                  "`rankone bench layers` measured this model's layers")
    print(f"wrote {args.out}: aie.json, aie.png" + (f" and heatmaps of {args.heatmaps} fact(s)" if args.heatmaps else ""))
    return 0
