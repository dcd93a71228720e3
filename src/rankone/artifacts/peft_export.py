"""Patches as a PEFT LoRA adapter: `adapter_config.json` + `adapter_model.safetensors`.

A LoRA layer adds (lora_alpha / r) · B A x to a linear layer's output, with A [r, in] and
B [out, r]. A patch edit is already ΔW = Bᵢ Aᵢ with LoRA's names (Bᵢ [out, kᵢ], Aᵢ [kᵢ, in]), so
the edits of a module, ΔW = Σᵢ Bᵢ Aᵢ, are exactly one LoRA with

    B = [B₁ … B_n]   (columns side by side),   A = [A₁; …; A_n]   (rows stacked),
    r = lora_alpha = Σᵢ kᵢ   (scaling 1).

Edits made one after another on a module (each computed on the weights the previous one left)
still merge to W + Σ BᵢAᵢ, so stacking them is exact up to float rounding. When modules carry
different total ranks, r is the largest and the other modules' A and B get zero rows and
columns (they add nothing): one rank for every module is what PEFT and vLLM read most simply.

`target_modules` lists the exact edited module names (PEFT matches a list entry against the full
module name first), so nothing else is wrapped. GPT-2's Conv1D stores its weight as [in, out]:
PEFT handles it with `fan_in_fan_out = true`; A and B are the same.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from rankone.core import architectures as arch
from rankone.core.atomic import atomic_dir, write_bytes, write_json
from rankone.core.errors import RankoneError
from rankone.artifacts.patch import Patch, library_versions
from rankone.core.util import utcnow

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MANIFEST = "rankone_export.json"


def lora_factors(patches: list[Patch]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A [r, in], B [out, r])}: the module's edits of all patches, in order, stacked (r = their total rank)."""
    bs: dict[str, list[torch.Tensor]] = {}
    as_: dict[str, list[torch.Tensor]] = {}
    for p in patches:
        for e in p.edits:
            bs.setdefault(e.module, []).append(e.B.float())
            as_.setdefault(e.module, []).append(e.A.float())
    return {m: (torch.cat(as_[m], 0), torch.cat(bs[m], 1)) for m in bs}


def layout_of(model: torch.nn.Module, modules: list[str]) -> bool:
    """fan_in_fan_out for these modules; a clear error where LoRA cannot express the edits."""
    kinds = {}
    for m in modules:
        mod = arch.get_module(model, m)
        try:
            kinds[m] = arch.weight_layout(mod)  # "conv1d" or "linear", recognised by type
        except RankoneError:
            raise RankoneError(f"cannot export a PEFT LoRA adapter for {model.config.model_type}: the edited module {m} is a "
                               f"{type(mod).__name__}, which LoRA does not wrap; export --format merged instead")
    if len(set(kinds.values())) > 1:
        raise RankoneError("cannot export one PEFT LoRA adapter: the edited modules mix Linear and Conv1D layers, which "
                           "need different fan_in_fan_out settings; export --format merged instead")
    return next(iter(kinds.values())) == "conv1d"


def adapter_config(model: torch.nn.Module, modules: list[str], rank: int, fan_in_fan_out: bool,
                   base_name: str | None) -> dict[str, Any]:
    """The LoRA config, written by hand (the classic fields every PEFT since 0.6 and vLLM read)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted(modules), "fan_in_fan_out": fan_in_fan_out,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }


def save_peft_adapter(model: torch.nn.Module, patches: list[Patch], out: str | os.PathLike, overwrite: bool = False,
                      sources: list[str] | None = None, rank: int | None = None) -> Path:
    """Write the patches as one LoRA adapter for `model` (the base they were made on).

    `rank`: pad every module to this r (zero rows and columns add nothing), e.g. to a rank an
    engine accepts; at least the patches' largest total rank on a module."""
    if not patches or not any(p.edits for p in patches):
        raise RankoneError("no edits to export: the patches are empty")
    factors = lora_factors(patches)
    modules = sorted(factors)
    fan_in_fan_out = layout_of(model, modules)
    need = max(a.shape[0] for a, _ in factors.values())
    if rank is not None and rank < need:
        raise RankoneError(f"the patches need LoRA rank {need} on one module; rank {rank} cannot hold them")
    rank = rank or need
    tensors: dict[str, torch.Tensor] = {}
    for m, (a, b) in factors.items():
        w = arch.weight_oi(arch.get_module(model, m))
        if list(b.shape[:1]) + list(a.shape[1:]) != list(w.shape):
            raise RankoneError(f"the patches edit {m} as a {[b.shape[0], a.shape[1]]} weight; this model's is {list(w.shape)}")
        k = a.shape[0]
        a_pad = torch.zeros(rank, a.shape[1]); a_pad[:k] = a  # [r, in]
        b_pad = torch.zeros(b.shape[0], rank); b_pad[:, :k] = b  # [out, r]
        tensors[f"base_model.model.{m}.lora_A.weight"] = a_pad.contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = b_pad.contiguous()
    base_name = str(getattr(model.config, "_name_or_path", "") or "") or None
    manifest = {
        "format": "rankone.peft", "created_at": utcnow(), "library_versions": library_versions(),
        "rank": rank, "modules": {m: {"edits": sum(e.module == m for p in patches for e in p.edits),
                                          "rank": int(factors[m][0].shape[0])} for m in modules},
        "patches": [{"source": s, "n_edits": len(p.edits), "created_at": p.created_at,
                     "edits": [{"module": e.module, "request": e.request, "sha256_before": e.sha256_before} for e in p.edits]}
                    for p, s in zip(patches, sources or [""] * len(patches))],
    }
    with atomic_dir(out, overwrite) as tmp:
        write_json(tmp / ADAPTER_CONFIG, adapter_config(model, modules, rank, fan_in_fan_out, base_name))
        write_bytes(tmp / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
        write_json(tmp / MANIFEST, manifest)
    return Path(out)
