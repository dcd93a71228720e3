"""Causal tracing (Meng et al. 2022, §2): which hidden states carry a fact from subject to answer.

Three runs of the model on one prompt, reading p(answer) = the probability of the answer's first
token at the last position:

    clean      as is; every block output h_i^(l), MLP output m_i^(l), attention output a_i^(l) kept
    corrupted  Gaussian noise ε ~ N(0, ν²) added to the subject's token embeddings,
               ν = noise_factor · σ, σ = std of the embeddings of subject tokens (3σ in the paper)
    restored   corrupted, but some states put back to their clean values: one block output
               (kind "hidden"), or the MLP / attention outputs of a window of layers around l
               (kinds "mlp", "attn"), at one token

    total effect    TE = p_clean − p_corrupted
    indirect effect IE(kind, token, layer) = p_restored − p_corrupted
    AIE(kind, layer) = mean over facts of IE at the subject's last token

Every (kind, token, layer) restoration is a group of `n_samples` rows sharing the same seeded
noise, and many groups go through the model in one batch: hooks replace, for each group's rows
only, the restored positions by their clean values. Hooks live only inside context managers.

This module traces one prompt; the noise scale ν, the AIE over many facts and their per-model
caches are `trace`.
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.trace import KINDS
from rankone.core.hooks import map_output
from rankone.core.tokens import EditRequest, encode, join_target, token_span
from rankone.models.handle import ModelHandle
from rankone.models.generation import context_limit

Site = tuple[str, int]  # (module path, token position) whose clean output is put back


def default_window(n_layers: int) -> int:
    """MLP/attention restoration window: the paper's 10 of 48 layers (≈ n/4.8), at most 10.

    min(10, max(1, n_layers // 4)): 1 for a 4-layer testbed, 3 for 12 layers, 7 for 28, 10 for 48+.
    """
    return min(10, max(1, n_layers // 4))


def window_layers(center: int, window: int, n_layers: int) -> list[int]:
    """The layers restored for a window "centred" on `center` (the paper's code, also at the edges)."""
    return list(range(max(0, center - window // 2), min(n_layers, center - (-window // 2))))


@dataclass
class TraceSettings:
    n_samples: int = 10  # noise samples per restoration (one batch row each)
    noise_factor: float = 3.0  # ν = noise_factor × σ(subject embeddings)
    noise_scale: float | None = None  # an absolute ν instead (0 = no corruption at all)
    window: int | None = None  # None: default_window(n_layers)
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    seed: int = 0  # the noise generator's seed (CPU generator: same noise on every device)
    batch_rows: int = 128  # rows per forward pass; lower it for big models

    def __post_init__(self) -> None:
        if int(self.n_samples) < 1:
            raise RankoneError(f"the number of noise samples must be at least 1, got {self.n_samples}")
        if not float(self.noise_factor) >= 0 or (self.noise_scale is not None and not float(self.noise_scale) >= 0):
            raise RankoneError("the noise level must be zero or positive")
        if self.window is not None and int(self.window) < 1:
            raise RankoneError(f"the restoration window must be at least 1 layer, got {self.window}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise RankoneError(f"unknown trace kind(s) {bad}; choose from {', '.join(KINDS)}")
        if int(self.batch_rows) < 1:
            raise RankoneError("batch_rows must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TraceSettings":
        from rankone.methods.settings import strict_from_dict  # noqa: PLC0415

        return strict_from_dict(cls, d, "trace setting")


# ---- one prompt -----------------------------------------------------------------------------


@dataclass
class CaseTrace:
    """The trace of one fact. scores[kind][i][l] = p(answer) with `positions[i]` restored at l."""

    prompt: str  # the prompt text with the subject written in
    subject: str
    answer: str  # the expected answer (or the model's own prediction when none was given)
    answer_token: str  # the answer's first token, whose probability is read
    predicted: str  # the model's top next token on the clean prompt
    correct: bool  # predicted == answer_token; wrong cases are reported, not traced
    tokens: list[str]  # every prompt token, decoded
    subject_range: list[int]  # [first, last] token indices of the subject
    p_clean: float = 0.0
    p_corrupted: float = 0.0
    positions: list[int] = field(default_factory=list)  # token rows traced
    scores: dict[str, list[list[float]]] = field(default_factory=dict)  # [n_positions, n_layers]
    window: int = 1
    noise_scale: float = 0.0
    n_samples: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def indirect_effect(self, kind: str) -> torch.Tensor:
        return torch.tensor(self.scores[kind]) - self.p_corrupted  # [n_positions, n_layers]


def _prepare(tok: Any, prompt: str, subject: str, answer: str | None) -> tuple[str, list[int], tuple[int, int], int | None]:
    """Prompt text, its ids, the subject's token span [first, last] and the answer's first token id.

    With an answer, the prompt ids are the prefix of the tokenized "prompt answer" before the
    answer (exactly the teacher-forced reading of `generation.target_logprob`).
    """
    req = EditRequest.create(prompt, subject, answer or "x")
    text, s0, s1 = req.text()
    if answer is None:
        ids, offsets = encode(tok, text)
        return text, ids, token_span(tok, text, s0, s1, offsets), None
    full, t0 = join_target(text, req.target)
    ids, offsets = encode(tok, full)
    first, _ = token_span(tok, full, t0, len(full), offsets, what="answer")
    span = token_span(tok, full, s0, s1, offsets)
    if span[1] >= first:
        raise RankoneError(f"the answer overlaps the subject in {full!r}")
    return text, ids[:first], span, ids[first]


@torch.no_grad()
def trace_case(
    handle: ModelHandle, prompt: str, subject: str, answer: str | None,
    noise_scale: float, settings: TraceSettings | None = None, positions: str = "all",
    on_chunk: Callable[[int, int], None] | None = None,
) -> CaseTrace:
    """Trace one fact. positions: "all" prompt tokens (heatmaps) or "subject_last" (AIE).

    answer None: the model's own top prediction is traced (it is then correct by construction).
    A case the model gets wrong comes back with correct=False and no scores.
    """
    s = settings or TraceSettings()
    model, tok, spec = handle.model, handle.tokenizer, handle.spec
    n_layers = handle.n_layers
    window = s.window or default_window(n_layers)
    if positions not in ("all", "subject_last"):
        raise ValueError(f"positions must be 'all' or 'subject_last', not {positions!r}")
    text, ids, (sf, sl), answer_id = _prepare(tok, prompt, subject, answer)
    if len(ids) > context_limit(model):  # a case file's prompt longer than the context: refused (or skipped), not an IndexError
        raise RankoneError(f"the prompt {text[:60]!r}… is {len(ids)} tokens; the model reads at most {context_limit(model)}")
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)  # [1, pos]
    P = x.shape[1]

    paths = _paths(spec, n_layers, s.kinds)
    was_training = model.training
    model.eval()
    try:
        clean = _clean_run(model, x, sorted({p for ps in paths.values() for p in ps}))
        probs = clean.pop("probs")[0]  # [vocab]
        pred = int(probs.argmax())
        if answer_id is None:
            answer_id, answer = pred, tok.decode([pred]).strip()
        out = CaseTrace(
            prompt=text, subject=subject, answer=str(answer), answer_token=tok.decode([answer_id]),
            predicted=tok.decode([pred]), correct=pred == answer_id,
            tokens=[tok.decode([i]) for i in ids], subject_range=[sf, sl], p_clean=float(probs[answer_id]),
            window=window, noise_scale=float(noise_scale), n_samples=s.n_samples, seed=s.seed,
        )
        if not out.correct:
            return out
        rows = list(range(P)) if positions == "all" else [sl]
        groups: list[list[Site]] = [[]]  # group 0 restores nothing: the corrupted run
        index: list[tuple[str, int, int]] = []
        for kind in s.kinds:
            for i, t in enumerate(rows):
                for layer in range(n_layers):
                    groups.append(_sites(spec, kind, layer, t, window, n_layers))
                    index.append((kind, i, layer))
        noise = _noise(s, sl - sf + 1, clean[paths["embed"][0]].shape[-1], noise_scale)  # [S, n_subj, d]
        p = _run_groups(handle, x, (sf, sl), noise, clean, groups, answer_id, s.batch_rows, on_chunk)
    finally:
        model.train(was_training)
    out.p_corrupted = float(p[0])
    out.positions = rows
    out.scores = {k: [[0.0] * n_layers for _ in rows] for k in s.kinds}
    for (kind, i, layer), v in zip(index, p[1:].tolist()):
        out.scores[kind][i][layer] = v
    return out


def _clean_run(model: torch.nn.Module, x: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    """Next-token probabilities and a *copy* of each module's output, [pos, d] (OPT flattens).

    Copies, not views: some blocks add to a module's output in place after it returns (Falcon's
    `mlp_output += attention_output`), which would change a detached view.
    """
    P = x.shape[1]
    rec: dict[str, torch.Tensor] = {}

    def keep(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(h: torch.Tensor) -> torch.Tensor:
            rec[path] = h.detach().reshape(P, -1).clone()
            return h

        return fn

    with ExitStack() as stack:
        for p in paths:
            stack.enter_context(map_output(arch.get_module(model, p), keep(p)))
        rec["probs"] = _last_probs(model, x)
    return rec


def _paths(spec: arch.ArchSpec, n_layers: int, kinds: Sequence[str]) -> dict[str, list[str]]:
    return {"embed": [spec.embed],
            "hidden": [spec.layer_path(l) for l in range(n_layers)] if "hidden" in kinds else [],
            "mlp": [spec.mlp.format(l) for l in range(n_layers)] if "mlp" in kinds else [],
            "attn": [spec.attn.format(l) for l in range(n_layers)] if "attn" in kinds else []}


def _sites(spec: arch.ArchSpec, kind: str, layer: int, token: int, window: int, n_layers: int) -> list[Site]:
    if kind == "hidden":
        return [(spec.layer_path(layer), token)]
    template = spec.mlp if kind == "mlp" else spec.attn
    return [(template.format(j), token) for j in window_layers(layer, window, n_layers)]


def _noise(s: TraceSettings, n_tokens: int, d: int, scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(s.seed)
    return torch.randn(s.n_samples, n_tokens, d, generator=gen) * scale  # [S, n_subj, d]


def _last_probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax of the last position's logits, [batch, vocab] float32 (only that position's logits)."""
    kw: dict[str, Any] = {"input_ids": x, "attention_mask": torch.ones_like(x), "use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1
    return torch.softmax(model(**kw).logits[:, -1].float(), dim=-1)


def _run_groups(
    handle: ModelHandle, x: torch.Tensor, subject: tuple[int, int], noise: torch.Tensor,
    clean: dict[str, torch.Tensor], groups: list[list[Site]], answer_id: int, batch_rows: int,
    on_chunk: Callable[[int, int], None] | None,
) -> torch.Tensor:
    """Mean p(answer) over the noise samples for each group of restorations: [n_groups]."""
    S = noise.shape[0]
    per = max(1, batch_rows // S)  # groups per forward pass
    model, spec = handle.model, handle.spec
    out = []
    chunks = [groups[i:i + per] for i in range(0, len(groups), per)]
    for c, chunk in enumerate(chunks):
        B, P = len(chunk) * S, x.shape[1]
        by_path: dict[str, tuple[list[int], list[int]]] = {}
        for g, sites in enumerate(chunk):
            for path, t in sites:
                r, q = by_path.setdefault(path, ([], []))
                r.extend(range(g * S, (g + 1) * S))
                q.extend([t] * S)
        with ExitStack() as stack:
            stack.enter_context(map_output(arch.get_module(model, spec.embed), _corrupt(subject, noise, len(chunk))))
            for path, (r, q) in by_path.items():
                stack.enter_context(map_output(arch.get_module(model, path), _restore(clean[path], r, q, B, P)))
            probs = _last_probs(model, x.expand(B, -1))  # [B, vocab]
            if on_chunk is not None:
                on_chunk(c, len(chunks))
        out.append(probs[:, answer_id].reshape(len(chunk), S).mean(1).cpu())
    return torch.cat(out)


def _corrupt(subject: tuple[int, int], noise: torch.Tensor, n_groups: int) -> Callable[[torch.Tensor], torch.Tensor]:
    first, last = subject

    def fn(e: torch.Tensor) -> torch.Tensor:  # e: [B, pos, d] token embeddings
        e = e.clone()
        e[:, first:last + 1] += noise.repeat(n_groups, 1, 1).to(e.device, e.dtype)
        return e

    return fn


def _restore(clean: torch.Tensor, rows: list[int], pos: list[int], B: int, P: int) -> Callable[[torch.Tensor], torch.Tensor]:
    r, q = torch.tensor(rows), torch.tensor(pos)

    def fn(h: torch.Tensor) -> torch.Tensor:  # h: [B, pos, d] (or [B·pos, d])
        h3 = h.reshape(B, P, -1).clone()
        h3[r.to(h.device), q.to(h.device)] = clean[q].to(h.device, h.dtype)
        return h3.reshape(h.shape)

    return fn


@torch.no_grad()
def corrupted_probs(
    handle: ModelHandle, ids: list[int], spans: Sequence[tuple[int, int]], token_ids: Sequence[int], noise_scale: float,
    settings: TraceSettings | None = None,
) -> torch.Tensor:
    """p(token) at the last position for each of `token_ids`, with each token span [first, last]
    corrupted in turn: the corrupted run of `trace_case` (the same seeded noise for a span of the
    same length), without restorations, for many spans at once. Mean over `n_samples` noise
    draws per span: [n_spans, n_token_ids]."""
    s = settings or TraceSettings()
    model, spec = handle.model, handle.spec
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)  # [1, pos]
    P, S = x.shape[1], s.n_samples
    d = int(arch.get_module(model, spec.embed).weight.shape[-1])
    per = max(1, s.batch_rows // S)  # spans per forward pass
    out: list[torch.Tensor] = []
    sel = torch.tensor(list(token_ids))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(spans), per):
            chunk = spans[i:i + per]
            add = torch.zeros(len(chunk) * S, P, d)  # [rows, pos, d]: the noise, on each span's tokens only
            for g, (first, last) in enumerate(chunk):
                add[g * S:(g + 1) * S, first:last + 1] = _noise(s, last - first + 1, d, noise_scale)
            noise = add.to(dev)

            def fn(e: torch.Tensor, noise: torch.Tensor = noise) -> torch.Tensor:  # e: [rows, pos, d]
                return e + noise.to(e.dtype)

            with map_output(arch.get_module(model, spec.embed), fn):
                probs = _last_probs(model, x.expand(len(chunk) * S, -1))  # [rows, vocab]
            out.append(probs[:, sel.to(probs.device)].reshape(len(chunk), S, -1).mean(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, len(sel))
