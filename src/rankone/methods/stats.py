"""Key statistics: C = E[k kᵀ] of the edited projection's inputs over a text corpus.

Streamed over tokens (not documents) in batches of a token budget, all requested layers in one
pass that stops right after the deepest of them (later layers and the LM head never run: C is
bit for bit what a full pass gives), accumulated in float64. C and its Cholesky factor are
cached on disk under a key of (upstream-weights fingerprint, layer, corpus fingerprint, token
budget) and verified on load, so a later process factors nothing.
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from tqdm.auto import tqdm

from rankone.core import architectures as arch
from rankone.core.atomic import write_cache
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import path_sha256, tensor_sha256, tensors_sha256
from rankone.core.hooks import capture, stop_at
from rankone.methods.cache import cache_root, digest
from rankone.methods.corpus import corpus_files, token_windows
from rankone.models.handle import ModelHandle

log = logging.getLogger(__name__)
SCHEMA = "rankone.methods.stats/1"
BATCH_TOKENS = 4096  # tokens per forward pass of the statistics (16 windows of 256)


# ---- fingerprints ---------------------------------------------------------------------------


def upstream_fingerprint(handle: ModelHandle, layer: int) -> str:
    """Hash of every weight that can change the keys at `layer`.

    Layers above, and the edited projection itself, cannot; leaving them out keeps the cache
    valid while edits at this layer accumulate (sequential editing).
    """
    proj = handle.proj_path(layer) + "."
    later = tuple(f"{handle.block_path(j)}." for j in range(layer + 1, handle.n_layers))
    named = [
        (n, p) for n, p in handle.model.named_parameters()
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

    @classmethod
    def identity(cls, d_in: int) -> "LayerStats":
        """C = I: no key statistics at all (the update's key direction is the key itself, as in
        EasyEdit's ROME configs); for measuring what the statistics are worth."""
        return cls(torch.eye(d_in, dtype=torch.float64), 0, {"corpus": "identity"})

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
    handle: ModelHandle, layers: list[int], corpus: str | os.PathLike,
    n_tokens: int, window: int = 256, batch_tokens: int = BATCH_TOKENS, progress: bool = True,
    truncate: bool = True,
) -> tuple[dict[int, torch.Tensor], int]:
    """One pass over the corpus; returns {layer: E[k kᵀ] float64} and the token count.

    Each batch holds batch_tokens // window windows. With truncate (the default) every forward
    pass ends right after the deepest layer's projection; truncate=False runs the whole model
    (only to show that both give the same C).
    """
    model, tok = handle.model, handle.tokenizer
    paths = {layer: handle.proj_path(layer) for layer in layers}
    deepest = arch.get_module(model, paths[max(layers)])
    dev = handle.device
    sums: dict[int, torch.Tensor | None] = {layer: None for layer in layers}
    count = 0
    window = min(window, getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None) or window)
    # The windows first (tokenizing stops at the budget), so that the bar counts to what the
    # corpus gives: a short corpus ends the pass before n_tokens. Each: [≤ window] token ids
    windows = [torch.tensor(w) for w in token_windows(tok, corpus, window, n_tokens)]
    bar = tqdm(total=sum(len(w) for w in windows), unit="tok", desc="key statistics", disable=not progress, leave=False)
    batch: list[torch.Tensor] = []

    def flush() -> None:
        nonlocal count
        n = max(len(s) for s in batch)
        ids = torch.zeros(len(batch), n, dtype=torch.long)
        mask = torch.zeros(len(batch), n, dtype=torch.bool)
        for i, s in enumerate(batch):
            ids[i, : len(s)], mask[i, : len(s)] = s, True
        with capture(model, list(paths.values()), outputs=False) as rec:
            with stop_at(deepest) if truncate else nullcontext():
                model(input_ids=ids.to(dev), attention_mask=mask.long().to(dev), use_cache=False)
        for layer, p in paths.items():
            x = rec.inputs[p].reshape(*mask.shape, -1)  # [batch, pos, in] (OPT flattens to [batch·pos, in])
            k = x[mask.to(x.device)].to(torch.float64)  # [tokens, in]
            kk = k.T @ k  # [in, in], on the model's device
            sums[layer] = kk if sums[layer] is None else sums[layer] + kk
        added = int(mask.sum())
        count += added
        bar.update(added)
        batch.clear()

    rows = max(1, batch_tokens // window)
    for w in windows:
        batch.append(w)
        if len(batch) == rows:
            flush()
    if batch:
        flush()
    bar.close()
    if count == 0:
        raise RankoneError(f"statistics corpus {corpus} produced no tokens")
    return {layer: s.cpu() / count for layer, s in sums.items()}, count  # type: ignore[union-attr]


def layer_stats(
    handle: ModelHandle, layers: list[int], corpus: str | os.PathLike,
    n_tokens: int = 1_000_000, cache_dir: str | os.PathLike | None = None, progress: bool = True,
) -> dict[int, LayerStats]:
    """Statistics for each layer: from a verified disk cache, else computed (all missing layers in
    one pass) and cached. Keeping them in memory is the caller's (rankone.edit.context)."""
    corpus_files(corpus)  # a corpus that is not a file or a folder is refused before its fingerprint is taken
    corpus_fp = path_sha256(corpus)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "stats"
    found: dict[int, LayerStats] = {}
    keys = {layer: {"schema": SCHEMA, "model": upstream_fingerprint(handle, layer), "layer": str(layer),
                    "module": handle.proj_path(layer), "corpus": corpus_fp, "budget": str(n_tokens)}
            for layer in layers}
    for layer in layers:
        if (st := _load(root, keys[layer])) is not None:
            found[layer] = st
    missing = [layer for layer in layers if layer not in found]
    if missing:
        warn_if_not_text(corpus)
        mom2, count = collect_mom2(handle, missing, corpus, n_tokens, progress=progress)
        d_in = next(iter(mom2.values())).shape[0]
        if count < d_in:  # C = E[k kᵀ] of fewer keys than dimensions cannot be full rank
            log.warning("the statistics corpus %s gave %d tokens for %d-dimensional keys: the key statistics C are "
                        "rank-deficient and the edit will generalise poorly; give a corpus of ordinary text with "
                        "many times more tokens", corpus, count, d_in)
        for layer in missing:
            st = LayerStats(mom2[layer], count, keys[layer])
            st.factor()  # once, here: the factor is cached beside C
            _save(root, keys[layer], st)
            found[layer] = st
    return found


def _file_for(root: Path, key: dict[str, str]) -> Path:
    return root / f"mom2-{digest(key)}.safetensors"


def _save(root: Path, key: dict[str, str], st: LayerStats) -> None:
    meta = dict(key, n_tokens=str(st.n_tokens), checksum=tensor_sha256(st.mom2))
    tensors = {"mom2": st.mom2.contiguous()}
    if st._chol is not None:
        tensors["chol"] = st._chol.contiguous()
        meta.update(chol_checksum=tensor_sha256(st._chol), jitter=repr(st.jitter))
    write_cache(_file_for(root, key), save(tensors, metadata=meta), "key statistics")


def warn_if_not_text(corpus: str | os.PathLike, sniff: int = 1 << 16) -> None:
    """Warn about a corpus file that does not look like text (NUL bytes, or mostly bytes that are
    not UTF-8): its 'tokens' are noise, and so would be C. Legal input, so a warning, not an error."""
    for f in corpus_files(corpus):
        try:
            with open(f, "rb") as fh:
                head = fh.read(sniff)
        except OSError:
            continue
        bad = len(head) - len(head.decode("utf-8", errors="ignore").encode("utf-8"))
        if b"\0" in head or bad > len(head) // 10:
            log.warning("the statistics corpus file %s does not look like text (%s); the key statistics C will "
                        "describe noise: give ordinary text in the model's language", f,
                        "it holds NUL bytes" if b"\0" in head else f"{bad} of its first {len(head)} bytes are not UTF-8")


def _load(root: Path, key: dict[str, str]) -> LayerStats | None:
    f = _file_for(root, key)
    if not f.exists():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(f))
        mom2 = tensors["mom2"]
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
    st = LayerStats(mom2, int(meta["n_tokens"]), key)
    chol = tensors.get("chol")
    if chol is not None and meta.get("chol_checksum") == tensor_sha256(chol) and chol.shape == mom2.shape:
        st._chol, st.jitter = chol, float(meta.get("jitter", "0.0"))
    return st
