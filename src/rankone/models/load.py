"""Loading a user's model directory (offline) and what rankone remembers about it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None) -> torch.dtype | str | None:
    if name is None or name == "auto":
        return name
    if name not in DTYPES:
        raise RankoneError(f"unknown dtype {name!r}; choose float32, float16, bfloat16 or auto")
    return DTYPES[name]


def read_arch_override(value: str | None) -> dict[str, Any] | None:
    """--arch-spec: inline JSON or a path to a JSON file with the module path templates."""
    if value is None:
        return None
    text = Path(value).read_text() if os.path.isfile(value) else value
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise RankoneError(f"--arch-spec is neither a JSON object nor a JSON file: {e}") from None
    if not isinstance(d, dict):
        raise RankoneError("--arch-spec must be a JSON object of module path templates")
    return d


def check_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise RankoneError(f"model directory {p} does not exist; give a local Hugging Face model folder")
    if not (p / "config.json").is_file():
        raise RankoneError(f"{p} has no config.json: it is not a Hugging Face model folder")
    return p


def load_model(
    path: str | os.PathLike, device: str = "cpu", dtype: str | None = None,
    device_map: str | None = None, arch_spec: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a local folder; the architecture is checked before weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError) as e:
        raise RankoneError(f"cannot read {p}/config.json: {str(e).splitlines()[0]}") from None
    spec = arch.lookup(getattr(config, "model_type", "?"), arch_spec)
    kw: dict[str, Any] = {"local_files_only": True}
    td = parse_dtype(dtype)
    kw["dtype"] = td if td is not None else torch.float32
    if device_map:
        kw["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(p, **kw)
        tok = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except Exception as e:  # torch, safetensors and tokenizers each raise their own types for damaged files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RankoneError(f"cannot load the model in {p} ({type(e).__name__}: {first}); "
                           "check that its files are complete (a truncated download?)") from None
    if not device_map:
        model.to(device)
    model.eval()
    if arch_spec is not None:
        arch.attach_spec(model, spec)
    model._rankone_dir = str(p)  # type: ignore[attr-defined]
    return model, tok


def model_dir(model: torch.nn.Module) -> Path | None:
    d = getattr(model, "_rankone_dir", None) or getattr(model.config, "_name_or_path", None)
    return Path(d) if d and Path(d).is_dir() else None


def testbed_info(model: torch.nn.Module) -> dict[str, Any]:
    """What a built-in testbed recorded beside its weights (world.json), or {}."""
    d = model_dir(model)
    if d is None or not (d / "world.json").is_file():
        return {}
    try:
        return json.loads((d / "world.json").read_text())
    except json.JSONDecodeError:
        return {}


def recommended_hparams(model: torch.nn.Module) -> dict[str, Any]:
    """Hyper-parameters a model folder recommends for itself (like ROME's per-model hparams files).

    A testbed's world.json may hold `edit_hparams` (and `edit_layer`); other models recommend
    nothing and get the paper's defaults.
    """
    info = testbed_info(model)
    rec = dict(info.get("edit_hparams") or {})
    if isinstance(info.get("edit_layer"), int):
        rec.setdefault("layer", info["edit_layer"])
    return rec


def default_layer(model: torch.nn.Module) -> int:
    info = testbed_info(model)
    if isinstance(info.get("edit_layer"), int):
        return info["edit_layer"]
    return arch.num_layers(model) // 4


def default_corpus(model: torch.nn.Module) -> Path:
    d = model_dir(model)
    if d is not None and (d / "corpus.txt").is_file():
        return d / "corpus.txt"
    raise RankoneError(
        "no corpus for the key statistics: pass --stats-corpus with a .txt file, a folder of "
        ".txt files or a .jsonl file with a 'text' field (ordinary text in the model's language)"
    )
