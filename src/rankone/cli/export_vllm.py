"""`rankone export --format vllm`: the arms of a registry (or given patches) as vLLM LoRA adapters."""

from __future__ import annotations

import argparse
from typing import Any, Callable

from rankone.core.errors import RankoneError


def cmd_export_vllm(args: argparse.Namespace, patches_for: Callable[[argparse.Namespace], tuple[list[Any], list[str]]]) -> int:
    from rankone.artifacts.vllm_export import save_vllm_adapters
    from rankone.cli.common import load
    from rankone.cli.registry_commands import _open
    from rankone.core.atomic import check_out_dir

    if args.patch:
        patches, sources = patches_for(args)
        arms = [("patches", patches, sources)]
    elif args.registry:
        with _open(args) as reg:
            released = [(r.id, reg.load_patch(r.id)) for r in reg.released()]
            staged = [(s.id, reg.load_patch(s.id)) for s in reg.staged()]
        arms = [("stable", [p for _, p in released], [i for i, _ in released])]
        if staged:
            both = released + staged
            arms.append(("candidate", [p for _, p in both], [i for i, _ in both]))
    else:
        raise RankoneError("export --format vllm needs --patch (patch folders or ids) or --registry (its stable and "
                           "candidate arms)")
    check_out_dir(args.out, args.force)
    handle = load(args)
    from rankone.artifacts.patch import apply_patch

    for _, patches, _ in arms:  # each arm must apply to this base (all or nothing, model left as it was)
        apply_patch(handle.model, patches, handle.spec).revert()
    manifest = save_vllm_adapters(handle.model, arms, args.out, args.force, str(args.model))
    for arm, info in manifest["arms"].items():
        print(f"{arm}: " + (f"adapter {info['adapter']} (rank {info['rank']}, {len(info['patches'])} patch(es))"
                            if info["adapter"] else "the base model (no patches)"))
    print(f"wrote {args.out}; start vLLM with:\n  {manifest['command']}\n"
          f"and name an adapter as the request's model, e.g. \"model\": \"{next(a['adapter'] for a in manifest['arms'].values() if a['adapter'])}\"")
    return 0
