"""`rankone registry …` (the patch lifecycle) and `rankone export` (merged model or PEFT adapter).

Bad input is refused before anything is written: arguments, files and states are checked first,
the registry is created only by `add`, and output folders appear whole or not at all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .errors import RankoneError

FORMATS = ("merged", "peft")


# ---- helpers ----------------------------------------------------------------------------------


def _open(args: argparse.Namespace, create: bool = False) -> Any:
    from .registry import Registry

    return Registry(args.registry, create=create)


def _actor(args: argparse.Namespace) -> str:
    from .registry import os_user

    return args.author or os_user()


def _need_reason(args: argparse.Namespace, what: str) -> str:
    if not args.reason or not args.reason.strip():
        raise RankoneError(f"{what} needs --reason: the audit log records why")
    return args.reason.strip()


def model_fingerprints(model: Any, modules: list[str]) -> dict[str, str]:
    """sha256 of each listed module's [out, in] weight, and of every layer's edited projection."""
    from . import architectures as arch
    from .fingerprint import tensor_sha256

    names = set(modules) | {arch.proj_path(model, i) for i in range(arch.num_layers(model))}
    out = {}
    for m in sorted(names):
        try:
            out[m] = tensor_sha256(arch.weight_oi(arch.get_module(model, m)))
        except RankoneError:
            continue  # missing: the comparison names it
    return out


def _facts(summary: list[dict[str, Any]], limit: int = 60) -> str:
    s = "; ".join(f"{x['prompt'].replace('{}', x['subject'])} -> {x['target']}" for x in summary)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


def _patches_for(args: argparse.Namespace) -> tuple[list[Any], list[str]]:
    """--patch values: patch folders, or ids in the registry."""
    from .patch import Patch
    from .registry import is_patch_dir

    patches, sources = [], []
    reg = None
    for ref in args.patch:
        looks_like_id = len(ref) >= 4 and all(c in "0123456789abcdef" for c in ref.lower())
        if is_patch_dir(ref) or Path(ref).exists() or not looks_like_id:
            patches.append(Patch.load(ref))
            sources.append(str(ref))
            continue
        if reg is None:
            reg = _open(args)
        pid = reg.resolve(ref)
        patches.append(reg.load_patch(pid))
        sources.append(str(reg.patch_dir(pid)))
    return patches, sources


# ---- registry commands ------------------------------------------------------------------------


def cmd_add(args: argparse.Namespace) -> int:
    from .patch import Patch

    reason = _need_reason(args, "registry add")
    Patch.load(args.patch)  # a bad folder is refused before a registry is created
    with _open(args, create=True) as reg:
        rec, created = reg.add(args.patch, _actor(args), reason)
    if created:
        print(f"added {rec.id} (proposed): {rec.n_edits} edit(s): {_facts(rec.summary, 200)}")
    else:
        print(f"already registered: {rec.id} ({rec.state}); nothing changed")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import STATES

    if args.state and args.state not in STATES:
        raise RankoneError(f"unknown state {args.state!r}; one of {', '.join(STATES)}")
    with _open(args) as reg:
        recs = reg.list(args.state)
    if args.json:
        print(json.dumps([vars(r) for r in recs], indent=2))
        return 0
    if not recs:
        print("no patches" + (f" in state {args.state}" if args.state else ""))
        return 0
    rows = [(r.id, r.state, str(r.release_seq or ""), str(r.n_edits), r.added_at[:19].replace("T", " "), r.added_by, _facts(r.summary))
            for r in recs]
    print(_table(("id", "state", "release", "edits", "added (UTC)", "by", "facts"), rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .gates import GateReport

    with _open(args) as reg:
        rec = reg.get(args.id)
        vals = reg.validations(rec.id)
        log = reg.log(rec.id)
        deps = reg.dependents(rec.id)
        patch = reg.load_patch(rec.id)
        if args.json:
            print(json.dumps({"patch": vars(rec), "validations": vals, "audit": [vars(e) for e in log],
                              "dependents": deps, "store": str(reg.patch_dir(rec.id)), "manifest": patch.manifest()}, indent=2))
            return 0
        print(f"patch {rec.id}  state {rec.state}" + (f"  release #{rec.release_seq}" if rec.release_seq else ""))
        print(f"  store   {reg.patch_dir(rec.id)}")
        print(f"  added   {rec.added_at} by {rec.added_by}: {rec.reason or ''}")
        print(f"  base    {rec.base.get('model_type', '?')}, {rec.base.get('n_layers', '?')} layers ({rec.base.get('name_or_path', '')})")
        for i, e in enumerate(patch.edits):
            r = e.request
            print(f"  edit {i}  {e.module} ({e.method}) {r['prompt'].replace('{}', r['subject'])!r} -> {r['target']!r}  "
                  f"|Δ|_F={e.delta_fro:.4g}  base {e.sha256_before[:12]}…")
        if deps:
            print(f"  released patches built on it: {', '.join(deps)}")
        if vals:
            v = vals[-1]
            print(f"  latest validation ({len(vals)} in all): {v['at']} by {v['actor']}: {'pass' if v['passed'] else 'FAIL'}")
            print("    " + GateReport.from_dict(v["report"]).table().replace("\n", "\n    "))
        print("  history:")
        print("    " + _table(LOG_HEAD, [_log_row(e) for e in log]).replace("\n", "\n    "))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from .cli import load
    from .gates import GatePolicy, load_suite, run_gates

    suite = load_suite(args.suite)
    policy = GatePolicy.load(args.policy)
    with _open(args) as reg:
        rec = reg.get(args.id)
        if rec.state not in ("proposed", "validated"):
            raise RankoneError(f"patch {rec.id} is {rec.state}; only proposed or validated patches are validated")
        patch = reg.load_patch(rec.id)
        released = [(r.id, reg.load_patch(r.id)) for r in reg.released()]
        model, tok = load(args)
        reg.verify_base(model_fingerprints(model, reg.base_module_names()))
        report = run_gates(model, tok, patch, suite, policy, [p for _, p in released], [q for q, _ in released])
        print(f"validating {rec.id} ({_facts(rec.summary, 200)}) against {args.model}"
              + (f" with {len(released)} released patch(es)" if released else ""))
        print(report.table())
        rec = reg.record_validation(rec.id, report.to_dict(), report.passed, _actor(args), args.reason)
    print(f"{rec.id}: {rec.state}" + ("" if report.passed else " (validation failed; state unchanged, report stored)"))
    return 0 if report.passed else 1


def cmd_release(args: argparse.Namespace) -> int:
    from .conflicts import relation_map
    from .gates import GatePolicy

    policy = GatePolicy.load(args.policy)
    with _open(args) as reg:
        rec = reg.get(args.id)
        if rec.state != "validated":
            hint = "validate it first with `rankone registry validate`" if rec.state == "proposed" else f"it is {rec.state}"
            raise RankoneError(f"patch {rec.id} cannot be released: {hint}")
        kw: dict[str, Any] = {}
        if args.model:
            from .cli import load
            from .patch import apply_patch

            patch = reg.load_patch(rec.id)
            chain = reg.released()
            model, _ = load(args)
            fps = model_fingerprints(model, reg.base_module_names() + [e.module for e in patch.edits])
            reg.verify_base(fps)
            apply_patch(model, [reg.load_patch(r.id) for r in chain] + [patch]).revert()  # the real fit check
            kw = dict(base_modules=fps, verified_chain=[r.id for r in chain], relations=relation_map(args.model),
                      base_info={"name_or_path": str(Path(args.model).resolve())})
        vals = reg.validations(rec.id)
        seen = vals[-1]["report"].get("reference") if vals else None
        now_released = [r.id for r in reg.released()]
        rec, conflicts = reg.release(rec.id, _actor(args), args.reason, args.force, policy.conflict_key_cosine, **kw)
    if seen is not None and seen != now_released:
        print(f"note: validated with {len(seen)} released patch(es), released onto {len(now_released)}; "
              "validate again to check it against the current release")
    for c in conflicts:
        print(f"warning: released over a conflict (--force): {c.detail}")
    print(f"released {rec.id} as #{rec.release_seq}: {_facts(rec.summary, 200)}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    reason = _need_reason(args, "registry rollback")
    with _open(args) as reg:
        done = reg.rollback(args.id, _actor(args), reason, args.cascade)
    for q in done:
        print(f"rolled back {q}")
    print("run `rankone registry build` to write the model without it")
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    reason = _need_reason(args, "registry reject")
    with _open(args) as reg:
        rec = reg.reject(args.id, _actor(args), reason)
    print(f"rejected {rec.id}")
    return 0


def _log_row(e: Any) -> tuple[str, ...]:
    move = f"{e.from_state or '-'} -> {e.to_state}" if e.to_state else ""
    extra = ""
    if e.action == "build":
        extra = f"{e.details.get('format')} {e.details.get('out')} ({len(e.details.get('patches', []))} patch(es))"
    elif e.action == "release":
        extra = f"#{e.details.get('release_seq')}" + (" forced" if e.details.get("forced_over") else "")
    elif e.action.startswith("validate"):
        extra = f"{e.details.get('n_checks', 0) - e.details.get('n_failed', 0)}/{e.details.get('n_checks', 0)} checks"
    elif e.details.get("cascade_from"):
        extra = f"cascade from {e.details['cascade_from']}"
    return (str(e.seq), e.at[:19].replace("T", " "), e.actor, e.action, e.patch_id or "-", move, extra, e.reason or "")


LOG_HEAD = ("seq", "time (UTC)", "actor", "action", "patch", "state", "details", "reason")


def cmd_log(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        pid = reg.resolve(args.id) if args.id else None
        entries = reg.log(pid)
    if args.json:
        print(json.dumps([vars(e) for e in entries], indent=2))
        return 0
    print(_table(LOG_HEAD, [_log_row(e) for e in entries]))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from .atomic import atomic_dir, check_out_dir, write_json
    from .cli import load
    from .export import save_merged
    from .patch import apply_patch
    from .peft_export import save_peft_adapter
    from .registry import crash_point, utcnow

    with _open(args) as reg:
        chain = reg.released()
        if args.format == "peft" and not chain:
            raise RankoneError("nothing is released: an adapter needs at least one released patch")
        check_out_dir(args.out, args.force)
        patches = [reg.load_patch(r.id) for r in chain]
        model, tok = load(args)
        reg.verify_base(model_fingerprints(model, reg.base_module_names()))
        handle = apply_patch(model, patches)
        manifest = {
            "format": "rankone.registry-build", "built_at": utcnow(), "built_by": _actor(args),
            "registry": str(reg.path.resolve()), "output_format": args.format, "base_model": str(args.model),
            "base": {k: v for k, v in reg.base().items() if k != "modules"},
            "patches": [{"id": r.id, "release_seq": r.release_seq, "released_at": r.released_at, "n_edits": r.n_edits,
                         "facts": [f"{s['prompt'].replace('{}', s['subject'])} -> {s['target']}" for s in r.summary],
                         "reason": r.reason} for r in chain],
        }
        paths = [str(reg.patch_dir(r.id)) for r in chain]
        with atomic_dir(args.out, args.force) as tmp:
            if args.format == "merged":
                save_merged(model, tok, patches, paths, handle.originals, tmp, overwrite=True)
                write_json(tmp / "rankone" / "build.json", manifest)
            else:
                handle.revert()
                save_peft_adapter(model, patches, tmp, overwrite=True, sources=paths)
                write_json(tmp / "rankone_build.json", manifest)
            crash_point("build:staged")
        reg.record_build(str(Path(args.out).resolve()), _actor(args), [r.id for r in chain], args.format)
    print(f"wrote {args.out} ({args.format}): base {args.model} + {len(chain)} released patch(es) in release order"
          + "".join(f"\n  #{r.release_seq} {r.id}  {_facts(r.summary, 200)}" for r in chain))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        rep = reg.check(prune=args.prune)
    for p in rep.problems:
        print(f"problem: {p}")
    for o in rep.orphans:
        print(f"orphaned store folder (a crash before its row was committed; harmless): {o}"
              + (" — removed" if o in rep.pruned else ""))
    print("registry is consistent" if rep.ok else f"registry has {len(rep.problems)} problem(s)")
    return 0 if rep.ok else 1


# ---- export -----------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from .atomic import check_out_dir
    from .cli import load
    from .export import save_merged
    from .patch import apply_patch
    from .peft_export import save_peft_adapter

    patches, sources = _patches_for(args)
    check_out_dir(args.out, args.force)
    model, tok = load(args)
    handle = apply_patch(model, patches)  # refuses patches made for another base, all or nothing
    if args.format == "merged":
        save_merged(model, tok, patches, sources, handle.originals, args.out, args.force)
    else:
        handle.revert()
        save_peft_adapter(model, patches, args.out, args.force, sources)
    n = sum(len(p.edits) for p in patches)
    print(f"wrote {args.out} ({args.format}): {n} edit(s) from {len(patches)} patch(es)")
    return 0


# ---- parser -----------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    from .cli import model_args

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None,
                        help="registry database (default: $RANKONE_REGISTRY, else ~/.local/share/rankone/registry.db)")
    common.add_argument("--author", default=None, help="who does this (default: the OS user)")

    top = subparsers.add_parser("registry", help="record, validate, release, roll back and build patches",
                                description="The patch lifecycle: proposed → validated → released (→ rolled_back), with an audit log.")
    sub = top.add_subparsers(dest="registry_command", required=True)

    def add(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=fn)
        return p

    p = add("add", cmd_add, "register a patch folder (state: proposed)")
    p.add_argument("patch")
    p.add_argument("--reason", help="why this patch exists (required)")

    p = add("list", cmd_list, "list patches")
    p.add_argument("--state", default=None)
    p.add_argument("--json", action="store_true")

    p = add("show", cmd_show, "a patch: its edits, latest validation report and history")
    p.add_argument("id", help="patch id (or a unique prefix, or the patch folder)")
    p.add_argument("--json", action="store_true")

    p = add("validate", cmd_validate, "run a validation suite; the state becomes validated only on pass (exit 1 on fail)")
    p.add_argument("id")
    model_args(p)
    p.add_argument("--suite", required=True, help="JSONL checks: target, keep, perplexity (see rankone.gates)")
    p.add_argument("--policy", default=None, help="JSON thresholds (default: rankone.gates.GatePolicy; docs/policy.example.json)")
    p.add_argument("--reason", default=None)

    p = add("release", cmd_release, "append a validated patch to the release order (refuses conflicts unless --force)")
    p.add_argument("id")
    model_args(p, required=False)
    p.add_argument("--policy", default=None)
    p.add_argument("--force", action="store_true", help="release despite conflicts (recorded in the audit log)")
    p.add_argument("--reason", default=None)

    p = add("rollback", cmd_rollback, "take a released patch out of the release")
    p.add_argument("id")
    p.add_argument("--reason", help="why (required)")
    p.add_argument("--cascade", action="store_true", help="also roll back released patches made on top of it")

    p = add("reject", cmd_reject, "reject a proposed or validated patch")
    p.add_argument("id")
    p.add_argument("--reason", help="why (required)")

    p = add("log", cmd_log, "the audit log (append-only)")
    p.add_argument("id", nargs="?", default=None)
    p.add_argument("--json", action="store_true")

    p = add("build", cmd_build, "write the base model with every released patch applied in release order")
    model_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=FORMATS, default="merged")
    p.add_argument("--force", action="store_true", help="replace an existing --out")

    p = add("check", cmd_check, "verify that database, store and audit chain agree")
    p.add_argument("--prune", action="store_true", help="remove orphaned store folders older than 10 minutes")

    p = subparsers.add_parser("export", help="write patches as a merged Hugging Face model or a PEFT LoRA adapter",
                              description="Write patches as a merged Hugging Face model folder or a PEFT LoRA adapter.")
    p.set_defaults(func=cmd_export)
    model_args(p)
    p.add_argument("--patch", action="append", required=True, help="patch folder or registry id; repeat for several, in order")
    p.add_argument("--format", choices=FORMATS, default="merged")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true")
    p.add_argument("--registry", default=None, help="registry for --patch ids")
