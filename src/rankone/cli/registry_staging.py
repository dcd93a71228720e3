"""`rankone registry stage|abort`: a validated patch rolled out to a share of live traffic.

stage puts it in the candidate that `rankone serve` routes `--canary` % of users to (and re-runs
`--shadow` % of the other requests on); abort takes it out, with a reason. `registry promote`
is `registry release` of a staged patch (`cmd_release`); a running server merges it into stable
within seconds. Each is one audit entry.
"""

from __future__ import annotations

import argparse
from typing import Callable

from rankone.cli.registry_commands import _actor, _facts, _open, _transition
from rankone.core.errors import RankoneError


def percent(name: str) -> Callable[[str], float]:
    def parse(v: str) -> float:
        from rankone.lifecycle.staging import check_percent

        try:
            return check_percent(name, float(v))
        except (ValueError, RankoneError):
            raise argparse.ArgumentTypeError(f"--{name} is a percentage of traffic from 0 to 100, not {v!r}") from None
    return parse


def cmd_stage(args: argparse.Namespace) -> int:
    with _open(args) as reg:
        s = reg.stage(args.id, args.canary, args.shadow, _actor(args), args.reason)
    print(f"staged {s.id}: canary {s.canary:g} %, shadow {s.shadow:g} %: {_facts(s.summary, 200)}")
    return 0


def cmd_abort(args: argparse.Namespace) -> int:
    rec = _transition(args, "registry abort", lambda reg, who, why: reg.abort(args.id, who, why))
    print(f"aborted {rec.id}: out of the candidate")
    return 0
