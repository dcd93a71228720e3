"""`rankone registry build` (the base model with every released patch) and `rankone export` (any patches).

Both write a merged Hugging Face model folder or a PEFT LoRA adapter, whole or not at all.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rankone.core.errors import RankoneError
from rankone.cli.registry_commands import _actor, _facts, _open


def _patches_for(args: argparse.Namespace) -> tuple[list[Any], list[str]]:
    """--patch values: patch folders, or ids in the registry."""
    from rankone.artifacts.patch import Patch
    from rankone.lifecycle.store import is_patch_dir

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


# ---- registry build ---------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace) -> int:
    from rankone.cli.common import load
    from rankone.lifecycle.build import build_release

    with _open(args) as reg:
        chain = build_release(reg, lambda: load(args), args.out, args.format, _actor(args), str(args.model), args.force)
    print(f"wrote {args.out} ({args.format}): base {args.model} + {len(chain)} released patch(es) in release order"
          + "".join(f"\n  #{r.release_seq} {r.id}  {_facts(r.summary, 200)}" for r in chain))
    return 0


# ---- export -----------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from rankone.core.atomic import check_out_dir
    from rankone.cli.common import load
    from rankone.artifacts.merged import refuse_config_change, save_merged
    from rankone.artifacts.patch import apply_patch
    from rankone.artifacts.peft_export import save_peft_adapter

    if args.format == "vllm":
        from rankone.cli.export_vllm import cmd_export_vllm

        return cmd_export_vllm(args, _patches_for)
    if not args.patch:
        raise RankoneError(f"export --format {args.format} needs --patch (a patch folder or registry id)")
    patches, sources = _patches_for(args)
    check_out_dir(args.out, args.force, [("--model", args.model)] + [("--patch", s) for s in sources])
    handle = load(args)
    if not args.allow_config_change:
        refuse_config_change(handle, patches)
    applied = apply_patch(handle.model, patches, handle.spec)  # refuses patches made for another base, all or nothing
    if args.format == "merged":
        save_merged(handle, patches, sources, applied.originals, args.out, args.force)
    else:
        applied.revert()
        save_peft_adapter(handle.model, patches, args.out, args.force, sources)
    n = sum(len(p.edits) for p in patches)
    print(f"wrote {args.out} ({args.format}): {n} edit(s) from {len(patches)} patch(es)")
    return 0
