"""Where things live inside each supported architecture: one table keyed by `config.model_type`.

A path template holds `{}` for the layer index (pyvene style: where a hook goes is data).
`proj` is the MLP's output projection, the module ROME edits: its input is the key k, its output
the value v. A model handle (rankone.models.handle) holds the spec found once by `spec_for`;
everything else reads the handle's and never hard-codes a module name.
A model type the table lacks is discovered from its modules (`rankone.core.discovery`); a user's
`--arch-spec` overrides both. `ArchSpec.source` says which of the three a spec came from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rankone.core.discovery import OVERRIDE_HINT, dense_in_out, discover, is_conv1d
from rankone.core.errors import RankoneError

SOURCES = ("table", "discovered", "override")


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # the ModuleList of decoder blocks, e.g. "transformer.h"
    mlp: str  # one block's MLP (for tracing), e.g. "transformer.h.{}.mlp"
    proj: str  # the MLP output projection that gets edited, e.g. "transformer.h.{}.mlp.c_proj"
    attn: str  # one block's attention (for tracing)
    embed: str  # the token embedding (for tracing's noise)
    # where the paths came from: "table", "discovered" or "override" (not part of equality)
    source: str = field(default="table", compare=False)
    found: str = field(default="", compare=False)  # what discovery found, in words (discovered specs only)

    def layer_path(self, layer: int) -> str:
        return f"{self.layers}.{layer}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def paths(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("source", "found")}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchSpec":
        names = {f.name for f in dataclasses.fields(cls)} - {"source", "found"}
        unknown = set(d) - names - {"source", "found"}
        missing = names - set(d)
        if unknown or missing:
            raise RankoneError(
                f"architecture override needs exactly the keys {sorted(names)}; "
                f"unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        if d.get("source", "table") not in SOURCES:
            raise RankoneError(f"architecture source {d['source']!r} is not one of {', '.join(SOURCES)}")
        if not all(isinstance(d[k], str) and d[k] for k in names):
            raise RankoneError("architecture override: every module path must be a non-empty string")
        block = f"{d['layers']}.{{}}."
        for k in ("mlp", "proj", "attn"):  # per-layer modules: inside block {} (never lm_head or the embedding)
            if not d[k].startswith(block) or d[k].count("{}") != 1:
                raise RankoneError(f"architecture override: {k} {d[k]!r} must be a path inside each block, "
                                   f"starting {block!r} ('{{}}' stands for the layer number)")
        if "{}" in d["layers"] or "{}" in d["embed"]:
            raise RankoneError("architecture override: layers and embed are single modules, without '{}'")
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
    # common types whose layout is known; discovery finds the same (tests/unit/test_discovery.py)
    "gemma3_text": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE,
    "helium": _LLAMA_LIKE,
    "glm": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
    "nemotron": _LLAMA_LIKE,
    "starcoder2": _decoder("model.layers", "mlp", "mlp.c_proj", "self_attn", "model.embed_tokens"),
    "gpt_bigcode": _decoder("transformer.h", "mlp", "mlp.c_proj", "attn", "transformer.wte"),
    "codegen": _decoder("transformer.h", "mlp", "mlp.fc_out", "attn", "transformer.wte"),
    "bloom": _decoder(
        "transformer.h", "mlp", "mlp.dense_4h_to_h", "self_attention", "transformer.word_embeddings"
    ),
    "mpt": _decoder("transformer.blocks", "ffn", "ffn.down_proj", "attn", "transformer.wte"),
}

def lookup(
    model_type: str, override: dict[str, Any] | ArchSpec | None = None, model: nn.Module | None = None
) -> ArchSpec:
    """The user's override, else the table's entry for `model_type`, else what discovery finds in
    `model`. Without a model an unlisted type gets a helpful error."""
    if isinstance(override, ArchSpec):
        return override
    if override is not None:
        return dataclasses.replace(ArchSpec.from_dict(override), source="override")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if model is not None:
        return _discovered(model, model_type)
    raise RankoneError(
        f"unknown model type {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))} and what "
        f"discovery finds in a loaded model; or {OVERRIDE_HINT}"
    )


def spec_for(model: nn.Module, override: dict[str, Any] | ArchSpec | None = None) -> ArchSpec:
    """Where `model`'s modules are: the override, else the table, else discovery. Called once, when
    a model handle is made (rankone.models.handle); everything after reads the handle's spec."""
    return lookup(getattr(model.config, "model_type", "?"), override, model)


def spec_for_config(config: Any, override: dict[str, Any] | ArchSpec | None = None) -> ArchSpec:
    """The spec before any weights load: override, table, or discovery on a weightless copy of the
    model built from `config` on the meta device (so a refused model costs no loading time)."""
    model_type = getattr(config, "model_type", "?")
    if override is not None or model_type in ARCHITECTURES:
        return lookup(model_type, override)
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - any failure to build means we cannot look inside
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise RankoneError(
            f"cannot build model type {model_type!r} from its config to find its layout ({first}); {OVERRIDE_HINT}"
        ) from None
    return _discovered(skeleton, model_type)


def _discovered(model: nn.Module, model_type: str) -> ArchSpec:
    found = discover(model, model_type)
    return ArchSpec(**found.paths(), source="discovered", found=found.report())


def describe(model: nn.Module, spec: ArchSpec) -> dict[str, Any]:
    """What a patch records about where it edits: model type, source, the path templates, a report."""
    model_type = getattr(model.config, "model_type", "?")
    if spec.source == "discovered":
        report = spec.found
    else:
        proj = get_module(model, spec.proj.format(0))
        d_in, d_out = dense_in_out(proj) if hasattr(proj, "weight") else ("?", "?")
        report = (f"{spec.source} entry for {model_type!r}: {num_layers(model, spec)} blocks at {spec.layers}; "
                  f"editing {spec.proj} ({type(proj).__name__} {d_in}->{d_out})")
    return {"model_type": model_type, "source": spec.source, "spec": spec.paths(), "report": report}


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise RankoneError(
            f"model {type(model).__name__} has no module {path!r}; check the architecture "
            f"table entry or {OVERRIDE_HINT}"
        ) from None


def num_layers(model: nn.Module, spec: ArchSpec) -> int:
    layers = get_module(model, spec.layers)
    if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
        raise RankoneError(f"{spec.layers!r} is a {type(layers).__name__}, not the list of decoder blocks; "
                           f"check the architecture table entry or {OVERRIDE_HINT}")
    return len(layers)


def check_layer(model: nn.Module, layer: int, spec: ArchSpec) -> int:
    n = num_layers(model, spec)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise RankoneError(f"layer {layer} is out of range: this model has layers 0..{n - 1}")
    return layer


# Names of a norm that some blocks apply to the MLP's output before adding it to the residual
# stream (Gemma 2 and 3, OLMo 2): there the edited projection's output counts only up to its scale.
MLP_OUTPUT_NORMS = ("post_feedforward_layernorm",)


def mlp_output_norm(model: nn.Module, layer: int, spec: ArchSpec) -> str | None:
    """The path of the norm applied to layer `layer`'s MLP output (None: the output is added as is)."""
    check_layer(model, layer, spec)
    block = get_module(model, spec.layer_path(layer))
    return next((f"{spec.layer_path(layer)}.{n}" for n in MLP_OUTPUT_NORMS if isinstance(getattr(block, n, None), nn.Module)), None)


# ---- weights in the nn.Linear [out, in] convention ------------------------------------------


def weight_layout(module: nn.Module) -> str:
    """'linear' ([out, in]) or 'conv1d' ([in, out]); anything else is refused."""
    if is_conv1d(module):  # [in, out], recognised by type (see discovery.is_conv1d)
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
