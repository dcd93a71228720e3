"""Finding the subject of a reported prompt: the span whose corruption most lowers the answer.

A report without a subject gives only its prompt. The subject is the entity the model's answer
is *about*, and causal tracing's corruption tells which one it reads (Meng et al. 2022, §2):
Gaussian noise ε ~ N(0, ν²) added to the token embeddings of a span, ν = factor · σ (σ: the std
of the embedding matrix), lowers p(answer) most when the span is what the answer is retrieved
from.

    candidates  every run of 1..subject_max_words whole words that neither starts nor ends with a
                function word ("the", "of", "was", ...), the prompt's last word excluded (a fact's
                prompt ends in its relation: "... was born in")
    drop(span)  p_clean(answer) − p_corrupted(answer), the answer being the model's current top token
    chosen      the span of fewest words whose drop is ≥ 95 % of the largest drop (a longer span
                containing it drops about as much: the noise hides more)
    ambiguous   another span, neither inside the chosen one nor containing it and of no more
                words, drops ≥ subject_ambiguity × as much: two entities could be the subject, so
                none is chosen
    unfindable  the model gives no answer with p ≥ subject_min_p, or the largest drop is below
                subject_min_drop × p_clean: no span carries the answer

Ambiguous and unfindable prompts are logged and skipped, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.tokens import encode, token_span
from rankone.models.handle import ModelHandle
from rankone.trace.runs import TraceSettings, corrupted_probs

CLOSE_TO_BEST = 0.95
_EDGE = "\"'“”‘’()[]{},;:!?."
# Words a subject does not start or end with (it may hold them inside: "Bank of America").
FUNCTION_WORDS = frozenset(
    "a an the of in on at by for to from with and or but nor as is was were are be been being am has have had do does "
    "did who whom whose which that this these those what where when why how it its he she his her him they them their "
    "there here not no so than then also very".split())


@dataclass
class SubjectFinding:
    prompt: str
    status: str  # found | ambiguous | unfindable
    subject: str | None
    answer: str  # the model's current answer token, whose probability the corruption lowers
    p_clean: float
    candidates: list[dict[str, Any]] = field(default_factory=list)  # the strongest spans: text, tokens, drop
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "status": self.status, "subject": self.subject, "answer": self.answer,
                "p_clean": round(self.p_clean, 6), "candidates": self.candidates, "reason": self.reason}


def words(prompt: str) -> list[tuple[int, int]]:
    """Character spans of the prompt's words, without edge punctuation or a possessive 's."""
    out = []
    for m in re.finditer(r"\S+", prompt):
        s, e = m.start(), m.end()
        while s < e and prompt[s] in _EDGE:
            s += 1
        while e > s and prompt[e - 1] in _EDGE:
            e -= 1
        for suffix in ("'s", "’s"):
            if prompt[s:e].endswith(suffix) and e - s > len(suffix):
                e -= len(suffix)
        if e > s:
            out.append((s, e))
    return out


def embedding_sigma(handle: ModelHandle) -> float:
    """σ of every element of the token embedding matrix."""
    return float(arch.get_module(handle.model, handle.spec.embed).weight.detach().float().std())


@torch.no_grad()
def find_subject(handle: ModelHandle, prompt: str, max_words: int = 5, min_drop: float = 0.3, ambiguity: float = 0.5,
                 noise_samples: int = 10, noise_factor: float = 3.0, min_p: float = 0.1, seed: int = 0) -> SubjectFinding:
    tok, model = handle.tokenizer, handle.model
    ids, offsets = encode(tok, prompt)
    x = torch.tensor([ids], device=next(model.parameters()).device)
    probs = torch.softmax(model(input_ids=x, use_cache=False).logits[0, -1].float(), -1)  # [vocab]
    answer_id = int(probs.argmax())
    p_clean = float(probs[answer_id])
    answer = tok.decode([answer_id])
    if p_clean < min_p:
        return SubjectFinding(prompt, "unfindable", None, answer, p_clean, [],
                              f"the model has no clear answer to trace (p({answer.strip()!r}) = {p_clean:.3f} < {min_p})")
    ws = words(prompt)[:-1]  # never the last word
    edge = [prompt[s:e].casefold() not in FUNCTION_WORDS for s, e in ws]
    cands: dict[tuple[int, int], tuple[int, int, int]] = {}  # token span -> (first char, end char, words)
    for i in range(len(ws)):
        for j in range(i, min(len(ws), i + max_words)):
            if not (edge[i] and edge[j]):
                continue
            try:
                span = token_span(tok, prompt, ws[i][0], ws[j][1], offsets)
            except RankoneError:
                continue  # a word edge inside a token: not a span the model reads as such
            cands.setdefault(span, (ws[i][0], ws[j][1], j - i + 1))
    if not cands:
        return SubjectFinding(prompt, "unfindable", None, answer, p_clean, [],
                              "the prompt has no word (other than function words) before its last")
    spans = list(cands)
    settings = TraceSettings(n_samples=noise_samples, seed=seed, kinds=["hidden"])
    p = corrupted_probs(handle, ids, spans, [answer_id], noise_factor * embedding_sigma(handle), settings)[:, 0].tolist()
    rows = [{"text": prompt[cands[s][0]:cands[s][1]], "tokens": list(s), "n_words": cands[s][2],
             "drop": round(p_clean - q, 6)} for s, q in zip(spans, p)]
    rows.sort(key=lambda r: (-r["drop"], r["n_words"]))
    best = rows[0]["drop"]
    top = rows[:8]
    if best < min_drop * p_clean:
        return SubjectFinding(prompt, "unfindable", None, answer, p_clean, top,
                              f"no span lowers p({answer.strip()!r}) by {min_drop:.0%} of its {p_clean:.3f} "
                              f"(best {best:.3f}, {rows[0]['text']!r})")
    near = [r for r in rows if r["drop"] >= CLOSE_TO_BEST * best]
    chosen = min(near, key=lambda r: (r["n_words"], -r["drop"]))
    c0, c1 = chosen["tokens"]

    def nested(r: dict[str, Any]) -> bool:
        a, b = r["tokens"]
        return (c0 <= a and b <= c1) or (a <= c0 and c1 <= b)

    rivals = [r for r in rows if not nested(r) and r["n_words"] <= chosen["n_words"]]
    if rivals and rivals[0]["drop"] >= ambiguity * chosen["drop"]:
        r = rivals[0]
        return SubjectFinding(prompt, "ambiguous", None, answer, p_clean, top,
                              f"{chosen['text']!r} and {r['text']!r} both carry the answer (drops {chosen['drop']:.3f} "
                              f"and {r['drop']:.3f})")
    return SubjectFinding(prompt, "found", chosen["text"], answer, p_clean, top,
                          f"corrupting {chosen['text']!r} lowers p({answer.strip()!r}) from {p_clean:.3f} by "
                          f"{chosen['drop']:.3f}" + (f"; the best other span {rivals[0]['text']!r} by "
                                                     f"{rivals[0]['drop']:.3f}" if rivals else ""))
