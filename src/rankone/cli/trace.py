"""`rankone trace` (one prompt's heatmaps, or the average indirect effect over a case file) and the
layer choice behind `rankone edit --layer auto`."""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Sequence

from rankone.core.errors import RankoneError
from rankone.trace.tracing import AIE, KINDS, Fact, TraceSettings

MAX_CASES = 200  # facts traced by default for an AIE (seeded sample when there are more)
AUTO_FACTS = 100  # testbed facts traced for --layer auto


# ---- case files -----------------------------------------------------------------------------

ANSWER_KEYS = ("answer", "ground_truth", "target_true", "target")  # first present wins


def load_cases(path: str | os.PathLike) -> tuple[list[Fact], list[str]]:
    """Facts to trace and the subjects that set the noise scale, from one of:

    * a testbed model folder or its world.json: every fact, in its first trained phrasing;
    * a .jsonl file (one object per line) or a .json list of objects with prompt, subject and the
      true answer as answer / ground_truth / target_true / target (CounterFact records work as
      they are; `target_new` is never read). Without an answer, the model's own prediction is traced.
    """
    p = Path(path)
    if p.is_dir() or p.name == "world.json":
        from rankone.testbed import World

        w = World.load(p)
        facts: list[Fact] = []
        for f in w.facts:
            train = w.prompts(f, "train") or w.prompts(f, "heldout")
            facts.append((train[0], f.subject, f.object))
        return facts, list(w.subjects)
    if not p.is_file():
        raise RankoneError(f"case file {p} does not exist; give a .jsonl/.json file of facts or a testbed folder")
    text = p.read_text(encoding="utf-8")
    records: list[Any]
    if p.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RankoneError(f"{p} is not valid JSON ({e.msg}); give a list of objects with prompt, subject, answer") from None
        if not isinstance(records, list):
            raise RankoneError(f"{p} must hold a JSON list of objects with prompt, subject, answer")
        where = [f"{p}[{i}]" for i in range(len(records))]
    else:
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise RankoneError(f"{p}:{n} is not valid JSON ({e.msg}); one object per line with prompt, subject, answer") from None
                where.append(f"{p}:{n}")
    facts = [_fact(r, at) for r, at in zip(records, where)]
    if not facts:
        raise RankoneError(f"case file {p} holds no facts")
    return facts, [f[1] for f in facts]


def _fact(r: Any, at: str) -> Fact:
    from rankone.core.tokens import EditRequest

    if isinstance(r, dict) and isinstance(r.get("requested_rewrite"), dict):  # CounterFact's nested form
        r = r["requested_rewrite"]
    if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("subject"), str):
        raise RankoneError(f"{at}: each case needs a 'prompt' and a 'subject' (and the true 'answer')")
    answer = next((r[k] for k in ANSWER_KEYS if k in r), None)
    if isinstance(answer, dict):
        answer = answer.get("str")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise RankoneError(f"{at}: the answer must be a non-empty string")
    try:
        req = EditRequest.create(r["prompt"], r["subject"], answer or "x")  # validates subject and prompt
    except RankoneError as e:
        raise RankoneError(f"{at}: {e}") from None
    return req.prompt, req.subject, answer.strip() if answer else None


def sample_facts(facts: Sequence[Fact], n: int, seed: int = 0) -> list[Fact]:
    """At most n facts: all of them, or a seeded sample kept in file order."""
    if n <= 0 or len(facts) <= n:
        return list(facts)
    keep = sorted(random.Random(seed).sample(range(len(facts)), n))
    return [facts[i] for i in keep]


# ---- the command ------------------------------------------------------------------------------


def register(sub: Any) -> None:
    from rankone.cli.common import model_args

    p = sub.add_parser("trace", help="causal tracing: where the model keeps a fact (heatmaps, average indirect effect)",
                       description="Corrupt the subject's embeddings with noise and restore clean hidden states, MLP "
                       "and attention outputs one (token, layer) at a time (Meng et al. 2022). One prompt gives "
                       "heatmaps; --cases gives the average indirect effect per layer that `edit --layer auto` uses.")
    model_args(p)
    p.add_argument("--prompt", help="e.g. '{} was born in' ({} marks the subject, or write it literally)")
    p.add_argument("--subject", help="the entity in the prompt whose tokens are corrupted, e.g. 'Danielle Darrieux'")
    p.add_argument("--target", help="the true answer (default: the model's own prediction)")
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
    return TraceSettings(n_samples=args.samples, noise_factor=args.noise_factor, noise_scale=args.noise_scale,
                         window=args.window, kinds=kinds, seed=args.seed, batch_rows=args.batch_rows)


def cmd_trace(args: argparse.Namespace) -> int:
    from rankone.core.atomic import check_out_dir

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
    facts, subjects = load_cases(args.cases) if args.cases else ([], [])
    if single:
        from rankone.core.tokens import EditRequest

        EditRequest.create(args.prompt, args.subject, args.target or "x")  # bad prompt/subject: fail before loading
    noise_subjects = load_cases(args.noise_from)[1] if args.noise_from else subjects
    check_out_dir(args.out, args.force)
    model, tok = _load(args)
    if not noise_subjects:
        noise_subjects = _testbed_subjects(model) or [args.subject]
    if single:
        return _trace_one(model, tok, args, settings, noise_subjects)
    return _trace_cases(model, tok, args, settings, sample_facts(facts, args.max_cases, args.seed), noise_subjects)


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from rankone.cli.common import load

    return load(args)


def _testbed_subjects(model: Any) -> list[str]:
    from rankone.models.load import testbed_info

    info = testbed_info(model)
    return [s for s in info.get("subjects", []) if isinstance(s, str)]


def _trace_one(model: Any, tok: Any, args: argparse.Namespace, settings: TraceSettings, noise_subjects: list[str]) -> int:
    from rankone.core.atomic import atomic_dir, write_json
    from rankone.trace.tracing import resolve_noise, trace_case
    from rankone.trace.plot import plot_trace

    nu = resolve_noise(model, tok, settings, noise_subjects)
    tr = trace_case(model, tok, args.prompt, args.subject, args.target, nu, settings)
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
        print(f"{tr.prompt} -> {tr.answer_token.strip()}: p clean {tr.p_clean:.3f}, corrupted {tr.p_corrupted:.3f} "
              f"(noise {nu:.4g}, {settings.n_samples} samples)")
        i = tr.positions.index(tr.subject_range[1])
        for kind in settings.kinds:
            row = tr.scores[kind][i]
            best = max(range(len(row)), key=row.__getitem__)
            print(f"  {kind:6} at the last subject token: strongest at layer {best} (p {row[best]:.3f})")
    print(f"wrote {args.out}: trace.json and {len(settings.kinds)} heatmap(s)")
    return 0


def _trace_cases(model: Any, tok: Any, args: argparse.Namespace, settings: TraceSettings,
                 facts: list[Fact], noise_subjects: list[str]) -> int:
    from rankone.core.atomic import atomic_dir, write_json
    from rankone.trace.tracing import cached_aie, trace_case
    from rankone.trace.plot import plot_aie, plot_trace

    bar = _bar(len(facts), args.quiet)
    aie = cached_aie(model, tok, facts, settings, noise_subjects, source=str(args.cases), progress=bar)
    _close(bar)
    chosen = aie.best_layer("mlp") if "mlp" in aie.aie else None
    with atomic_dir(args.out, args.force) as d:
        write_json(d / "aie.json", dict(aie.to_dict(), model=str(args.model), chosen_layer=chosen))
        plot_aie(aie, d / "aie.png", chosen)
        done = 0
        for prompt, subject, answer in facts:
            if done >= args.heatmaps:
                break
            tr = trace_case(model, tok, prompt, subject, answer, aie.noise_scale, settings)
            if tr.correct:
                write_json(d / f"case{done}.json", tr.to_dict())
                for kind in settings.kinds:
                    plot_trace(tr, kind, d / f"case{done}_{kind}.png", Path(args.model).name)
                done += 1
    if not args.quiet:
        print(f"average indirect effect at the last subject token over {aie.n_facts} facts "
              f"({aie.n_wrong} answered wrongly, not traced); total effect {aie.ate:.3f}")
        print("layer " + " ".join(f"{k:>8}" for k in aie.aie))
        for layer in range(len(next(iter(aie.aie.values())))):
            print(f"{layer:5} " + " ".join(f"{aie.aie[k][layer]:8.4f}" for k in aie.aie))
        if chosen is not None:
            print(f"--layer auto would edit layer {chosen} (largest MLP indirect effect)")
    print(f"wrote {args.out}: aie.json, aie.png" + (f" and heatmaps of {args.heatmaps} fact(s)" if args.heatmaps else ""))
    return 0


def _bar(total: int, quiet: bool) -> Any:
    """A progress callback step(i, n) for the tracing library (core.progress display)."""
    from rankone.core.progress import Progress

    bar = Progress(total, "tracing", "facts", enabled=not quiet)

    def step(i: int, n: int) -> None:
        bar.update(i - bar.n)

    step.bar = bar  # type: ignore[attr-defined]
    return step


def _close(step: Any) -> None:
    step.bar.close()


# ---- `rankone edit --layer auto` -------------------------------------------------------------------


def auto_layer(model: Any, tok: Any, args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """The layer with the largest average MLP indirect effect at the last subject token, and why.

    Evidence comes from, in order: a case file the command names (`--cases`/`--trace-cases` if
    it has one), this model's cached AIE with the most facts, the model's testbed facts (world.json),
    or the edit requests themselves traced with the model's own greedy answers.
    """
    from rankone.trace.tracing import best_cached_aie, cached_aie, model_fingerprint

    quiet = bool(getattr(args, "quiet", False))
    settings = TraceSettings(kinds=["mlp"])  # fixed noise seed: the choice does not depend on the edit's seed
    fp = model_fingerprint(model)
    aie: AIE | None = None
    tried: list[str] = []
    cases = getattr(args, "trace_cases", None) or getattr(args, "cases", None)
    if cases:
        facts, subjects = load_cases(cases)
        aie = cached_aie(model, tok, sample_facts(facts, MAX_CASES), settings, subjects, str(cases), fp, _bar(min(len(facts), MAX_CASES), quiet))
    if aie is None:
        aie = best_cached_aie(fp)
        if aie is not None and not aie.source:
            aie.source = "cache"
    if aie is None:
        from rankone.models.load import model_dir, testbed_info

        if testbed_info(model).get("facts"):
            facts, subjects = load_cases(model_dir(model))
            facts = sample_facts(facts, AUTO_FACTS)
            try:
                aie = cached_aie(model, tok, facts, settings, subjects, "testbed world.json", fp, _bar(len(facts), quiet))
            except RankoneError as e:
                tried.append(f"testbed facts: {e}")
    if aie is None:
        facts = [(r.prompt, r.subject, None) for r in _requests(args)]
        try:
            aie = cached_aie(model, tok, facts, settings, [f[1] for f in facts] + _testbed_subjects(model),
                             "edit requests (the model's own answers)", fp, _bar(len(facts), quiet))
        except RankoneError as e:
            tried.append(f"edit requests: {e}")
    if aie is None:
        raise RankoneError("cannot choose the layer by causal tracing (" + "; ".join(tried) + "); give --layer N, or "
                           "first run `rankone trace --model DIR --cases FILE` with facts the model answers correctly")
    layer = aie.best_layer("mlp")
    evidence = {
        "how": "largest average indirect effect of restoring MLP outputs at the last subject token (causal tracing)",
        "layer": layer, "kind": "mlp", "aie": aie.aie["mlp"], "sem": aie.sem.get("mlp", []),
        "n_facts": aie.n_facts, "n_wrong": aie.n_wrong, "window": aie.window, "noise_scale": aie.noise_scale,
        "settings": aie.settings, "source": aie.source, "cache_file": aie.cache_file,
        "model_sha256": fp,
    }
    if tried:
        evidence["not_used"] = tried  # evidence that was tried first and why it could not be used
    if not quiet:
        print(f"layer auto: layer {layer} (MLP AIE {aie.aie['mlp'][layer]:.4f}, the largest over layers "
              f"0..{len(aie.aie['mlp']) - 1}; {aie.n_facts} facts from {aie.source})")
    return layer, evidence


def _requests(args: argparse.Namespace) -> list[Any]:
    from rankone.core.tokens import EditRequest

    if getattr(args, "requests", None):
        from rankone.cli.common import load_requests

        return load_requests(args.requests)
    if getattr(args, "prompt", None) and getattr(args, "subject", None):
        return [EditRequest.create(args.prompt, args.subject, getattr(args, "target", None) or "x")]
    raise RankoneError("--layer auto needs edit requests, a testbed model or a traced case file to choose a layer from")
