"""Greedy decoding and teacher-forced target probabilities: the two ways rankone reads a model."""

from __future__ import annotations

from typing import Any

import torch

from rankone.core.tokens import encode, join_target, token_span


@torch.no_grad()
def greedy(model: torch.nn.Module, tok: Any, prompt: str, max_new_tokens: int = 10) -> str:
    """The greedy continuation of `prompt` (text after the prompt only)."""
    ids = torch.tensor([encode(tok, prompt)[0]], device=next(model.parameters()).device)
    n0 = ids.shape[1]
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1 << 30)
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


def first_word(text: str) -> str:
    """The first word of a continuation, without punctuation: how a one-word answer is read."""
    words = text.strip().split()
    return words[0].strip(".,;:!?\"'") if words else ""


@torch.no_grad()
def perplexity(model: torch.nn.Module, tok: Any, text: str, window: int = 256, max_tokens: int = 50_000) -> float:
    """exp(mean next-token NLL) over `text`, in non-overlapping windows of at most `window` tokens."""
    ids = tok(text, add_special_tokens=False, verbose=False)["input_ids"][:max_tokens]
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", window)
    window = min(window, limit)
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
