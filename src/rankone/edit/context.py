"""What every edit of one Editor shares, computed once and held here (never process-wide):
the statistics corpus, the context templates, C of each layer and what methods derive from it,
and the keys earlier edits kept in the model wrote (AlphaEdit preserves them).

C of a layer is measured the first time a layer is asked for, from the model as it is then, and
kept: every later edit of this context is solved against that C, as in the papers' sequential
runs. (On disk C is keyed by the weights upstream of its layer, which change once a lower layer
is edited: the disk cache alone would measure C again on the edited model.)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rankone.core.errors import RankoneError
from rankone.core.fingerprint import model_sha256
from rankone.core.tokens import PREFIX_STARTS, encode, sample_prefixes
from rankone.methods.base import PreservedKeys
from rankone.methods.cache import cached_json
from rankone.methods.corpus import cached_sampled_corpus, sampled_corpus
from rankone.methods.settings import MethodSettings
from rankone.methods.stats import LayerStats, layer_stats
from rankone.models.handle import ModelHandle

log = logging.getLogger(__name__)


class EditContext:
    """The `rankone.methods.base.EditInputs` of an Editor."""

    def __init__(self, handle: ModelHandle, stats_corpus: str | os.PathLike | None = None,
                 sampled_tokens: int = MethodSettings.sampled_corpus_tokens, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None, progress: bool = True) -> None:
        """`stats_corpus`: the user's; else the model's own (card, corpus.txt), else `sampled_tokens`
        sampled from the model with `seed`. `cache_dir`: where C and derived files go (None: the user's cache)."""
        self.handle = handle
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.progress = progress
        self.sampled_tokens, self.seed = sampled_tokens, seed
        self._corpus = Path(stats_corpus) if stats_corpus else None
        self.corpus_source = str(self._corpus) if self._corpus else ""  # recorded in each edit
        self._templates: dict[tuple, list[str]] = {}
        self._stats: dict[tuple[int, int], LayerStats] = {}
        self._memo: dict[tuple, Any] = {}
        self.kept = PreservedKeys()  # keys of the edits kept in the model (preserved by AlphaEdit)

    def corpus(self) -> Path:
        """The statistics corpus: the one given, else the model's own, else one sampled from the
        model (seeded, cached by its fingerprint; said in one line and recorded in each edit)."""
        if self._corpus is None:
            try:
                self._corpus = self.handle.stats_corpus()  # the card's, else the folder's corpus.txt
                self.corpus_source = str(self._corpus)
            except RankoneError:
                model, tok, n = self.handle.model, self.handle.tokenizer, self.sampled_tokens
                cached = cached_sampled_corpus(model, tok, n, self.seed, cache_dir=self.cache_dir)
                log.warning("no statistics corpus given: %s %s tokens %s the model itself (seed %d%s); "
                            "pass --stats-corpus to use natural text", "using the" if cached else "sampling",
                            f"{n:,}", "sampled from" if cached else "from", self.seed,
                            ", cached earlier" if cached else "; cached for this model")
                self._corpus = cached or sampled_corpus(model, tok, n, self.seed, cache_dir=self.cache_dir,
                                                        progress=self.progress)
                self.corpus_source = f"sampled from the model: {n} tokens, seed {self.seed}"
        return self._corpus

    def templates(self, s: MethodSettings) -> list[str]:
        """"{}" and the context templates: given verbatim, or sampled from the model once per
        (model fingerprint, seed, spec) and kept on disk, so later processes sample nothing."""
        if s.prefixes is not None:
            return ["{}"] + list(s.prefixes)
        key = (s.seed, tuple(map(tuple, s.prefix_spec)))
        if key not in self._templates:
            model, tok = self.handle.model, self.handle.tokenizer
            disk_key = {"schema": "rankone.templates/1", "model": model_sha256(model), "seed": s.seed,
                        "spec": [list(x) for x in s.prefix_spec], "vocab": len(tok),
                        "starts": [encode(tok, w)[0] for w in PREFIX_STARTS]}
            made, _ = cached_json("templates", disk_key, lambda: sample_prefixes(model, tok, s.prefix_spec, s.seed),
                                  self.cache_dir)
            self._templates[key] = ["{}"] + list(made)
        return self._templates[key]

    def stats(self, layers: Sequence[int], n_tokens: int) -> dict[int, LayerStats]:
        """C of each layer, measured once per context (the missing layers in one pass) and kept."""
        missing = [l for l in dict.fromkeys(layers) if (l, n_tokens) not in self._stats]
        if missing:
            got = layer_stats(self.handle, missing, self.corpus(), n_tokens, self.cache_dir, self.progress)
            for l in missing:
                self._stats[l, n_tokens] = got[l]
        return {l: self._stats[l, n_tokens] for l in layers}

    def use_stats(self, layer: int, n_tokens: int, st: LayerStats) -> None:
        """Give C of a layer instead of measuring it (e.g. C = I, to measure what statistics are worth)."""
        self._stats[layer, n_tokens] = st

    def stats_record(self, st: LayerStats) -> dict[str, Any]:
        """What an edit records about the statistics it was solved with."""
        return {"n_tokens": st.n_tokens, "corpus_sha256": st.meta.get("corpus", ""), "jitter": st.jitter,
                "corpus": self.corpus_source}

    def preserved(self, layer: int, in_features: int) -> torch.Tensor:
        return self.kept.get(layer, in_features)

    def memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]
