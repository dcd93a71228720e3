"""`rankone registry compact`: the whole release re-solved from the base as one patch, gated and
released in its place (`rankone.lifecycle.compact.compact_release`); `registry rollback` of it
releases the replaced patches again."""

from __future__ import annotations

import argparse
from typing import Any

from rankone.cli.registry_commands import _actor, _need_reason, _open


def cmd_compact(args: argparse.Namespace) -> int:
    from rankone.cli.common import hparams_from, load
    from rankone.edit.compaction import CompactSettings
    from rankone.lifecycle.compact import compact_release
    from rankone.lifecycle.gates import GatePolicy, load_suite

    reason = _need_reason(args, "registry compact")
    given = hparams_from(argparse.Namespace(hparams=args.hparams, method=args.method, stats_tokens=args.stats_tokens,
                                            stats_corpus=args.stats_corpus))
    given.pop("method")
    settings = CompactSettings(method=args.method, targets=args.targets, hparams=given)
    suite, policy = load_suite(args.suite), GatePolicy.load(args.policy)
    with _open(args) as reg:
        n = len(reg.check_compactable())  # refused before the model loads
        handle = load(args)
        res = compact_release(reg, handle, reason=reason, suite=suite, policy=policy, settings=settings,
                              stats_corpus=args.stats_corpus, actor=_actor(args), progress=not args.quiet)
        print(f"compacted {n} released patch(es) with {args.method} ({args.targets} targets) into {res.patch_id}:")
        for m, d in res.compacted.modules.items():
            print(f"  {m}: {d['n_edits']} edit(s), {d['n_kept']} key(s) (rank {d['n_kept']}"
                  + (f", {len(d['superseded'])} superseded" if d["superseded"] else "")
                  + (f", {d['keys_recovered']} recovered from A and C" if d["keys_recovered"] else "")
                  + f"), constraint error {d['constraint_error_stored']:.2e}")
        print(res.report.table())
        if not res.released:
            print(f"{res.patch_id}: gates failed; the release is unchanged (the compaction stays proposed, report stored)")
            return 1
        seq = reg.get(res.patch_id).release_seq
    print(f"released {res.patch_id} as #{seq} in place of {', '.join(res.replaced)} (now compacted); "
          f"`rankone registry rollback {res.patch_id[:8]}` restores them")
    return 0


def register_compact(add: Any) -> None:
    """`registry compact`'s arguments, on the `add(name, fn, help)` of `rankone.cli.registry`."""
    from rankone.cli.common import model_args, positive_int, text_arg
    from rankone.edit.compaction import DEFAULT_COMPACT, TARGET_MODES, compact_methods

    p = add("compact", cmd_compact, "re-solve every released patch from the base as one patch per module, gate it "
                                    "and release it in their place (rollback restores them)")
    model_args(p)
    p.add_argument("--suite", required=True, help="JSONL checks (keep, perplexity, targets); every replaced fact is "
                                                  "checked as well: it may not be lost where the release says it")
    p.add_argument("--policy", default=None, help="JSON thresholds (default: rankone.lifecycle.gates.GatePolicy)")
    p.add_argument("--method", choices=compact_methods(), default=DEFAULT_COMPACT,
                   help="the solve: emmet (every key's target met exactly, least C-norm; default), memit "
                        "(λC-regularised least squares) or alphaedit (confined to C's null space)")
    p.add_argument("--targets", choices=TARGET_MODES, default="written",
                   help="written: each key gets what its edit wrote when it was made (default); released: what the "
                        "whole release gives at it now")
    p.add_argument("--hparams", default=None, help="JSON object (or file) of the method's settings, e.g. "
                                                   "'{\"emmet_lambda\": 0}' or '{\"l2\": 1}'")
    p.add_argument("--stats-corpus", default=None, help="corpus for the key statistics (default: the model's own, "
                                                        "else text sampled from it)")
    p.add_argument("--stats-tokens", type=positive_int("--stats-tokens"), default=None,
                   help="tokens of the statistics (default: the budget the released edits recorded)")
    p.add_argument("--reason", type=text_arg("--reason"), default=None, help="why (required)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
