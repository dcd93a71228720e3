"""Finding the edit site of a decoder the architecture table does not list, from the modules alone.

The table in `architectures` is asked first; this runs for the model types it lacks. The rules:

1. The decoder blocks are the `nn.ModuleList` holding the most parameters; its blocks must all be
   one class (a hybrid of, say, attention and Mamba blocks is refused).
2. The hidden size d is the config's `hidden_size` (of the text config), else the embedding width.
3. The attention is the block's one direct child that holds a dense layer and whose name or class
   says attention (`attn`, `attention`): it is traced, never edited.
4. The MLP output projection is the one dense layer (`nn.Linear`, or transformers' `Conv1D`) outside
   the attention whose output width is d: it maps the MLP's inner width back to the hidden size.
   The MLP is the block's direct child that holds it (the projection itself when the block has no
   MLP module, as in OPT).
5. The token embedding is `model.get_input_embeddings()`, found by its path.

Encoders (a masked-LM head: BERT, RoBERTa) and encoder-decoders are refused before any of this.

Refused with one line naming the model type and `--arch-spec`: a mixture-of-experts MLP (an experts
list, a router, 3-D expert weights), raw weights outside any dense layer (fused layers), integer
(quantised) weights, no candidate or more than one, and blocks that disagree with one another.
Every block is checked, not only the first, so a model with MoE MLPs in some layers is refused too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from rankone.core.errors import RankoneError

OVERRIDE_HINT = (
    "pass the module path templates by hand with --arch-spec "
    '\'{"layers": "model.layers", "mlp": "model.layers.{}.mlp", '
    '"proj": "model.layers.{}.mlp.down_proj", "attn": "model.layers.{}.self_attn", '
    '"embed": "model.embed_tokens"}\' (or a path to such a JSON file)'
)

# Submodule classes and names that mark a mixture of experts in transformers' implementations
# (MixtralExperts, OlmoeTopKRouter, Llama4Router, ...). Not "Moe": a family prefix, as in the
# dense Qwen2MoeMLP of a qwen2_moe layer listed in mlp_only_layers.
_MOE_CLASS = re.compile(r"expert|router", re.IGNORECASE)
_MOE_NAMES = {"experts", "router", "shared_expert"}
_ATTN = re.compile(r"attn|attention", re.IGNORECASE)


class _Refused(Exception):
    """Why one block has no single dense projection (turned into a RankoneError by `discover`)."""


def is_conv1d(module: nn.Module) -> bool:
    # GPT-2's Conv1D stores weight as [in, out]; recognised by type, never by shape, because a
    # square matrix fits both ways.
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return False
    return isinstance(module, Conv1D)


def is_dense(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_in_out(module: nn.Module) -> tuple[int, int]:
    """(in, out) widths of an nn.Linear ([out, in] weight) or a Conv1D ([in, out] weight)."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])


@dataclass(frozen=True)
class Discovery:
    """What discovery found: the five path templates (`{}` = layer index) and the evidence."""

    layers: str
    mlp: str
    proj: str
    attn: str
    embed: str
    n_blocks: int
    block_class: str
    mlp_class: str
    proj_class: str
    d_model: int
    d_inner: int

    def paths(self) -> dict[str, str]:
        return {"layers": self.layers, "mlp": self.mlp, "proj": self.proj, "attn": self.attn, "embed": self.embed}

    def report(self) -> str:
        return (
            f"discovered {self.n_blocks} {self.block_class} blocks at {self.layers}; editing {self.proj} "
            f"({self.proj_class} {self.d_inner}->{self.d_model}, the one layer outside the attention that "
            f"writes the hidden size, in {self.mlp_class}); attention {self.attn}; embedding {self.embed}"
        )


@dataclass(frozen=True)
class _Site:
    """One block's edit site, relative to the block."""

    attn: str
    mlp: str
    proj: str
    mlp_class: str
    proj_class: str
    d_inner: int


def discover(model: nn.Module, model_type: str | None = None) -> Discovery:
    """The edit site of `model` found from its modules, or a one-line RankoneError saying why not."""
    mt = model_type or getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__

    def refuse(why: str) -> RankoneError:
        return RankoneError(f"cannot find a single dense MLP output projection in model type {mt!r}: {why}; {OVERRIDE_HINT}")

    try:
        _check_decoder_only(mt, getattr(model, "config", None))
        layers, blocks = _block_list(model)
        d = _hidden_size(model)
        sites = []
        for i, block in enumerate(blocks):
            try:
                sites.append(_block_site(block, d))
            except _Refused as e:
                raise _Refused(f"block {layers}.{i} ({type(block).__name__}): {e}") from None
        first = sites[0]
        for i, s in enumerate(sites[1:], 1):
            if (s.attn, s.mlp, s.proj) != (first.attn, first.mlp, first.proj):
                raise _Refused(f"blocks disagree: block 0 edits {first.proj}, block {i} edits {s.proj}")
        embed = _embedding_path(model)
    except _Refused as e:
        raise refuse(str(e)) from None
    return Discovery(
        layers=layers, mlp=f"{layers}.{{}}.{first.mlp}", proj=f"{layers}.{{}}.{first.proj}",
        attn=f"{layers}.{{}}.{first.attn}", embed=embed, n_blocks=len(blocks),
        block_class=type(blocks[0]).__name__, mlp_class=first.mlp_class, proj_class=first.proj_class,
        d_model=d, d_inner=first.d_inner,
    )


def _check_decoder_only(model_type: str, config: object) -> None:
    # An encoder's LM head (BertLMHeadModel) sees the tokens after the subject: ROME's key and
    # value assume a causal decoder, so encoders and encoder-decoders are refused outright.
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False) or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        raise _Refused("it is an encoder-decoder, and rankone edits decoder-only causal language models")
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise _Refused("it is an encoder (it has a masked-LM head), and rankone edits decoder-only causal language models")


def _block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    def size(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    lists = sorted(((size(m), n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)),
                   key=lambda t: -t[0])
    if not lists:
        raise _Refused("it holds no nn.ModuleList of decoder blocks")
    top, name, blocks = lists[0]
    if len(lists) > 1 and lists[1][0] == top and not lists[1][1].startswith(name + "."):
        raise _Refused(f"two block lists of equal size, {name} and {lists[1][1]}")
    classes = sorted({type(b).__name__ for b in blocks})
    if len(classes) > 1:
        raise _Refused(f"its block list {name} mixes {', '.join(classes)} (a hybrid model)")
    return name, blocks  # type: ignore[return-value]


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None:
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        h = getattr(text, "hidden_size", None)
        if isinstance(h, int) and h > 0:
            return h
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or getattr(emb, "weight", None) is None:
        raise _Refused("neither its config's hidden_size nor an input embedding gives the hidden size")
    return int(emb.weight.shape[1])


def _block_site(block: nn.Module, d: int) -> _Site:
    children = [(n, c) for n, c in block.named_children()]
    holds_dense = {n for n, c in children if any(is_dense(m) for m in c.modules())}
    attn = [n for n, c in children if n in holds_dense and (_ATTN.search(n) or _ATTN.search(type(c).__name__))]
    if len(attn) != 1:
        found = ", ".join(attn) if attn else "none among " + ", ".join(n for n, _ in children)
        raise _Refused(f"expected one attention module among the block's children, found {found}")
    # the parts that hold matrices (norms, dropouts and activations hold none) must be dense
    others = [(n, c) for n, c in children if n != attn[0] and _holds_matrices(c)]
    for n, c in others:
        _check_dense_only(n, c)
    cands = [(n, f"{n}.{sub}" if sub else n, m) for n, c in others for sub, m in c.named_modules()
             if is_dense(m) and dense_in_out(m)[1] == d]
    if not cands:
        raise _Refused(f"no nn.Linear or Conv1D outside the attention {attn[0]} writes the hidden size {d}")
    if len(cands) > 1:
        raise _Refused(f"ambiguous: {', '.join(p for _, p, _ in cands)} all write the hidden size {d}")
    mlp, proj, m = cands[0]
    return _Site(attn=attn[0], mlp=mlp, proj=proj, mlp_class=type(block.get_submodule(mlp)).__name__,
                 proj_class=type(m).__name__, d_inner=dense_in_out(m)[0])


def _holds_matrices(module: nn.Module) -> bool:
    tensors = list(module.parameters()) + list(module.buffers())
    return any(t.ndim >= 2 for t in tensors)


def _check_dense_only(name: str, child: nn.Module) -> None:
    """Refuse a block part that is a mixture of experts, or holds fused or quantised weights."""
    what = f"{name} ({type(child).__name__})"
    for sub, m in child.named_modules():
        leaf = sub.rsplit(".", 1)[-1]
        if isinstance(m, nn.ModuleList) or _MOE_CLASS.search(type(m).__name__) or leaf in _MOE_NAMES:
            inner = f" ({name}.{sub}: {type(m).__name__})" if sub else ""
            raise _Refused(f"{what} is a mixture of experts{inner}, not one dense MLP")
    for pname, p in child.named_parameters():
        owner = child.get_submodule(pname.rpartition(".")[0])
        if p.ndim >= 3:
            raise _Refused(f"{what} holds a {p.ndim}-D weight {name}.{pname} (fused experts or a fused layer)")
        if p.ndim == 2 and not is_dense(owner):
            raise _Refused(f"{what} holds {name}.{pname} outside any nn.Linear (a fused layer)")
        if not p.is_floating_point():
            raise _Refused(f"{what} holds quantised {p.dtype} weights ({name}.{pname}); de-quantise the model first")
    for bname, b in child.named_buffers():
        if b.ndim >= 2 and not b.is_floating_point():
            raise _Refused(f"{what} holds quantised {b.dtype} weights ({name}.{bname}); de-quantise the model first")


def _embedding_path(model: nn.Module) -> str:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        emb = None
    for n, m in model.named_modules():
        if emb is not None and m is emb:
            return n
    raise _Refused("model.get_input_embeddings() gives no module of the model")
