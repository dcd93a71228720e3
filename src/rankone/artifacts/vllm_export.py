"""Patch sets as LoRA adapters that vLLM serves: the scale path beyond one `rankone serve` process.

Each arm's patch set (stable: the released patches; candidate: released + staged) becomes one
PEFT LoRA adapter (`peft_export`), shaped to vLLM's documented rules for LoRA adapters:

* rank: vLLM's `--max-lora-rank` takes one of 8, 16, 32, 64, 128, 256, 320, 512
  (vllm/config/lora.py; recent versions also 1), and an adapter's r must not exceed it; the
  patches' rank is padded with zero rows and columns up to the smallest of these that holds it,
  with lora_alpha = r, so the scaling stays 1 and the adapter adds exactly Σ BᵢAᵢ;
* target modules: vLLM checks the last component of every module name in the weights file
  against the layers its model implementation wraps for LoRA (vllm/lora/lora_model.py). For the
  MLP output projection rankone edits, that is `down_proj` (Llama, Mistral, Qwen, Gemma, Phi-3,
  OLMo, Granite, ...), `fc2` (Phi-2) or `dense_4h_to_h` (ChatGLM);
* no `modules_to_save` and no DoRA (vLLM refuses both: vllm/lora/peft_helper.py), bias "none".

vLLM has no LoRA support for GPT-2, GPT-J and GPT-NeoX; their patches are served by `rankone
serve`, which needs no adapter. The adapter's name is its content: `rankone-` and 16 hex digits
of the SHA-256 of its config and weights, so the same patch set always has the same name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from rankone.artifacts.patch import Patch
from rankone.artifacts.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_factors, save_peft_adapter
from rankone.core.atomic import atomic_dir, write_json
from rankone.core.errors import RankoneError

VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
NO_LORA = {"gpt2": "GPT-2", "gptj": "GPT-J", "gpt_neox": "GPT-NeoX"}
LORA_LEAVES = ("down_proj", "fc2", "dense_4h_to_h")
MANIFEST = "vllm.json"


def vllm_rank(need: int) -> int:
    """The smallest rank vLLM's --max-lora-rank accepts that holds `need`."""
    for r in VLLM_MAX_LORA_RANKS:
        if r >= need:
            return r
    raise RankoneError(f"the patches need LoRA rank {need} on one module; vLLM serves at most rank "
                       f"{VLLM_MAX_LORA_RANKS[-1]}: serve them with `rankone serve`, or export --format merged")


def check_servable(model: torch.nn.Module, modules: list[str]) -> None:
    """Refuse what vLLM cannot serve as a LoRA adapter, in one line that says what to do instead."""
    mt = getattr(model.config, "model_type", "?")
    if mt in NO_LORA:
        raise RankoneError(f"vLLM cannot serve {NO_LORA[mt]} ({mt}) models with LoRA adapters; serve these patches "
                           "with `rankone serve`, or export --format merged for any engine")
    bad = sorted({m.rsplit(".", 1)[-1] for m in modules} - set(LORA_LEAVES))
    if bad:
        raise RankoneError(f"vLLM's LoRA loader does not take modules named {', '.join(bad)} (it takes "
                           f"{', '.join(LORA_LEAVES)} for the MLP output); serve with `rankone serve` or export --format merged")


def _content_name(folder: Path) -> str:
    h = hashlib.sha256()
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update((folder / f).read_bytes())
    return "rankone-" + h.hexdigest()[:16]


def save_vllm_adapters(model: torch.nn.Module, arms: list[tuple[str, list[Patch], list[str]]],
                       out: str | os.PathLike, overwrite: bool = False, base_model: str = "") -> dict[str, Any]:
    """One adapter per arm with patches ((arm, patches, their ids or sources)), named by content,
    and `vllm.json`: which adapter is which arm, the --max-lora-rank to start vLLM with, and the
    command. An arm with no patches is the base model itself (requests name the base model)."""
    plans = []
    for arm, patches, ids in arms:
        if not any(p.edits for p in patches):
            plans.append((arm, [], ids, 0))
            continue
        factors = lora_factors(patches)
        check_servable(model, sorted(factors))
        plans.append((arm, patches, ids, vllm_rank(max(a.shape[0] for a, _ in factors.values()))))
    if not any(p for _, p, _, _ in plans):
        raise RankoneError("no arm has patches: vLLM serves the base model as it is (nothing to export)")
    max_rank = max(r for *_, r in plans)
    manifest: dict[str, Any] = {"format": "rankone.vllm", "base_model": base_model, "max_lora_rank": max_rank, "arms": {}}
    with atomic_dir(out, overwrite) as tmp:
        for arm, patches, ids, rank in plans:
            if not patches:
                manifest["arms"][arm] = {"adapter": None, "patches": ids, "request_model": base_model or "<the base model>"}
                continue
            staging = tmp / f".{arm}"
            save_peft_adapter(model, patches, staging, overwrite=True, sources=ids, rank=rank)
            name = _content_name(staging)
            if not (tmp / name).exists():  # two arms with the same patches share one adapter
                staging.rename(tmp / name)
            manifest["arms"][arm] = {"adapter": name, "rank": rank, "patches": ids, "request_model": name}
        names = sorted({a["adapter"] for a in manifest["arms"].values() if a["adapter"]})
        final = Path(out).resolve()
        manifest["command"] = (f"vllm serve {base_model or '<base model>'} --enable-lora --max-lora-rank {max_rank} "
                               f"--max-loras {len(names)} --lora-modules "
                               + " ".join(f"{n}={final / n}" for n in names))
        write_json(tmp / MANIFEST, manifest)
        for leftover in tmp.glob(".*"):
            if leftover.is_dir():
                shutil.rmtree(leftover)
    return json.loads(json.dumps(manifest))
