"""Greedy decoding and teacher-forced target probabilities: the two ways rankone reads a model."""

from __future__ import annotations

import re
from typing import Any

import torch

from rankone.core.errors import RankoneError
from rankone.core.tokens import encode, join_target, token_span


def context_limit(model: torch.nn.Module) -> int:
    """How many positions the model reads (its context window)."""
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 20)


def check_fits(model: torch.nn.Module, tok: Any, text: str, extra_tokens: int = 0, what: str = "the prompt") -> None:
    """Refuse text that is empty or, with `extra_tokens` more, longer than the model's context window."""
    if not text.strip():
        raise RankoneError(f"{what} is empty; give some text, e.g. --prompt 'The capital of France is'")
    n, limit = len(encode(tok, text)[0]), context_limit(model)
    if n + extra_tokens > limit:
        more = f" (+{extra_tokens} that rankone adds)" if extra_tokens else ""
        raise RankoneError(f"{what} is {n} tokens{more}; the model reads at most {limit} positions: shorten it")


@torch.no_grad()
def greedy(model: torch.nn.Module, tok: Any, prompt: str, max_new_tokens: int = 10) -> str:
    """The greedy continuation of `prompt` (text after the prompt only)."""
    ids = torch.tensor([encode(tok, prompt)[0]], device=next(model.parameters()).device)
    n0 = ids.shape[1]
    limit = context_limit(model)
    for _ in range(max_new_tokens):
        if ids.shape[1] >= limit:
            break
        nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
        if tok.eos_token_id is not None and int(nxt) == tok.eos_token_id:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(ids[0, n0:].tolist(), skip_special_tokens=True)


@torch.no_grad()
def target_logprob(model: torch.nn.Module, tok: Any, prompt: str, target: str) -> float:
    """log p(target | prompt), summed over the target's tokens (teacher forced)."""
    full, t0 = join_target(prompt, target)
    ids, offsets = encode(tok, full)
    first, last = token_span(tok, full, t0, len(full), offsets, what="target")
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].float(), dim=-1)
    return float(sum(logp[p - 1, ids[p]] for p in range(first, last + 1)))


def says(text: str, target: str, anywhere: bool = False) -> bool:
    """The one rule for "the model said the target": the target as whole words, ignoring case and
    spacing ("Rome" in "rome, Italy", not in "Romeo"; "New York" in "new  York"), at the start of
    the continuation (its answer: an edit's outcome, a gate's target check, the demo) or, with
    anywhere=True, anywhere in it (generation-based success, which reads a longer continuation)."""
    parts = target.split()
    if not parts:
        return False
    words = r"\s+".join(map(re.escape, parts)) + r"(?!\w)"
    return re.search((r"(?<!\w)" if anywhere else r"^\s*") + words, text, re.I) is not None


def first_word(text: str) -> str:
    """The first word of a continuation, without punctuation: how a one-word answer is read."""
    words = text.strip().split()
    return words[0].strip(".,;:!?\"'") if words else ""


@torch.no_grad()
def perplexity(model: torch.nn.Module, tok: Any, text: str, window: int = 256, max_tokens: int = 50_000) -> float:
    """exp(mean next-token NLL) over `text`, in non-overlapping windows of at most `window` tokens."""
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    window = min(window, context_limit(model))
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, max(1, len(ids) - 1), window):
        chunk = ids[i:i + window]
        if len(chunk) < 2:
            break
        x = torch.tensor([chunk], device=dev)
        logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0, :-1].float(), dim=-1)
        total -= float(logp.gather(1, x[0, 1:, None]).sum())
        count += len(chunk) - 1
    if count == 0:
        raise ValueError("text too short for perplexity")
    return float(torch.exp(torch.tensor(total / count)))
