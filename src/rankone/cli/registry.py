"""`rankone registry …` (the patch lifecycle) and `rankone export` (merged model or PEFT adapter).

Bad input is refused before anything is written: arguments, files and states are checked first,
the registry is created only by `add`, and output folders appear whole or not at all.
"""

from __future__ import annotations

import argparse
from typing import Any

from rankone.cli.build import cmd_build, cmd_export
from rankone.cli.registry_compact import register_compact
from rankone.cli.registry_staging import cmd_abort, cmd_stage, percent
from rankone.cli.registry_commands import (
    cmd_add,
    cmd_check,
    cmd_list,
    cmd_log,
    cmd_reject,
    cmd_release,
    cmd_rollback,
    cmd_show,
    cmd_validate,
)

FORMATS = ("merged", "peft")
FORMAT_HELP = "merged: a Hugging Face model folder (default); peft: a LoRA adapter for the base model"
ID_HELP = "patch id (or a unique prefix, or the patch folder)"


# ---- parser -----------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    from rankone.cli.common import model_args, text_arg

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=argparse.SUPPRESS,  # None comes from `registry` itself (below)
                        help="registry database (default: $RANKONE_REGISTRY, else ~/.local/share/rankone/registry.db)")
    common.add_argument("--author", default=None, type=text_arg("--author"), help="who does this (default: the OS user)")

    top = subparsers.add_parser("registry", help="record, validate, release, roll back and build patches",
                                description="The patch lifecycle: proposed → validated (→ staged) → released (→ rolled_back, "
                                            "or → compacted into one patch), with an audit log.")
    # `registry --registry X list` as well as `registry list --registry X` (the sub-command's wins)
    top.add_argument("--registry", help="registry database (default: $RANKONE_REGISTRY, else ~/.local/share/rankone/registry.db)")
    sub = top.add_subparsers(dest="registry_command", required=True)

    def add(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=fn)
        return p

    p = add("add", cmd_add, "register a patch folder (state: proposed)")
    p.add_argument("patch", help="patch folder (verified, then copied into the registry's store)")
    p.add_argument("--reason", type=text_arg("--reason"), help="why this patch exists (required)")

    p = add("list", cmd_list, "list patches")
    p.add_argument("--state", default=None, help="only patches in this state: proposed, validated, staged, released, rejected, "
                                                 "rolled_back, aborted, compacted")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("show", cmd_show, "a patch: its edits, latest validation report and history")
    p.add_argument("id", help="patch id (or a unique prefix, or the patch folder)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("validate", cmd_validate, "run a validation suite; the state becomes validated only on pass (exit 1 on fail)")
    p.add_argument("id", help=ID_HELP)
    model_args(p)
    p.add_argument("--suite", required=True, help="JSONL checks: target, keep, perplexity (see rankone.lifecycle.gates)")
    p.add_argument("--policy", default=None, help="JSON thresholds (default: rankone.lifecycle.gates.GatePolicy; docs/policy.example.json)")
    p.add_argument("--reason", type=text_arg("--reason"), default=None, help="a note for the audit log")

    def release_args(p: argparse.ArgumentParser, verb: str) -> None:
        p.add_argument("id", help=ID_HELP)
        model_args(p, required=False)
        p.add_argument("--policy", default=None, help="JSON thresholds; its conflict_key_cosine decides key overlaps (default 0.9)")
        p.add_argument("--force", action="store_true", help=f"{verb} despite conflicts (recorded in the audit log)")
        p.add_argument("--reason", type=text_arg("--reason"), default=None, help="a note for the audit log")

    release_args(add("release", cmd_release, "append a validated patch to the release order (refuses conflicts unless --force)"),
                 "release")

    p = add("rollback", cmd_rollback, "take a released patch out of the release")
    p.add_argument("id", help=ID_HELP)
    p.add_argument("--reason", type=text_arg("--reason"), help="why (required)")
    p.add_argument("--cascade", action="store_true", help="also roll back released patches made on top of it")

    p = add("reject", cmd_reject, "reject a proposed or validated patch")
    p.add_argument("id", help=ID_HELP)
    p.add_argument("--reason", type=text_arg("--reason"), help="why (required)")

    p = add("log", cmd_log, "the audit log (append-only)")
    p.add_argument("id", nargs="?", default=None, help="only this patch's entries (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("build", cmd_build, "write the base model with every released patch applied in release order")
    model_args(p)
    p.add_argument("--out", required=True, help="folder to write (whole or not at all)")
    p.add_argument("--format", choices=FORMATS, default="merged", help=FORMAT_HELP)
    p.add_argument("--force", action="store_true", help="replace an existing --out")

    p = add("stage", cmd_stage, "roll a validated patch out to a share of live traffic (rankone serve): canary and/or shadow")
    p.add_argument("id", help=ID_HELP)
    p.add_argument("--canary", type=percent("canary"), default=0.0,
                   help="percentage of users (sticky per user) whose requests get the candidate (0-100)")
    p.add_argument("--shadow", type=percent("shadow"), default=0.0,
                   help="percentage of the other requests re-run on the candidate after answering, compared, never shown")
    p.add_argument("--reason", default=None, help="a note for the audit log")

    p = add("promote", cmd_release, "release a staged patch (a running rankone serve merges it into stable)")
    release_args(p, "promote")
    p.set_defaults(promote=True)

    p = add("abort", cmd_abort, "take a staged patch out of the candidate for good")
    p.add_argument("id", help=ID_HELP)
    p.add_argument("--reason", help="why (required)")

    register_compact(add)

    p = add("check", cmd_check, "verify that database, store and audit chain agree")
    p.add_argument("--prune", action="store_true", help="remove orphaned store folders older than 10 minutes")

    p = subparsers.add_parser("export", help="write patches as a merged Hugging Face model, a PEFT LoRA adapter, or vLLM adapters",
                              description="Write patches as a merged Hugging Face model folder or a PEFT LoRA adapter; "
                                          "--format vllm writes each arm of a registry (or the given patches) as a "
                                          "LoRA adapter that vLLM serves.")
    p.set_defaults(func=cmd_export)
    model_args(p)
    p.add_argument("--patch", action="append", help="patch folder or registry id; repeat for several, in order "
                                                   "(with --format vllm and --registry: default, the registry's arms)")
    p.add_argument("--format", choices=FORMATS + ("vllm",), default="merged",
                   help=FORMAT_HELP + "; vllm: one LoRA adapter per arm (stable, candidate), shaped for vLLM")
    p.add_argument("--out", required=True, help="folder to write (whole or not at all)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--registry", default=None, help="registry for --patch ids")
    p.add_argument("--allow-config-change", action="store_true",
                   help="export even where the model's config.json differs from the one the patches were made on")
