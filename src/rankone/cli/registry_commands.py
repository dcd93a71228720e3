"""What `rankone registry add|list|show|validate|release|rollback|reject|log|check` do.

The helpers here (opening the registry, the actor, tables) are shared with `registry build` and
`export` (`rankone.cli.build`); the parser is `rankone.cli.registry`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rankone.core.errors import RankoneError
from rankone.core.text import shown


# ---- helpers ----------------------------------------------------------------------------------


def _open(args: argparse.Namespace, create: bool = False) -> Any:
    from rankone.lifecycle.registry import Registry

    return Registry(args.registry, create=create)


def _actor(args: argparse.Namespace) -> str:
    from rankone.core.util import user_name

    return args.author or user_name()


def _need_reason(args: argparse.Namespace, what: str) -> str:
    if not args.reason or not args.reason.strip():
        raise RankoneError(f"{what} needs --reason: the audit log records why")
    return args.reason  # stored as given (escaped where shown)


def _transition(args: argparse.Namespace, command: str, act: Any) -> Any:
    """A state change that needs a reason: act(registry, actor, reason), its result."""
    reason = _need_reason(args, command)
    with _open(args) as reg:
        return act(reg, _actor(args), reason)


def _facts(summary: list[dict[str, Any]], limit: int = 60) -> str:
    s = shown("; ".join(f"{x['prompt'].replace('{}', x['subject'])} -> {x['target']}" for x in summary))
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Aligned columns; every cell is escaped for the terminal (free text is one cell, one line)."""
    rows = [tuple(shown(c) for c in r) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


# ---- registry commands ------------------------------------------------------------------------


def cmd_add(args: argparse.Namespace) -> int:
    from rankone.artifacts.patch import Patch

    reason = _need_reason(args, "registry add")
    Patch.load(args.patch)  # a bad folder is refused before a registry is created
    with _open(args, create=True) as reg:
        try:
            rec, created = reg.add(args.patch, _actor(args), reason)
        except BaseException:
            reg.discard_if_new()  # e.g. a full disk: no empty registry left behind
            raise
    if created:
        print(f"added {rec.id} (proposed): {rec.n_edits} edit(s): {_facts(rec.summary, 200)}")
    else:
        print(f"already registered: {rec.id} ({rec.state}); nothing changed")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rankone.lifecycle.records import STATES

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
    from rankone.lifecycle.gates import GateReport

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
        print(f"  store   {shown(reg.patch_dir(rec.id))}")
        print(f"  added   {shown(rec.added_at)} by {shown(rec.added_by)}: {shown(rec.reason)}")
        print(f"  base    {shown(rec.base.get('model_type', '?'))}, {shown(rec.base.get('n_layers', '?'))} layers "
              f"({shown(rec.base.get('name_or_path', ''))})")
        for i, e in enumerate(patch.edits):
            r = e.request
            print(f"  edit {i}  {shown(e.module)} ({shown(e.method)}) {r['prompt'].replace('{}', r['subject'])!r} -> {r['target']!r}  "
                  f"|Δ|_F={e.delta_fro:.4g}  base {e.sha256_before[:12]}…")
        if deps:
            print(f"  released patches built on it: {', '.join(deps)}")
        if vals:
            v = vals[-1]
            print(f"  latest validation ({len(vals)} in all): {shown(v['at'])} by {shown(v['actor'])}: "
                  f"{'pass' if v['passed'] else 'FAIL'}")
            print("    " + GateReport.from_dict(v["report"]).table().replace("\n", "\n    "))
        print("  history:")
        print("    " + _table(LOG_HEAD, [_log_row(e) for e in log]).replace("\n", "\n    "))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from rankone.cli.common import load
    from rankone.lifecycle.gates import GatePolicy, load_suite, run_gates
    from rankone.models.generation import check_fits

    suite = load_suite(args.suite)
    policy = GatePolicy.load(args.policy)
    with _open(args) as reg:
        rec = reg.get(args.id)
        reg.require("validate", rec.id, rec.state)  # refused before the model loads
        patch = reg.load_patch(rec.id)
        released = [(r.id, reg.load_patch(r.id)) for r in reg.released()]
        handle = load(args)
        reg.check_model(handle)
        for c in suite.checks:  # a prompt longer than the context would be judged on an empty answer
            if c.prompt:
                check_fits(handle.model, handle.tokenizer, c.prompt, policy.answer_tokens, f"{c.where}: the prompt")
        report = run_gates(handle.model, handle.tokenizer, patch, suite, policy, [p for _, p in released],
                           [q for q, _ in released], spec=handle.spec)
        print(f"validating {rec.id} ({_facts(rec.summary, 200)}) against {args.model}"
              + (f" with {len(released)} released patch(es)" if released else ""))
        print(report.table())
        rec = reg.record_validation(rec.id, report.to_dict(), report.passed, _actor(args), args.reason)
    print(f"{rec.id}: {rec.state}" + ("" if report.passed else " (validation failed; state unchanged, report stored)"))
    return 0 if report.passed else 1


def cmd_release(args: argparse.Namespace) -> int:
    from rankone.lifecycle.gates import GatePolicy

    promote = getattr(args, "promote", False)  # `registry promote`: the same release, of a staged patch
    policy = GatePolicy.load(args.policy)
    with _open(args) as reg:
        rec = reg.get(args.id)
        reg.require("promote" if promote else "release", rec.id, rec.state)  # refused before the model loads
        model = None
        if args.model:
            from rankone.cli.common import load

            model = load(args)  # the registry applies the release and this patch to it, then reverts
        vals = reg.validations(rec.id)
        seen = vals[-1]["report"].get("reference") if vals else None
        now_released = [r.id for r in reg.released()]
        rec, conflicts = reg.release(rec.id, _actor(args), args.reason, args.force, policy.conflict_key_cosine,
                                     model=model, promote=promote)
    if seen is not None and seen != now_released:
        print(f"note: validated with {len(seen)} released patch(es), released onto {len(now_released)}; "
              "validate again to check it against the current release")
    for c in conflicts:
        print(f"warning: released over a conflict (--force): {c.detail}")
    print(f"{'promoted' if promote else 'released'} {rec.id} as #{rec.release_seq}: {_facts(rec.summary, 200)}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    reason = _need_reason(args, "registry rollback")
    with _open(args) as reg:
        done = reg.rollback(args.id, _actor(args), reason, args.cascade)
        again = [r for q in done for r in reg.replaced_by(q)]
    for q in done:
        print(f"rolled back {q}")
    if again:
        print(f"released again (the compaction rolled back): {', '.join(again)}")
    print("run `rankone registry build` to write the model without it")
    return 0


def cmd_reject(args: argparse.Namespace) -> int:
    rec = _transition(args, "registry reject", lambda reg, who, why: reg.reject(args.id, who, why))
    print(f"rejected {rec.id}")
    return 0


def _log_row(e: Any) -> tuple[str, ...]:
    move = f"{e.from_state or '-'} -> {e.to_state}" if e.to_state else ""
    extra = ""
    if e.action == "build":
        extra = f"{e.details.get('format')} {e.details.get('out')} ({len(e.details.get('patches', []))} patch(es))"
    elif e.action == "release":
        extra = f"#{e.details.get('release_seq')}" + (" forced" if e.details.get("forced_over") else "")
    elif e.action == "compact":
        extra = f"#{e.details.get('release_seq')} replaces {len(e.details.get('replaces', []))}"
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
