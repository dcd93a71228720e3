"""rankone: rank-one model editing (ROME, r-ROME, p-ROME; MEMIT, AlphaEdit, EMMET) for Hugging Face causal LMs.

    from rankone import load_model, EditRequest, EditHParams, Editor, Patch, apply_patch, revert_patch
    from rankone import ModelHandle, ModelCard     # what load_model returns; rankone.json beside a model
    from rankone import MemitHParams, AlphaEditHParams, EmmetHParams   # the batch methods' settings
    from rankone import METHODS, method, resolve_settings, PreservedKeys  # the method table
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Imported lazily so that `import rankone` (and `rankone --help`) stays fast.
_API = {
    "load_model": "rankone.models.load", "EditRequest": "rankone.core.tokens", "EditHParams": "rankone.methods.rome",
    "Editor": "rankone.edit.editor", "edit": "rankone.edit.editor", "Patch": "rankone.artifacts.patch",
    "apply_patch": "rankone.artifacts.patch", "revert_patch": "rankone.artifacts.patch", "compose": "rankone.artifacts.patch",
    "RankoneError": "rankone.core.errors", "ModelHandle": "rankone.models.handle", "ModelCard": "rankone.models.card",
    "MemitHParams": "rankone.methods.memit", "AlphaEditHParams": "rankone.methods.alphaedit",
    "EmmetHParams": "rankone.methods.emmet", "PreservedKeys": "rankone.methods.base", "METHODS": "rankone.methods.base",
    "method": "rankone.methods.base", "resolve_settings": "rankone.methods.base",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'rankone' has no attribute {name!r}")
