"""A registry's release as something to ship: the base model with every released patch, in release
order, written as a merged Hugging Face folder or as a PEFT LoRA adapter, whole or not at all, and
recorded in the audit trail (`rankone registry build`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from rankone.artifacts.merged import save_merged
from rankone.artifacts.patch import apply_patch
from rankone.artifacts.peft_export import save_peft_adapter
from rankone.core.atomic import atomic_dir, check_out_dir, write_json
from rankone.core.errors import RankoneError
from rankone.core.util import utcnow
from rankone.lifecycle.registry import Registry
from rankone.lifecycle.records import PatchRecord
from rankone.lifecycle.store import crash_point
from rankone.models.handle import ModelHandle

FORMATS = ("merged", "peft")


def build_release(reg: Registry, load: Callable[[], ModelHandle], out: str | os.PathLike, fmt: str, actor: str,
                  base_model: str, force: bool = False) -> list[PatchRecord]:
    """Write the release to `out` and audit it; `load()` gives the base model, called once the
    registry and the output folder have been checked (a model that is not the registry's base is
    refused). Returns the released records, in release order."""
    if fmt not in FORMATS:
        raise RankoneError(f"unknown build format {fmt!r}; one of {', '.join(FORMATS)}")
    chain = reg.released()
    if fmt == "peft" and not chain:
        raise RankoneError("nothing is released: an adapter needs at least one released patch")
    check_out_dir(out, force, [("--model", base_model), ("the registry", reg.path), ("its store", reg.store)])
    patches = [reg.load_patch(r.id) for r in chain]
    handle = load()
    reg.check_model(handle)
    applied = apply_patch(handle.model, patches, handle.spec)
    manifest: dict[str, Any] = {
        "format": "rankone.lifecycle.registry-build", "built_at": utcnow(), "built_by": actor,
        "registry": str(reg.path.resolve()), "output_format": fmt, "base_model": base_model,
        "base": {k: v for k, v in reg.base().items() if k != "modules"},
        "patches": [{"id": r.id, "release_seq": r.release_seq, "released_at": r.released_at, "n_edits": r.n_edits,
                     "facts": [f"{s['prompt'].replace('{}', s['subject'])} -> {s['target']}" for s in r.summary],
                     "reason": r.reason} for r in chain],
    }
    paths = [str(reg.patch_dir(r.id)) for r in chain]
    with atomic_dir(out, force) as tmp:
        if fmt == "merged":
            try:
                save_merged(handle, patches, paths, applied.originals, tmp, overwrite=True)
            finally:
                applied.revert()  # the caller's model is given back as it was
            write_json(tmp / "rankone" / "build.json", manifest)
        else:
            applied.revert()  # the release was checked to apply; the adapter is made from the base
            save_peft_adapter(handle.model, patches, tmp, overwrite=True, sources=paths)
            write_json(tmp / "rankone_build.json", manifest)
        crash_point("build:staged")
    reg.record_build(str(Path(out).resolve()), actor, [r.id for r in chain], fmt)
    return chain
