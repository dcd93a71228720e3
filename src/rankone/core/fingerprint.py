"""SHA-256 fingerprints of tensors, modules, files and folders (all streaming, all exact)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import torch


def _update_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    # dtype and shape are part of the identity: the same bytes as fp16 and bf16 differ.
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    flat = t.detach().contiguous().reshape(-1)
    h.update(flat.view(torch.uint8).cpu().numpy().tobytes())


def tensor_sha256(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    _update_tensor(h, t)
    return h.hexdigest()


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in named:
        h.update(name.encode() + b"\0")
        _update_tensor(h, t)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def path_sha256(path: str | os.PathLike) -> str:
    """A file's hash, or a folder's: relative names and contents of every file, in sorted order."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(p)).encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def model_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of every named parameter: an edited model is a different model."""
    return tensors_sha256(model.named_parameters())
