"""Where things live inside each supported architecture: one table keyed by `config.model_type`.

A path template holds `{}` for the layer index (pyvene style: where a hook goes is data).
`proj` is the MLP's output projection, the module ROME edits: its input is the key k, its output
the value v. Everything else in the package asks this table and never hard-codes a module name.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankone.core.errors import RankoneError


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # the ModuleList of decoder blocks, e.g. "transformer.h"
    mlp: str  # one block's MLP (for tracing), e.g. "transformer.h.{}.mlp"
    proj: str  # the MLP output projection that gets edited, e.g. "transformer.h.{}.mlp.c_proj"
    attn: str  # one block's attention (for tracing)
    embed: str  # the token embedding (for tracing's noise)

    def layer_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        missing = names - set(d)
        if unknown or missing:
            raise RankoneError(
                f"architecture override needs exactly the keys {sorted(names)}; "
                f"unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        return cls(**d)


def _decoder(prefix: str, mlp: str, proj: str, attn: str, embed: str) -> ArchSpec:
    return ArchSpec(
        layers=prefix,
        mlp=f"{prefix}.{{}}.{mlp}",
        proj=f"{prefix}.{{}}.{proj}",
        attn=f"{prefix}.{{}}.{attn}",
        embed=embed,
    )


_LLAMA_LIKE = _decoder("model.layers", "mlp", "mlp.down_proj", "self_attn", "model.embed_tokens")

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": _decoder("transformer.h", "mlp", "mlp.c_proj", "attn", "transformer.wte"),
    "gptj": _decoder("transformer.h", "mlp", "mlp.fc_out", "attn", "transformer.wte"),
    "gpt_neox": _decoder(
        "gpt_neox.layers", "mlp", "mlp.dense_4h_to_h", "attention", "gpt_neox.embed_in"
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "phi": _decoder("model.layers", "mlp", "mlp.fc2", "self_attn", "model.embed_tokens"),
    # OPT has no MLP submodule: fc2's output is the MLP's output.
    "opt": _decoder(
        "model.decoder.layers", "fc2", "fc2", "self_attn", "model.decoder.embed_tokens"
    ),
    "falcon": _decoder(
        "transformer.h", "mlp", "mlp.dense_4h_to_h", "self_attention", "transformer.word_embeddings"
    ),
}

OVERRIDE_HINT = (
    "pass the module path templates by hand with --arch-spec "
    '\'{"layers": "model.layers", "mlp": "model.layers.{}.mlp", '
    '"proj": "model.layers.{}.mlp.down_proj", "attn": "model.layers.{}.self_attn", '
    '"embed": "model.embed_tokens"}\' (or a path to such a JSON file)'
)


def lookup(model_type: str, override: dict[str, Any] | ArchSpec | None = None) -> ArchSpec:
    """The spec for `model_type`, or the user's override. Unknown types get a helpful error."""
    if isinstance(override, ArchSpec):
        return override
    if override is not None:
        return ArchSpec.from_dict(override)
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    raise RankoneError(
        f"unknown model type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}; "
        f"or {OVERRIDE_HINT}"
    )


def spec_for(model: nn.Module, override: dict[str, Any] | ArchSpec | None = None) -> ArchSpec:
    spec = lookup(getattr(model.config, "model_type", "?"), override or _attached(model))
    return spec


def attach_spec(model: nn.Module, spec: ArchSpec) -> None:
    """Remember a hand-given spec on the model so every later call finds it."""
    model._rankone_arch = spec  # type: ignore[attr-defined]


def _attached(model: nn.Module) -> ArchSpec | None:
    return getattr(model, "_rankone_arch", None)


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise RankoneError(
            f"model {type(model).__name__} has no module {path!r}; check the architecture "
            f"table entry or {OVERRIDE_HINT}"
        ) from None


def num_layers(model: nn.Module, spec: ArchSpec | None = None) -> int:
    spec = spec or spec_for(model)
    layers = get_module(model, spec.layers)
    return len(layers)  # type: ignore[arg-type]


def check_layer(model: nn.Module, layer: int, spec: ArchSpec | None = None) -> int:
    n = num_layers(model, spec)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise RankoneError(f"layer {layer} is out of range: this model has layers 0..{n - 1}")
    return layer


def proj_path(model: nn.Module, layer: int) -> str:
    spec = spec_for(model)
    check_layer(model, layer, spec)
    return spec.proj.format(layer)


# ---- weights in the nn.Linear [out, in] convention ------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2's Conv1D stores weight as [in, out]; recognised by type, never by shape, because a
    # square matrix fits both ways.
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return False
    return isinstance(module, Conv1D)


def weight_layout(module: nn.Module) -> str:
    """'linear' ([out, in]) or 'conv1d' ([in, out]); anything else is refused."""
    if _is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    raise RankoneError(
        f"cannot edit a {type(module).__name__}: only nn.Linear and transformers' Conv1D "
        "projections are supported (quantised layers must be de-quantised first)"
    )


def weight_oi(module: nn.Module) -> torch.Tensor:
    """The projection's weight as an [out, in] view (no copy): writes to it reach the model."""
    w = module.weight
    return w.T if weight_layout(module) == "conv1d" else w


def in_out_features(module: nn.Module) -> tuple[int, int]:
    out_f, in_f = weight_oi(module).shape
    return in_f, out_f
