"""Patched models on disk: a normal Hugging Face folder plus a `rankone/` record of what went in.

The folder is an ordinary one whatever the model was loaded from (a folder, a .gguf file, a hub
id); the model card (rankone.json) and the files it names travel with the model.

`rankone/applied.json` lists the patches and the base fingerprints of the touched modules;
`rankone/base_weights.safetensors` keeps those modules' original weights (a few matrices, not the
model), so a merged folder can be reverted bit-exactly even when several patches were stacked.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from rankone.core import architectures as arch
from rankone.core.atomic import atomic_dir, write_bytes, write_json
from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import inside, loads
from rankone.core.fingerprint import tensor_sha256
from rankone.artifacts.patch import Patch, library_versions
from rankone.core.util import utcnow
from rankone.models.card import CARD_FILE
from rankone.core.text import shown
from rankone.models.handle import ModelHandle, config_changes

RECORD = "rankone"
log = logging.getLogger(__name__)


def save_model_dir(handle: ModelHandle, out: str | os.PathLike, overwrite: bool = False,
                   record: dict[str, Any] | None = None, originals: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the handle's model as an ordinary Hugging Face folder (also for a model loaded from a
    .gguf file), with its model card and the files the card names, and the rankone record."""
    with atomic_dir(out, overwrite) as tmp:
        try:
            handle.model.save_pretrained(tmp, safe_serialization=True)
        except Exception as e:  # safetensors reports a full disk as its own error type, not OSError
            if "I/O error" not in str(e):
                raise
            raise OSError(errno.EIO, f"cannot write the weights ({' '.join(str(e).split())[:200]})", str(out)) from None
        handle.tokenizer.save_pretrained(tmp)
        _copy_card(handle, tmp)
        if record is not None:
            write_json(tmp / RECORD / "applied.json", record)
        if originals:
            write_bytes(tmp / RECORD / "base_weights.safetensors",
                        save({k: v.detach().cpu().contiguous() for k, v in originals.items()}))
    return Path(out)


def _copy_card(handle: ModelHandle, out: Path) -> None:
    """The card travels with its model: the files (or folder of files) it names are copied beside
    it, and so is the default corpus.txt of a model folder. A path that leaves the card's folder
    (refused when used) is left out of the copy, with a warning."""
    card = handle.card
    if card is not None:
        moved = dataclasses.replace(card, folder=None)
        for attr in ("stats_corpus", "cases"):
            rel = getattr(card, attr)
            try:
                src, dst = card.resolve(rel, attr), inside(out, rel, attr) if rel is not None else None
            except RankoneError as e:
                log.warning("%s; the written model card leaves it out", e)
                setattr(moved, attr, None)
                continue
            if src is None or dst is None:
                continue
            for f in sorted(q for q in src.rglob("*") if q.is_file()) if src.is_dir() else [src] if src.is_file() else []:
                write_bytes(dst / f.relative_to(src) if src.is_dir() else dst, f.read_bytes())
        moved.save(out / CARD_FILE)
    corpus = handle.folder / "corpus.txt" if handle.folder is not None else None
    if corpus is not None and corpus.is_file() and not (out / "corpus.txt").exists():
        write_bytes(out / "corpus.txt", corpus.read_bytes())


def save_merged(handle: ModelHandle, patches: list[Patch], patch_paths: list[str],
                originals: dict[str, torch.Tensor], out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the model (patches already applied in memory) with the record needed to revert it."""
    refuse_reapplied(handle.folder, patches)
    prior = _read_record(handle.folder)
    record = {
        "format": "rankone.merged", "created_at": utcnow(), "library_versions": library_versions(),
        "patches": (prior.get("patches", []) if prior else []) + [
            {"path": str(pp), "id": p.content_id(), "n_edits": len(p.edits), "created_at": p.created_at,
             "edits": [{"module": e.module, "request": e.request, "method": e.method, "rank": e.rank,
                        "sha256_before": e.sha256_before, "sha256_after": e.sha256_after} for e in p.edits]}
            for p, pp in zip(patches, patch_paths)
        ],
        "base_sha256": {m: tensor_sha256(w) for m, w in originals.items()},
    }
    if handle.source_sha256:
        record["base_gguf_sha256"] = handle.source_sha256
    if prior:  # keep the first base: reverting goes all the way back to the unpatched model
        record["base_sha256"] = dict(record["base_sha256"], **prior.get("base_sha256", {}))
        assert handle.folder is not None
        originals = dict(originals, **_read_originals(handle.folder))
    return save_model_dir(handle, out, overwrite, record, originals)


def refuse_config_change(handle: ModelHandle, patches: list[Patch]) -> None:
    """Refuse patches made on a model whose config differs from this one's (same weights, another
    activation or norm epsilon: the merged folder would compute something nobody tested)."""
    for n, p in enumerate(patches, 1):
        changes = config_changes(p.base.get("config"), handle.model.config)
        if changes:
            raise RankoneError(f"patch {n} was made on a model whose config differs from this one's ({shown(changes[0])}"
                               + (f" and {len(changes) - 1} more" if len(changes) > 1 else "") + "); apply it to the model "
                               "it was made for, or pass --allow-config-change if the change is intended")


def _read_record(d: str | os.PathLike | None) -> dict[str, Any] | None:
    if d is None or not (Path(d) / RECORD / "applied.json").is_file():
        return None
    f = Path(d) / RECORD / "applied.json"
    try:
        rec = loads(f.read_bytes(), str(f))
    except RankoneError as e:
        raise RankoneError(f"{e}; {f} is corrupt: restore the folder or start from the base model") from None
    patches, base = (rec.get("patches", []), rec.get("base_sha256", {})) if isinstance(rec, dict) else (None, None)
    well_formed = (
        isinstance(patches, list) and isinstance(base, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in base.items())
        and all(isinstance(q, dict) and isinstance(q.get("edits", []), list)
                and all(isinstance(e, dict) for e in q.get("edits", [])) for q in patches)
    )
    if not well_formed:
        raise RankoneError(f"{f} is not a rankone record (patches must list objects with a list of edits, base_sha256 "
                           "must map modules to hashes); restore the folder or start from the base model")
    return rec


def refuse_reapplied(model_dir: str | os.PathLike | None, patches: list[Patch]) -> None:
    """Refuse patches (or edits) that the model folder's `rankone/` record says are already merged in."""
    prior = _read_record(model_dir)
    if not prior:
        return
    done = [q for q in prior.get("patches", []) if isinstance(q, dict)]
    ids = {q.get("id") for q in done}
    after = {(e.get("module"), e.get("sha256_after")) for q in done for e in q.get("edits", []) if isinstance(e, dict)}
    for p in patches:
        pid = p.content_id()
        if pid in ids:
            raise RankoneError(f"{model_dir} already carries patch {pid[:16]} (its {RECORD}/applied.json lists it); "
                               "a patch applies once: apply it to the base model instead")
        for e in p.edits:
            if (e.module, e.sha256_after) in after:
                raise RankoneError(f"{model_dir} already carries this edit of {e.module} ({e.sha256_after[:12]}…, "
                                   f"listed in {RECORD}/applied.json); an edit applies once")


def _read_originals(d: Path) -> dict[str, torch.Tensor]:
    f = d / RECORD / "base_weights.safetensors"
    if not f.is_file():
        return {}
    try:
        return load_file(str(f))
    except Exception as e:
        raise RankoneError(f"{f} is corrupt ({e}); revert with --patch instead") from None


def restore_base(model: torch.nn.Module, model_dir: str | os.PathLike) -> list[str]:
    """Put back every module's original weights from a merged folder's record; exact or refused."""
    record = _read_record(model_dir)
    originals = _read_originals(Path(model_dir))
    if not record or not originals:
        raise RankoneError(f"{model_dir} has no rankone record of its base weights; pass the applied patches with --patch")
    for m, w in originals.items():
        if tensor_sha256(w) != (record.get("base_sha256") or {}).get(m):
            raise RankoneError(f"{model_dir}/{RECORD} is inconsistent for {m}; revert with --patch instead")
        target = arch.weight_oi(arch.get_module(model, m))
        if list(target.shape) != list(w.shape):
            raise RankoneError(f"{model_dir}/{RECORD} does not match this model's {m}")
    with torch.no_grad():
        for m, w in originals.items():
            arch.weight_oi(arch.get_module(model, m)).copy_(w)
    return sorted(originals)
