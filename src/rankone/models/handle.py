"""A loaded model and what rankone knows about it, in one object (nothing rides on the nn.Module).

    handle = load_model("path/to/model")      # a folder, a .gguf file or a hub id
    model, tok = handle                       # unpacks like the (model, tokenizer) pair it holds
    Editor(handle, {"layer": 3})              # your settings over the model card's recommendations
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.models.card import ModelCard, default_layer, find_card

NO_CORPUS = ("no corpus for the key statistics: pass --stats-corpus with a .txt file, a folder of "
             ".txt files or a .jsonl file with a 'text' field (ordinary text in the model's language), "
             "or name one in the model card (rankone.json: \"stats_corpus\")")


# Config keys that say nothing about what the weights compute: where the model came from, the
# versions and dtype it was saved with, and switches of a forward pass's outputs.
VOLATILE_CONFIG = {"_name_or_path", "name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype",
                   "id2label", "label2id", "problem_type", "use_cache", "return_dict", "output_hidden_states",
                   "output_attentions", "_commit_hash", "quantization_config", "tokenizer_class"}


def comparable_config(config: Any) -> dict[str, Any]:
    """The model config as JSON, without VOLATILE_CONFIG keys: what a patch records of its base, so
    that applying it onto a model whose config was changed (another activation, fewer layers) is noticed."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    d = {k: v for k, v in d.items() if k not in VOLATILE_CONFIG and not k.startswith("_attn_implementation")}
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def config_changes(recorded: Any, config: Any) -> list[str]:
    """'key: recorded -> now' for each key both configs have with different values."""
    if not isinstance(recorded, dict):
        return []
    now = comparable_config(config)
    return [f"{k}: {json.dumps(recorded[k])} -> {json.dumps(now[k])}" for k in sorted(set(recorded) & set(now))
            if recorded[k] != now[k]]


@dataclass
class ModelHandle:
    model: torch.nn.Module
    tokenizer: Any
    spec: arch.ArchSpec  # where the edited projection and the blocks live
    source: str  # the model folder, the .gguf file or the hub id it came from ("" for an in-memory model)
    card: ModelCard | None = None  # rankone.json beside the model, if there is one
    source_sha256: str | None = None  # SHA-256 of the .gguf file a GGUF model came from

    def __iter__(self) -> Iterator[Any]:
        """`model, tok = load_model(path)`: a handle unpacks to its model and tokenizer."""
        yield self.model
        yield self.tokenizer

    @classmethod
    def of(cls, model: torch.nn.Module, tok: Any, spec: arch.ArchSpec | None = None) -> "ModelHandle":
        """A handle for a model already in memory. Its source is the folder (or .gguf file) that
        transformers recorded as the model's `name_or_path`, whose card is read if it has one."""
        src = str(getattr(model.config, "_name_or_path", "") or "")
        card = find_card(src) if src and Path(src).exists() else None
        return cls(model, tok, spec or arch.spec_for(model), src, card)

    # -- where things are --

    @property
    def folder(self) -> Path | None:
        """The local model folder, or None (a .gguf file, a hub id, a model built in memory)."""
        p = Path(self.source) if self.source else None
        return p if p is not None and p.is_dir() else None

    @property
    def n_layers(self) -> int:
        return arch.num_layers(self.model, self.spec)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def check_layer(self, layer: int) -> int:
        return arch.check_layer(self.model, layer, self.spec)

    def proj_path(self, layer: int) -> str:
        """The edited projection of `layer`, e.g. 'transformer.h.3.mlp.c_proj'."""
        return self.spec.proj.format(self.check_layer(layer))

    def proj(self, layer: int) -> torch.nn.Module:
        return arch.get_module(self.model, self.proj_path(layer))

    def block_path(self, layer: int) -> str:
        return self.spec.layer_path(self.check_layer(layer))

    def block(self, layer: int) -> torch.nn.Module:
        return arch.get_module(self.model, self.block_path(layer))

    def mlp_output_norm(self, layer: int) -> str | None:
        """The norm between layer `layer`'s projection and the residual stream (Gemma 2/3), or None."""
        return arch.mlp_output_norm(self.model, layer, self.spec)

    # -- what the model recommends --

    def default_layer(self) -> int:
        return default_layer(self.card, self.n_layers)

    def stats_corpus(self, given: str | os.PathLike | None = None) -> Path:
        """The corpus for the key statistics: the one given, else the card's, else corpus.txt in
        the model folder; otherwise one line saying how to give one."""
        if given:
            return Path(given)
        card_corpus = self.card.resolve(self.card.stats_corpus, "stats_corpus") if self.card is not None else None
        if card_corpus is not None:
            return card_corpus
        if self.folder is not None and (self.folder / "corpus.txt").is_file():
            return self.folder / "corpus.txt"
        raise RankoneError(NO_CORPUS)

    def cases_file(self) -> Path | None:
        """The card's case file of facts the model knows, when it names one that exists."""
        p = self.card.resolve(self.card.cases, "cases") if self.card is not None else None
        return p if p is not None and p.exists() else None

    def base_info(self) -> dict[str, Any]:
        """What a patch records as its base model."""
        cfg = self.model.config
        info: dict[str, Any] = {"model_type": cfg.model_type, "name_or_path": str(getattr(cfg, "_name_or_path", "")),
                                "n_layers": self.n_layers, "arch": arch.describe(self.model, self.spec),
                                "config": comparable_config(cfg)}
        if self.source_sha256:
            info["gguf_sha256"] = self.source_sha256
        return info
