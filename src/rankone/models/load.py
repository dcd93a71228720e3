"""Loading a model as users have it: a local Hugging Face folder, a .gguf file or a hub id."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import json_object, read_text
from rankone.core.progress import status
from rankone.models.card import find_card
from rankone.models.checks import check_device, check_weights_used, size_mismatch
from rankone.models.handle import ModelHandle

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
    text = read_text(value, f"--arch-spec file {value}") if os.path.isfile(value) else value
    return json_object(text, "--arch-spec", "give a JSON object (or a JSON file) of module path templates")


def check_model_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise RankoneError(f"model directory {p} does not exist; give a local Hugging Face model folder")
    if not (p / "config.json").is_file():
        raise RankoneError(f"{p} has no config.json: it is not a Hugging Face model folder")
    return p


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_like_hub_id(name: str) -> bool:
    """'org/name' or 'name' that is not a path on this machine (no ./, /, ~, no such file)."""
    return (bool(_HUB_ID.match(name)) and not name.startswith((".", "~")) and not name.endswith(".gguf")
            and not Path(name).exists())


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_model(
    path: str | os.PathLike, device: str = "cpu", dtype: str | None = None,
    device_map: str | None = None, arch_spec: dict[str, Any] | None = None,
) -> ModelHandle:
    """The model at `path`: a local Hugging Face folder, a .gguf file (dequantized to `dtype`) or a
    hub id (from the local cache when offline). Returns a ModelHandle, which unpacks as
    `model, tok = load_model(path)`. The device and architecture are checked before any weights load."""
    check_device(device)
    name = str(path)
    if name.endswith(".gguf") or Path(name).is_file():
        return _load_gguf(Path(name), device, dtype, device_map, arch_spec)
    if not Path(name).exists() and looks_like_hub_id(name):
        return _load_hub(name, device, dtype, device_map, arch_spec)
    p = check_model_dir(path)
    spec = _spec_of(p, arch_spec, {"local_files_only": True})
    model, tok = _from_pretrained(str(p), f"the model in {p}", device, dtype, device_map, {"local_files_only": True})
    return ModelHandle(model, tok, spec, str(p), find_card(p))


def _spec_of(where: str | Path, arch_spec: dict[str, Any] | None, kw: dict[str, Any],
             unreadable: str | None = None) -> arch.ArchSpec:
    """The architecture spec from the config alone (before any weights load)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(where, **kw)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: a config.json nested thousands deep
        raise RankoneError(unreadable or f"cannot read {where}/config.json: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    return arch.spec_for_config(config, arch_spec)  # table, else discovery on a weightless copy


def _from_pretrained(where: str, what: str, device: str, dtype: str | None, device_map: str | None,
                     kw: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    td = parse_dtype(dtype)
    mkw: dict[str, Any] = dict(kw, dtype=td if td is not None else torch.float32)
    if device_map:
        mkw["device_map"] = device_map
    try:
        model, info = AutoModelForCausalLM.from_pretrained(where, output_loading_info=True, **mkw)
        tok = AutoTokenizer.from_pretrained(where, **kw)
    except Exception as e:  # torch, safetensors and tokenizers each raise their own types for damaged files
        if "mismatched_sizes" in str(e) and (why := size_mismatch(where)):
            raise RankoneError(f"cannot load {what}: {why}; config.json does not describe these weights "
                               "(restore the config that came with them)") from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RankoneError(f"cannot load {what} ({type(e).__name__}: {first}); "
                           "check that its files are complete (a truncated download?)") from None
    check_weights_used(info, what)
    if not device_map:
        model.to(device)
    return model.eval(), tok


def _load_gguf(p: Path, device: str, dtype: str | None, device_map: str | None,
               arch_spec: dict[str, Any] | None) -> ModelHandle:
    from rankone.core.fingerprint import file_sha256
    from rankone.models.gguf import check_gguf_file, load_gguf

    if device_map:
        raise RankoneError("--device-map does not apply to a .gguf file (it is dequantized in memory); use --device")
    td = parse_dtype(dtype)
    if td == "auto":
        td = None
    p = check_gguf_file(p)
    status(f"reading {p.name} ({p.stat().st_size / 1e6:,.0f} MB): its SHA-256 first")
    digest = file_sha256(p)  # the patch's base, and the key of the file's cached conversion
    model, tok = load_gguf(p, dtype=td or torch.float32, device=device, sha256=digest)
    spec = arch.spec_for(model, arch_spec)
    return ModelHandle(model, tok, spec, str(p.resolve()), find_card(p), digest)


def _load_hub(hub_id: str, device: str, dtype: str | None, device_map: str | None,
              arch_spec: dict[str, Any] | None) -> ModelHandle:
    offline = _hub_offline()
    kw = {"local_files_only": True} if offline else {}
    why = ("the hub is not reachable (offline, HF_HUB_OFFLINE=1) and it is not in the local cache" if offline
           else "it cannot be fetched from the Hugging Face hub")
    spec = _spec_of(hub_id, arch_spec, kw, f"model {hub_id} is not a local folder or .gguf file, and as a hub id {why}: "
                                           "pass a local Hugging Face model folder or a .gguf file")
    model, tok = _from_pretrained(hub_id, f"{hub_id} from the Hugging Face hub", device, dtype, device_map, kw)
    return ModelHandle(model, tok, spec, hub_id)
