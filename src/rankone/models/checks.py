"""Checks around loading a model, each one line of advice instead of a traceback or a quietly
wrong model: the device exists, every weight in the folder is used by its config, and weights
whose shapes the config contradicts are named."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from rankone.core.errors import RankoneError

_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")


def check_device(device: str | torch.device | None) -> None:
    """Refuse a device this torch cannot use, before anything loads."""
    if device is None or isinstance(device, torch.device):
        return
    name = str(device).strip()
    if not _DEVICE.match(name):
        raise RankoneError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps")
    kind, _, index = name.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise RankoneError(f"--device {name}: {why}; use --device cpu (or install torch with CUDA on a machine with a GPU)")
        if index and int(index) >= torch.cuda.device_count():
            raise RankoneError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RankoneError(f"--device {name}: Apple's MPS is not available on this machine; use --device cpu")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise RankoneError(f"--device {name}: no Intel XPU is available; use --device cpu")


def check_weights_used(info: dict[str, Any], where: str) -> None:
    """Refuse a model whose files hold weights its config does not use (a config.json that says 3
    layers beside weights of 4 would be saved without layer 3) or lack weights it needs (they would
    be random)."""
    unused, missing = sorted(info.get("unexpected_keys") or []), sorted(info.get("missing_keys") or [])
    if unused:
        raise RankoneError(f"{where}: its weights hold {len(unused)} tensor(s) that config.json does not use (e.g. "
                           f"{unused[0]}): config.json does not describe these weights; restore the config that "
                           "came with them")
    if missing:
        raise RankoneError(f"{where}: config.json needs {len(missing)} tensor(s) its weights lack (e.g. {missing[0]}); "
                           "restore the config that came with the weights")


def size_mismatch(folder: str | Path) -> str | None:
    """'NAME is [a, b] in the weights, config.json makes it [c, d]' for the first tensor whose shape
    the config contradicts (None when none is found); read from file headers and a weightless model."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            want = {k: list(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
        for f in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                for name in fh.keys():
                    got = list(fh.get_slice(name).get_shape())
                    if name in want and want[name] != got:
                        return f"{name} is {got} in {f.name}, config.json makes it {want[name]}"
    except Exception:  # noqa: BLE001 - only a better message is at stake
        return None
    return None
