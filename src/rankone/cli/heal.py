"""`rankone heal`: failing probes and user reports turned into a validated, staged, released patch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rankone.core.errors import RankoneError

def register(subparsers: Any) -> None:
    from rankone.cli.common import model_args, positive_int

    p = subparsers.add_parser(
        "heal", help="turn failing probes and user reports into a validated, staged, released patch",
        description="Collect failing probes and `wrong` reports, triage them (K distinct users or a trusted source, "
                    "re-checked on the deployed model, protected facts refused), find missing subjects, propose one "
                    "patch, validate it with the gates and, with --server, roll it out (shadow, canary steps) and "
                    "promote, abort or pause on measured evidence. Every decision is an audit entry.")
    p.set_defaults(func=cmd_heal)
    p.add_argument("--registry", default=None,
                   help="registry database (default: $RANKONE_REGISTRY, else ~/.local/share/rankone/registry.db)")
    p.add_argument("--probes", required=True, help="JSONL probes: prompt, expected, and optionally subject, paraphrases, "
                                                   "neighbours, protected")
    p.add_argument("--server", default=None, help="URL of the `rankone serve` that serves this registry (e.g. "
                                                  "http://127.0.0.1:8000); without it heal proposes and validates only")
    p.add_argument("--policy", default=None, help="heal policy JSON (default: rankone.heal.policy.HealPolicy's defaults)")
    p.add_argument("--admin-token-file", default=None,
                   help="file holding the server's admin token (default: $RANKONE_ADMIN_TOKEN); --server needs it")
    once = p.add_mutually_exclusive_group(required=True)
    once.add_argument("--once", action="store_true", help="one cycle (a rollout it starts runs to its decision)")
    once.add_argument("--watch", action="store_true", help="cycle until stopped (policy watch_interval_s between cycles)")
    p.add_argument("--max-cycles", type=positive_int("--max-cycles"), default=None, help="with --watch: stop after N cycles")
    p.add_argument("--dry-run", action="store_true", help="print the plan (reports, edits, refusals and why); change nothing")
    model_args(p, required=False)
    next(a for a in p._actions if a.dest == "model").help = (
        "the registry's base model (default: the model the server serves, else the registry's recorded base)")


def _token(args: argparse.Namespace) -> str:
    from rankone.cli.serve import TOKEN_ENV, admin_token

    token = admin_token(args)
    if not token:
        raise RankoneError(f"--server needs the server's admin token: --admin-token-file FILE or ${TOKEN_ENV}")
    return token


def _model_path(args: argparse.Namespace, client: Any, registry: str) -> str:
    if args.model:
        return args.model
    if client is not None:
        src = client.status().get("source")
        if src:
            return src
    from rankone.lifecycle.registry import Registry

    with Registry(registry, create=False) as reg:
        src = reg.base().get("name_or_path")
    if not src:
        raise RankoneError("give --model: the registry's base model (the server does not say, and nothing is released yet)")
    return str(src)


def cmd_heal(args: argparse.Namespace) -> int:
    from rankone.cli.common import load
    from rankone.heal.client import ServerClient
    from rankone.heal.loop import Healer
    from rankone.heal.policy import HealPolicy
    from rankone.heal.probes import load_probes
    from rankone.lifecycle.store import default_path

    if args.max_cycles is not None and not args.watch:
        raise RankoneError("--max-cycles goes with --watch")
    registry = args.registry or str(default_path())
    if not Path(registry).is_file():
        raise RankoneError(f"no registry at {registry}; `rankone registry add` creates one")
    policy = HealPolicy.load(args.policy)
    probes = load_probes(args.probes)
    client = None
    if args.server is not None:
        p = policy
        client = ServerClient(args.server, _token(args), p.retry_initial_s, p.retry_max_s, p.retry_total_s)
    healer = None
    try:
        handle = load(args, _model_path(args, client, registry))
        healer = Healer(registry, probes, policy, handle, client, args.dry_run)
        if args.watch:
            healer.watch(args.max_cycles)
            return 0
        plan = healer.cycle()
        print(("dry run, nothing changed\n" if args.dry_run else "") + "\n".join(plan.lines()))
        return 0
    finally:
        if healer is not None:
            healer.close()
        elif client is not None:
            client.close()
