"""Patch files: `patch.safetensors` + `patch.json`, written atomically, verified on every read.

A patch travels between people and machines, so a patch file is untrusted input. Integrity:

* `patch.json` records `payload_sha256`, the SHA-256 (`core.fingerprint.tensor_sha256`: dtype,
  shape and bytes) of every tensor in `patch.safetensors`;
* the safetensors header's metadata records `manifest_sha256`, the SHA-256 of the canonical
  manifest (sorted keys, no whitespace), so neither file can change without the other noticing.

`read_patch` refuses, in one line naming the file and the mismatch, a missing, extra or altered
tensor, an altered manifest, wrong shapes or types; apply then also checks each result against the
recorded `sha256_after` (see `patch.apply_edit`). This is integrity, not authorship: whoever
rewrites both files consistently makes a new patch (with a new content id).

Schema 2 stores each edit's factors as `edits.{i}.B` [out, k] and `edits.{i}.A` [k, in]. Schema 1
(rank one, `edits.{i}.u` [out] and `edits.{i}.v` [in], no digests) still reads: B = u as one
column, A = vᵀ as one row; its payload is checked only by apply's after-fingerprint. A batch edit
also lists its facts (`requests`) and stores the keys it was solved with as `edits.{i}.keys`
[in, k] float64; readers that predate them ignore both.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save

from rankone.core.atomic import atomic_dir, write_bytes, write_json
from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import loads
from rankone.core.fingerprint import tensor_sha256, tensors_sha256

FORMAT = "rankone.artifacts.patch"
SCHEMA_VERSION = 2
READS = (1, 2)
MANIFEST, PAYLOAD = "patch.json", "patch.safetensors"
_HEX = set("0123456789abcdef")


def canonical(man: dict[str, Any]) -> bytes:
    # default=str: an in-memory patch may hold values JSON lacks (its id is still defined; saving would refuse them)
    return json.dumps(man, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def manifest_sha256(man: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(man)).hexdigest()


def content_id_of(man: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the canonical manifest and every tensor (name, dtype, shape, bytes): the registry's id."""
    h = hashlib.sha256(b"rankone.artifacts.patch-id/1\0")
    h.update(canonical(man))
    h.update(tensors_sha256(sorted(tensors.items())).encode())
    return h.hexdigest()


def payload_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """The manifest's `payload_sha256`: each tensor's digest (dtype, shape and bytes), by name."""
    return {k: tensor_sha256(v) for k, v in sorted(tensors.items())}


def write_patch_files(path: str | os.PathLike, man: dict[str, Any], tensors: dict[str, torch.Tensor],
                      overwrite: bool = False) -> Path:
    """The folder, whole or not at all; the payload's header carries the manifest's digest."""
    meta = {"format": FORMAT, "manifest_sha256": manifest_sha256(man)}
    with atomic_dir(path, overwrite) as tmp:
        write_bytes(tmp / PAYLOAD, save(tensors, metadata=meta))
        write_json(tmp / MANIFEST, man)
    return Path(path)


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file: 8 bytes of header length, then the JSON header."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def read_files(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, str]]:
    """(manifest, tensors, safetensors metadata) of a patch folder, or one RankoneError line."""
    p = Path(path)
    if not (p / MANIFEST).is_file() or not (p / PAYLOAD).is_file():
        raise RankoneError(f"{p} is not a patch: it needs {MANIFEST} and {PAYLOAD} (made by `rankone edit --out`)")
    man = loads((p / MANIFEST).read_bytes(), str(p / MANIFEST), "it is corrupt: re-create the patch with `rankone edit`")
    try:
        data = (p / PAYLOAD).read_bytes()
        tensors = load(data)
        meta = _header_metadata(data)
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        msg = " ".join(str(e).split())[:200]
        raise RankoneError(f"{p / PAYLOAD} is corrupt ({type(e).__name__}: {msg}); re-create the patch with `rankone edit`") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT or not isinstance(man.get("edits"), list):
        raise RankoneError(f"{p / MANIFEST} is not a rankone patch manifest")
    if man.get("schema_version") not in READS:
        raise RankoneError(f"patch {p} has schema version {man.get('schema_version')!r}; this rankone reads versions "
                           f"{', '.join(map(str, READS))} (a newer rankone wrote it?)")
    return man, tensors, meta


def verify(p: Path, man: dict[str, Any], tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """The two digests of a schema-2 patch; schema 1 had none."""
    if man["schema_version"] < 2:
        return
    want = man.get("payload_sha256")
    if not isinstance(want, dict) or not isinstance(meta.get("manifest_sha256"), str):
        raise RankoneError(f"patch {p} lacks its digests (payload_sha256 in {MANIFEST}, manifest_sha256 in {PAYLOAD}); "
                           "it was altered or damaged, refusing it")
    if (got := manifest_sha256(man)) != meta["manifest_sha256"]:
        raise RankoneError(f"{p / MANIFEST} does not match the digest recorded in {PAYLOAD} (sha256 {got[:12]}… vs "
                           f"{meta['manifest_sha256'][:12]}…): the manifest was altered or damaged, refusing the patch")
    if extra := sorted(set(tensors) - set(want)):
        raise RankoneError(f"{p / PAYLOAD} holds tensor {extra[0]} that {MANIFEST} does not list: altered, refusing the patch")
    if missing := sorted(set(want) - set(tensors)):
        raise RankoneError(f"{p / PAYLOAD} lacks tensor {missing[0]} that {MANIFEST} lists: altered or damaged, refusing the patch")
    for name in sorted(want):
        if (got := tensor_sha256(tensors[name])) != want[name]:
            raise RankoneError(f"{p / PAYLOAD}: tensor {name} does not match its digest in {MANIFEST} (sha256 {got[:12]}… vs "
                               f"{str(want[name])[:12]}…): the payload was altered or damaged, refusing the patch")


def _is_sha(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and set(x) <= _HEX


def _check_fields(m: Any, i: int) -> None:
    """Types of an edit's manifest fields, so that a hand-made manifest fails here and not in a command."""
    if not isinstance(m, dict):
        raise ValueError(f"edit {i} is not an object")
    req = m.get("request")
    checks = [
        ("module", isinstance(m.get("module"), str) and bool(m.get("module"))),
        ("layer", type(m.get("layer")) is int),
        ("request", isinstance(req, dict) and all(isinstance(req.get(k), str) for k in ("prompt", "subject", "target"))),
        ("method", isinstance(m.get("method"), str)),
        ("hparams", isinstance(m.get("hparams", {}), dict)),
        ("weight_shape", isinstance(m.get("weight_shape"), list) and len(m["weight_shape"]) == 2
         and all(type(x) is int and x > 0 for x in m["weight_shape"])),
        ("weight_dtype", isinstance(m.get("weight_dtype"), str)),
        ("delta_fro", isinstance(m.get("delta_fro"), (int, float)) and not isinstance(m.get("delta_fro"), bool)),
        ("sha256_before", _is_sha(m.get("sha256_before"))),
        ("sha256_after", _is_sha(m.get("sha256_after"))),
        ("diagnostics", isinstance(m.get("diagnostics", {}), dict)),
        ("context_templates", isinstance(m.get("context_templates", []), list)),
        ("requests", isinstance(m.get("requests", []), list) and all(
            isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("prompt", "subject", "target"))
            for r in m.get("requests", []))),
        ("keys", isinstance(m.get("keys", ""), str)),
    ]
    bad = [name for name, ok in checks if not ok]
    if bad:
        raise ValueError(f"edit {i} has a missing or malformed {bad[0]}")


def _edit_fields(m: dict[str, Any], tensors: dict[str, torch.Tensor], schema: int, i: int, names: set[str]) -> dict[str, Any]:
    """The Edit's fields (`names`) of manifest entry i, with its tensors."""
    _check_fields(m, i)
    kw = {k: m[k] for k in names - {"B", "A", "fix_idx", "fix_val", "keys"} if k in m}
    if schema == 1:  # rank one: u [out] is B's one column, v [in] is A's one row
        B, A = tensors[m["u"]].reshape(-1, 1), tensors[m["v"]].reshape(1, -1)
    else:
        B, A = tensors[m["B"]], tensors[m["A"]]
    out, inn = m["weight_shape"]
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0] or B.shape[1] < 1 or B.shape[0] != out or A.shape[1] != inn:
        raise ValueError(f"edit {i}: factors B {list(B.shape)} and A {list(A.shape)} do not fit weight_shape {m['weight_shape']}")
    if B.dtype != torch.float32 or A.dtype != torch.float32:
        raise ValueError(f"edit {i}: factors are {B.dtype}/{A.dtype}, not float32")
    fix_idx, fix_val = tensors[f"{m['fix']}.idx"], tensors[f"{m['fix']}.val"]
    if fix_idx.dim() != 1 or fix_idx.shape != fix_val.shape or fix_idx.dtype != torch.int64:
        raise ValueError(f"edit {i}: the revert fix has malformed tensors")
    if fix_idx.numel() and (int(fix_idx.min()) < 0 or int(fix_idx.max()) >= out * inn):
        raise ValueError(f"edit {i}: the revert fix points outside the {out}×{inn} weight")
    keys = tensors[m["keys"]] if "keys" in m else None
    if keys is not None and (keys.dtype != torch.float64 or list(keys.shape) != [inn, B.shape[1]]):
        raise ValueError(f"edit {i}: keys {list(keys.shape)} {keys.dtype} do not fit factors of rank {B.shape[1]} on {inn} inputs")
    if m.get("requests") and len(m["requests"]) != B.shape[1]:
        raise ValueError(f"edit {i}: {len(m['requests'])} requests for factors of rank {B.shape[1]}")
    return dict(kw, B=B, A=A, fix_idx=fix_idx, fix_val=fix_val, keys=keys)


def read_patch_files(path: str | os.PathLike, names: set[str]) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """(manifest, each edit's fields among `names`, content id) of a verified patch folder."""
    p = Path(path)
    man, tensors, meta = read_files(p)
    verify(p, man, tensors, meta)
    try:
        edits = [_edit_fields(m, tensors, man["schema_version"], i, names) for i, m in enumerate(man["edits"])]
    except (KeyError, TypeError, ValueError) as e:
        raise RankoneError(f"patch {p} is corrupt: {e}") from None
    if not isinstance(man.get("base", {}), dict) or not isinstance(man.get("library_versions", {}), dict):
        raise RankoneError(f"patch {p} is corrupt: base and library_versions must be objects")
    return man, edits, content_id_of(man, tensors)
