"""GGUF files (llama.cpp's single-file format) as rankone models.

`load_gguf` reads a .gguf file with transformers' GGUF loader, dequantized to a plain torch dtype,
and returns an ordinary (unquantized) model and its tokenizer: editing, generation and
`save_pretrained` all work on it as on a model loaded from a folder. transformers parses the file
three times on the way (its config, its tokenizer, its tensors: most of the load; BENCHMARKS.md,
"First edit of a real model"), so the converted weights are kept, once per file, in
`$RANKONE_CACHE/models/converted/<SHA-256 of the file>/`, and a later load of the same file reads
that folder instead (a changed file has another digest, so it never meets a stale conversion).
`gguf_to_folder` converts a .gguf file into an ordinary Hugging Face folder (config.json without
`quantization_config`, model.safetensors, tokenizer files), written atomically, with a
`gguf_source.json` naming the source file and its SHA-256.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from rankone.core.atomic import atomic_dir
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import file_sha256
from rankone.core.progress import status

log = logging.getLogger(__name__)

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


def models_cache_dir() -> Path:
    """$RANKONE_CACHE/models, or ~/.cache/rankone/models."""
    root = os.environ.get("RANKONE_CACHE") or Path.home() / ".cache" / "rankone"
    return Path(root).expanduser() / "models"


def converted_dir(sha256: str, cache: str | os.PathLike | None = None) -> Path:
    """Where the converted weights of the .gguf file with this SHA-256 are kept."""
    return (Path(cache).expanduser() if cache is not None else models_cache_dir()) / "converted" / sha256[:32]


def load_gguf(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              sha256: str | None = None, cache: str | os.PathLike | None | bool = None) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a .gguf file, the weights dequantized to `dtype` on `device`.

    The first load of a file parses it and keeps the converted weights (float32) under the file's
    SHA-256 (`sha256`, if the caller has it, else computed); later loads read them from there.
    cache: the models cache folder (default $RANKONE_CACHE/models), or False to neither read nor
    keep a conversion."""
    p = check_gguf_file(path)
    _require_gguf_support()
    if cache is False:
        return _parse(p, dtype, device)
    digest = sha256 or file_sha256(p)
    folder = converted_dir(digest, cache or None)
    if _converted(folder, digest):
        status(f"loading {p.name} as converted earlier ({folder})")
        try:
            return _from_folder(folder, p, dtype, device)
        except Exception as e:  # a damaged conversion: read the file again (and convert it anew)
            log.warning("ignoring the damaged conversion %s (%s); reading %s again", folder, str(e).splitlines()[0][:200], p)
    status(f"reading {p.name}: parsing and de-quantising it (once per file: the result is kept for later loads)")
    model, tok = _parse(p, torch.float32, "cpu")
    _keep(model, tok, p, digest, folder)
    return model.to(dtype=dtype).to(device), tok


def _parse(p: Path, dtype: torch.dtype, device: str | torch.device) -> tuple[torch.nn.Module, Any]:
    """The model and tokenizer, straight from the file with transformers' GGUF loader."""
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


def _converted(folder: Path, sha256: str) -> bool:
    source = read_gguf_source(folder)
    return source is not None and source.get("sha256") == sha256 and (folder / "model.safetensors").is_file()


def _from_folder(folder: Path, p: Path, dtype: torch.dtype, device: str | torch.device) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.config.name_or_path = str(p)  # as if read from the file: its card, its name in patches
    return model.to(device).eval(), tok


def _keep(model: torch.nn.Module, tok: Any, src: Path, sha256: str, folder: Path) -> None:
    """Write the conversion into the cache; a cache that cannot take it (no space, no permission)
    costs only the speed of the next load."""
    need = 2 * sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if shutil.disk_usage(folder.parent).free < need:
            log.warning("not keeping the conversion of %s: %s has under %d MB free", src.name, folder.parent, need >> 20)
            return
        status(f"keeping the converted weights of {src.name} for later loads ({folder})")
        _write_folder(model, tok, src, sha256, folder, name=src.stem)
    except (OSError, RankoneError) as e:
        log.warning("could not keep the conversion of %s in %s (%s); the next load reads the file again",
                    src.name, folder, e)


def _write_folder(model: torch.nn.Module, tok: Any, src: Path, sha256: str, out: Path, name: str) -> None:
    """An ordinary Hugging Face folder of the model, written atomically, with gguf_source.json."""
    was = model.config.name_or_path
    model.config.name_or_path = name  # no local paths of this machine in config.json
    try:
        with atomic_dir(out, overwrite=True) as tmp:  # the folder appears complete or not at all
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            cfg = json.loads((tmp / "config.json").read_text())
            if "quantization_config" in cfg:  # never expected; a GGUF folder must load as a plain one
                raise RankoneError(f"conversion of {src} kept a quantization_config; not writing {out}")
            source = {"gguf_file": src.name, "sha256": sha256, "size_bytes": src.stat().st_size}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    finally:
        model.config.name_or_path = was


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
    model, tok = load_gguf(src, dtype=torch.float32, sha256=digest, cache=False)
    _write_folder(model, tok, src, digest, out, name=out.name)
    return out


def read_gguf_source(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The gguf_source.json of a converted folder, or None when there is none or it is unreadable."""
    try:
        d = json.loads((Path(folder) / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None
