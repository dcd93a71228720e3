"""GGUF files (llama.cpp's single-file format) as rankone models.

`load_gguf` reads a .gguf file with transformers' GGUF loader, dequantized to a plain torch dtype,
and returns an ordinary (unquantized) model and its tokenizer: editing, generation and
`save_pretrained` all work on it as on a model loaded from a folder.
`gguf_to_folder` converts a .gguf file once into an ordinary Hugging Face folder (config.json
without `quantization_config`, model.safetensors, tokenizer files), written atomically, with a
`gguf_source.json` naming the source file and its SHA-256, so later loads skip the dequantization.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from rankone.core.atomic import atomic_dir
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import file_sha256

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "gguf_source.json"


def check_gguf_file(path: str | os.PathLike) -> Path:
    """The path, if it is a readable file that starts with the GGUF magic; else a one-line error."""
    p = Path(path).expanduser()
    if not p.exists():
        raise RankoneError(f"GGUF file {p} does not exist")
    if not p.is_file():
        raise RankoneError(f"{p} is not a file; give the path of a .gguf file")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise RankoneError(f"{p} is not a GGUF file (it does not start with the bytes 'GGUF')")
    return p


def _require_gguf_support() -> None:
    missing = []
    for module in ("gguf", "accelerate"):  # transformers' GGUF loader needs both
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise RankoneError(f"reading GGUF files needs the {' and '.join(missing)} package: "
                           f"pip install {' '.join(missing)}")


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights  # transformers 4
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _plain_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The same weights in a model built from the config without `quantization_config`.

    transformers marks a GGUF-loaded model as quantized (its `save_pretrained` refuses), although
    its tensors are already dequantized; a model built from the cleaned config is an ordinary one.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _no_init_weights():  # every weight is overwritten next: skip the random initialization
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a .gguf file, the weights dequantized to `dtype` on `device`."""
    p = check_gguf_file(path)
    _require_gguf_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=dtype,
                                                     local_files_only=True)
        tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    except (ValueError, KeyError, NotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RankoneError(f"transformers cannot load GGUF file {p}: {first}") from None
    model = _plain_copy(model, dtype)
    model.config.name_or_path = str(p)
    return model.to(device), tok


def _is_empty_dir(p: Path) -> bool:
    return p.is_dir() and not any(p.iterdir())


def gguf_to_folder(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                   overwrite: bool = False) -> Path:
    """Convert a .gguf file into an ordinary Hugging Face folder at `out_dir`; returns its path.

    The folder appears complete or not at all: it is written into a temporary sibling and moved
    into place with os.replace. An existing non-empty `out_dir` is replaced only with `overwrite`.
    """
    src = check_gguf_file(gguf_path)
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite and not _is_empty_dir(out):
        raise RankoneError(f"{out} already exists; remove it or pass overwrite=True")
    if out.exists() and not out.is_dir():
        raise RankoneError(f"{out} exists and is a file; choose another output folder")
    digest = file_sha256(src)
    model, tok = load_gguf(src, dtype=torch.float32)
    model.config.name_or_path = out.name  # no local paths of this machine in config.json

    with atomic_dir(out, overwrite=True) as tmp:  # the folder appears complete or not at all
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        cfg = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in cfg:  # never expected; a GGUF folder must load as a plain one
            raise RankoneError(f"conversion of {src} kept a quantization_config; not writing {out}")
        source = {"gguf_file": src.name, "sha256": digest, "size_bytes": src.stat().st_size}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return out


def read_gguf_source(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The gguf_source.json of a converted folder, or None when there is none or it is unreadable."""
    try:
        d = json.loads((Path(folder) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None
