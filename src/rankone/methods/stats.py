"""Key statistics: C = E[k kᵀ] of the edited projection's inputs over a text corpus.

Streamed over tokens (not documents), all requested layers in one pass, accumulated in float64,
cached on disk under a key of (upstream-weights fingerprint, layer, corpus fingerprint, token
budget) and verified on load; the Cholesky factor is computed once per layer and reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rankone.core import architectures as arch
from rankone.core.atomic import write_bytes
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import path_sha256, tensor_sha256, tensors_sha256
from rankone.core.hooks import capture
from rankone.core.tokens import encode

log = logging.getLogger(__name__)
SCHEMA = "rankone.methods.stats/1"


def cache_root() -> Path:
    return Path(os.environ.get("RANKONE_CACHE", Path.home() / ".cache" / "rankone"))


# ---- corpus ---------------------------------------------------------------------------------


def corpus_files(path: str | os.PathLike) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise RankoneError(f"statistics corpus {p} does not exist; give a .txt file, a folder of .txt files or a .jsonl file")
    files = sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl")) if p.is_dir() else [p]
    if not files:
        raise RankoneError(f"statistics corpus folder {p} holds no .txt or .jsonl files")
    return files


def iter_texts(path: str | os.PathLike, chunk_chars: int = 1 << 16) -> Iterator[str]:
    """Documents of the corpus; long plain-text files come in newline-aligned chunks."""
    for f in corpus_files(path):
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise RankoneError(f"{f}:{n} is not a JSON object with a 'text' field") from None
                    yield str(text)
        else:
            with open(f, encoding="utf-8", errors="replace") as fh:
                rest = ""
                while block := fh.read(chunk_chars):
                    block = rest + block
                    cut = block.rfind("\n")
                    rest, block = (block[cut + 1:], block[: cut + 1]) if cut > 0 else ("", block)
                    yield block
                if rest:
                    yield rest


def token_windows(tok: Any, path: str | os.PathLike, window: int, n_tokens: int) -> Iterator[list[int]]:
    """Windows of at most `window` tokens, each led by the tokenizer's own prefix (e.g. BOS)."""
    lead = _leading_special(tok)
    body = window - len(lead)
    budget = n_tokens
    buf: list[int] = []
    for text in iter_texts(path):
        buf.extend(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
        while len(buf) >= body and budget > 0:
            take = min(body, budget)
            yield lead + buf[:take]
            buf, budget = buf[take:], budget - take
        if budget <= 0:
            return
    if buf and budget > 0:
        yield lead + buf[:budget]


def _leading_special(tok: Any) -> list[int]:
    ids, offsets = encode(tok, "a")
    lead = []
    for i, (s, e) in zip(ids, offsets):
        if e > s:
            break
        lead.append(i)
    return lead


# ---- fingerprints ---------------------------------------------------------------------------


def upstream_fingerprint(model: torch.nn.Module, layer: int) -> str:
    """Hash of every weight that can change the keys at `layer`.

    Layers above, and the edited projection itself, cannot; leaving them out keeps the cache
    valid while edits at this layer accumulate (sequential editing).
    """
    spec = arch.spec_for(model)
    proj = spec.proj.format(layer) + "."
    later = tuple(f"{spec.layers}.{j}." for j in range(layer + 1, arch.num_layers(model, spec)))
    named = [
        (n, p) for n, p in model.named_parameters()
        if not n.startswith(later) and not n.startswith(proj)
    ]
    return tensors_sha256(named)


# ---- statistics -----------------------------------------------------------------------------


@dataclass
class LayerStats:
    """C for one layer, with its Cholesky factor made once and reused for every solve."""

    mom2: torch.Tensor  # [in, in] float64, E[k kᵀ]
    n_tokens: int
    meta: dict[str, str] = field(default_factory=dict)
    _chol: torch.Tensor | None = None
    jitter: float = 0.0

    def factor(self) -> torch.Tensor:
        if self._chol is None:
            c = self.mom2
            eye = torch.eye(c.shape[0], dtype=c.dtype)
            scale = float(c.diagonal().mean()) or 1.0
            jitter = 0.0
            for _ in range(12):
                chol, info = torch.linalg.cholesky_ex(c + jitter * scale * eye)
                if int(info) == 0:
                    break
                jitter = 1e-10 if jitter == 0 else jitter * 10
            else:
                raise RankoneError("the key statistics are not positive definite; use a larger --stats-tokens")
            if jitter:
                log.warning("C was singular; added %.1e × mean diagonal to factor it", jitter)
            self._chol, self.jitter = chol, jitter
        return self._chol

    def solve(self, k: torch.Tensor) -> torch.Tensor:
        """C⁻¹k in float64 on the CPU. k: [in] or [in, n]."""
        rhs = k.detach().to("cpu", torch.float64)
        col = rhs.ndim == 1
        out = torch.cholesky_solve(rhs[:, None] if col else rhs, self.factor())
        return out[:, 0] if col else out


@torch.no_grad()
def collect_mom2(
    model: torch.nn.Module, tok: Any, layers: list[int], corpus: str | os.PathLike,
    n_tokens: int, window: int = 256, batch_size: int = 16, progress: bool = True,
) -> tuple[dict[int, torch.Tensor], int]:
    """One pass over the corpus; returns {layer: E[k kᵀ] float64} and the token count."""
    paths = {layer: arch.proj_path(model, layer) for layer in layers}
    dev = next(model.parameters()).device
    sums = {layer: None for layer in layers}
    count = 0
    bar = tqdm(total=n_tokens, unit="tok", desc="key statistics", disable=not progress, leave=False)
    batch: list[list[int]] = []

    def flush() -> None:
        nonlocal count
        n = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), n, dtype=torch.long)
        mask = torch.zeros(len(batch), n, dtype=torch.bool)
        for i, s in enumerate(batch):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), True
        with capture(model, list(paths.values()), outputs=False) as rec:
            model(input_ids=ids.to(dev), attention_mask=mask.long().to(dev), use_cache=False)
        for layer, p in paths.items():
            x = rec.inputs[p].reshape(*mask.shape, -1)  # [batch, pos, in] (OPT flattens to [batch·pos, in])
            k = x[mask.to(x.device)].to(torch.float64)  # [tokens, in]
            kk = k.T @ k  # [in, in]
            sums[layer] = kk.cpu() if sums[layer] is None else sums[layer] + kk.cpu()
        added = int(mask.sum())
        count += added
        bar.update(added)
        batch.clear()

    window = min(window, getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or window)
    for w in token_windows(tok, corpus, window, n_tokens):
        batch.append(w)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    bar.close()
    if count == 0:
        raise RankoneError(f"statistics corpus {corpus} produced no tokens")
    return {layer: s / count for layer, s in sums.items()}, count


_MEMO: dict[tuple, LayerStats] = {}


def layer_stats(
    model: torch.nn.Module, tok: Any, layers: list[int], corpus: str | os.PathLike,
    n_tokens: int = 1_000_000, cache_dir: str | os.PathLike | None = None, progress: bool = True,
) -> dict[int, LayerStats]:
    """Statistics for each layer: from memory, else from a verified disk cache, else computed."""
    corpus_fp = path_sha256(corpus)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "stats"
    found: dict[int, LayerStats] = {}
    missing: list[int] = []
    keys: dict[int, dict[str, str]] = {}
    for layer in layers:
        keys[layer] = {
            "schema": SCHEMA, "model": upstream_fingerprint(model, layer), "layer": str(layer),
            "module": arch.proj_path(model, layer), "corpus": corpus_fp, "budget": str(n_tokens),
        }
        memo_key = tuple(sorted(keys[layer].items()))
        if memo_key in _MEMO:
            found[layer] = _MEMO[memo_key]
        elif (st := _load(root, keys[layer])) is not None:
            found[layer] = _MEMO[memo_key] = st
        else:
            missing.append(layer)
    if missing:
        mom2, count = collect_mom2(model, tok, missing, corpus, n_tokens, progress=progress)
        for layer in missing:
            st = LayerStats(mom2[layer], count, keys[layer])
            _save(root, keys[layer], st)
            found[layer] = _MEMO[tuple(sorted(keys[layer].items()))] = st
    return found


def _file_for(root: Path, key: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return root / f"mom2-{digest}.safetensors"


def _save(root: Path, key: dict[str, str], st: LayerStats) -> None:
    meta = dict(key, n_tokens=str(st.n_tokens), checksum=tensor_sha256(st.mom2))
    tmp = _file_for(root, key).with_suffix(".partial")
    root.mkdir(parents=True, exist_ok=True)
    save_file({"mom2": st.mom2.contiguous()}, str(tmp), metadata=meta)
    write_bytes(_file_for(root, key), tmp.read_bytes())
    tmp.unlink()


def _load(root: Path, key: dict[str, str]) -> LayerStats | None:
    f = _file_for(root, key)
    if not f.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata() or {}
        mom2 = load_file(str(f))["mom2"]
        ok = (
            all(meta.get(k) == v for k, v in key.items())
            and meta.get("checksum") == tensor_sha256(mom2)
            and mom2.ndim == 2 and mom2.shape[0] == mom2.shape[1]
            and bool(torch.isfinite(mom2).all())
        )
    except Exception as e:  # corrupt header, truncated file, wrong dtype...
        log.warning("ignoring unreadable statistics cache %s (%s); recomputing", f, e)
        return None
    if not ok:
        log.warning("ignoring statistics cache %s: it does not match this model/corpus or fails its checksum", f)
        return None
    return LayerStats(mom2, int(meta["n_tokens"]), key)
