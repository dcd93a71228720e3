"""`rankone registry stage|promote|abort`: a validated patch rolled out to a share of live traffic.

stage puts it in the candidate that `rankone serve` routes `--canary` % of users to (and re-runs
`--shadow` % of the other requests on); promote releases it (a running server merges it into
stable within seconds); abort takes it out, with a reason. Each is one audit entry.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from rankone.cli.registry_commands import _actor, _facts, _need_reason, _open
from rankone.core.errors import RankoneError


def _percent(name: str) -> Callable[[str], float]:
    def parse(v: str) -> float:
        from rankone.lifecycle.staging import check_percent

        try:
            return check_percent(name, float(v))
        except (ValueError, RankoneError):
            raise argparse.ArgumentTypeError(f"--{name} is a percentage of traffic from 0 to 100, not {v!r}") from None
    return parse


def add_staging_commands(add: Callable[..., argparse.ArgumentParser], id_help: str) -> None:
    from rankone.cli.common import model_args

    p = add("stage", cmd_stage, "roll a validated patch out to a share of live traffic (rankone serve): canary and/or shadow")
    p.add_argument("id", help=id_help)
    p.add_argument("--canary", type=_percent("canary"), default=0.0,
                   help="percentage of users (sticky per user) whose requests get the candidate (0-100)")
    p.add_argument("--shadow", type=_percent("shadow"), default=0.0,
                   help="percentage of the other requests re-run on the candidate after answering, compared, never shown")
    p.add_argument("--reason", default=None, help="a note for the audit log")

    p = add("promote", cmd_promote, "release a staged patch (a running rankone serve merges it into stable)")
    p.add_argument("id", help=id_help)
    model_args(p, required=False)
    p.add_argument("--policy", default=None, help="JSON thresholds; its conflict_key_cosine decides key overlaps (default 0.9)")
    p.add_argument("--force", action="store_true", help="promote despite conflicts (recorded in the audit log)")
    p.add_argument("--reason", default=None, help="a note for the audit log")

    p = add("abort", cmd_abort, "take a staged patch out of the candidate for good")
    p.add_argument("id", help=id_help)
    p.add_argument("--reason", help="why (required)")


def cmd_stage(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        s = reg.stage(args.id, args.canary, args.shadow, _actor(args), args.reason)
    print(f"staged {s.id}: canary {s.canary:g} %, shadow {s.shadow:g} %: {_facts(s.summary, 200)}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from rankone.lifecycle.gates import GatePolicy

    policy = GatePolicy.load(args.policy)
    with _open(args) as reg:
        rec = reg.get(args.id)
        if rec.state != "staged":
            raise RankoneError(f"patch {rec.id} is {rec.state}; only a staged patch is promoted (`rankone registry stage` first)")
        model: Any = None
        if args.model:
            from rankone.cli.common import load

            model = load(args)  # the registry applies the release and this patch to it, then reverts
        rec, conflicts = reg.promote(rec.id, _actor(args), args.reason, force=args.force,
                                     conflict_threshold=policy.conflict_key_cosine, model=model)
    for c in conflicts:
        print(f"warning: promoted over a conflict (--force): {c.detail}")
    print(f"promoted {rec.id} to released #{rec.release_seq}: {_facts(rec.summary, 200)}")
    return 0


def cmd_abort(args: argparse.Namespace) -> int:
    reason = _need_reason(args, "registry abort")
    with _open(args) as reg:
        rec = reg.abort(args.id, _actor(args), reason)
    print(f"aborted {rec.id}: out of the candidate")
    return 0
