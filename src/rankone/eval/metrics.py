"""The metrics of the ROME and r-ROME papers, per case and summarised.

Probabilities are teacher-forced over *all* target tokens. Two normalisations:

* ``norm="mean"`` (default, as ROME's CounterFact code): p = exp(mean log-prob per target
  token), i.e. the per-token geometric mean. Comparisons p(new) > p(true) and the magnitudes
  EM = E[p(new) − p(true)] use it (ROME's summarize.py: exp(−NLL_new) − exp(−NLL_true)).
* ``norm="sum"``: p = exp(Σ log-prob), the probability of the whole target string, as
  `rankone.models.generation.target_logprob` gives it.

Per case: ES = 1[p(new) > p(true)] on the edit prompt, EM = p(new) − p(true); PS/PM the same
averaged over the paraphrase prompts; NS = mean 1[p(true_nb) > p(new)] over neighbour prompts,
NM = mean p(true_nb) − p(new). The summary averages over cases and S = harmonic mean of ES, PS,
NS. Fluency is ROME's generation entropy: the weighted mean of bigram (2/3) and trigram (4/3)
entropies, in bits, of the generated words. Generation-based success (`generation_success`): the
greedy continuation, not cut to the target's length, states the target as whole words.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from rankone.eval.cases import KNOWN_RULES, Case
from rankone.core.errors import RankoneError
from rankone.core.util import mean
from rankone.core.progress import Progress, track
from rankone.models.generation import context_limit, says
from rankone.core.tokens import encode, join_target, kv_cache_kwargs, kv_cache_of, token_span

NORMS = ("mean", "sum")


# ---- teacher-forced scoring -----------------------------------------------------------------


@dataclass
class Scored:
    """One (prompt, target) pair read by the model with the target teacher-forced."""

    logprob: float  # Σ log p over the target tokens
    n_tokens: int
    top1: bool  # argmax reproduces every target token (= greedy decoding yields the target)
    first_ok: bool  # argmax at the first target position is the target's first token

    def p(self, norm: str = "mean") -> float:
        return math.exp(self.logprob / self.n_tokens if norm == "mean" else self.logprob)


def _encode_pair(tok: Any, prompt: str, target: str, limit: int) -> tuple[list[int], int, int]:
    """ids of prompt + ' ' + target and the target's token span [first, last], left-truncated to `limit`."""
    full, t0 = join_target(prompt, target)
    ids, offsets = encode(tok, full)
    first, last = token_span(tok, full, t0, len(full), offsets, what="target")
    if first == 0:
        raise RankoneError(f"the target {target!r} starts the text {full!r}: there is no prompt to predict it from")
    over = len(ids) - limit
    if over > 0:
        lead = 0  # keep leading special tokens (BOS): they have empty character spans
        while lead < len(offsets) and offsets[lead][1] <= offsets[lead][0]:
            lead += 1
        if first - lead - over < 1:
            raise RankoneError(f"the target {target!r} alone is longer than the model's {limit} positions")
        ids = ids[:lead] + ids[lead + over:]
        first, last = first - over, last - over
    return ids, first, last


@torch.no_grad()
def score(model: torch.nn.Module, tok: Any, pairs: Sequence[tuple[str, str]], batch_size: int = 64,
          on_batch: Callable[[int], None] | None = None) -> list[Scored]:
    """Teacher-forced log-probabilities of many (prompt, target) pairs, batched by length.
    `on_batch(n)` is called after each batch with the number of pairs it scored (for progress)."""
    limit = context_limit(model)
    enc = [_encode_pair(tok, p, t, limit) for p, t in pairs]
    dev = next(model.parameters()).device
    out: list[Scored | None] = [None] * len(enc)
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        n = max(len(enc[i][0]) for i in idx)
        ids = torch.zeros(len(idx), n, dtype=torch.long)
        mask = torch.zeros(len(idx), n, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(enc[i][0])] = torch.tensor(enc[i][0])
            mask[r, :len(enc[i][0])] = 1
        # Right padding: every position read below lies before the row's padding.
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.float()
        logp = torch.log_softmax(logits, dim=-1).cpu()  # [batch, pos, vocab]
        for r, i in enumerate(idx):
            seq, first, last = enc[i]
            pos = torch.arange(first, last + 1)
            tgt = torch.tensor(seq[first:last + 1])
            lp = logp[r, pos - 1, tgt]  # [n_target_tokens]; the logit at p-1 predicts token p
            am = logp[r, pos - 1].argmax(-1)
            out[i] = Scored(float(lp.sum()), len(pos), bool((am == tgt).all()), bool(am[0] == tgt[0]))
        if on_batch is not None:
            on_batch(len(idx))
    return out  # type: ignore[return-value]


def knows(model: torch.nn.Module, tok: Any, cases: Sequence[Case], batch_size: int = 64, rule: str = "greedy") -> list[bool]:
    """Does the model know each case's *true* target on the edit prompt? rule "greedy": it is the
    greedy answer (first token); "over-new": P(true) > P(new) (per-token mean, the CounterFact
    papers' "known" cases: the edit has something to overturn)."""
    if rule == "greedy":
        return [s.first_ok for s in score(model, tok, [(c.prompt, c.target_true) for c in cases], batch_size)]
    if rule != "over-new":
        raise RankoneError(f"unknown rule {rule!r} for known facts; choose {' or '.join(KNOWN_RULES)}")
    sc = score(model, tok, [x for c in cases for x in ((c.prompt, c.target_true), (c.prompt, c.target_new))], batch_size)
    return [sc[i].p() > sc[i + 1].p() for i in range(0, len(sc), 2)]


# ---- the CounterFact metrics ----------------------------------------------------------------


def _mean(xs: Iterable[float]) -> float:
    m = mean(xs)
    return float("nan") if m is None else m  # the metrics' convention: NaN, not None, when empty


def hmean(xs: Sequence[float]) -> float:
    """Harmonic mean (0 when any is 0, NaN when any is NaN): the papers' score S."""
    if any(math.isnan(x) for x in xs):
        return float("nan")
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


def _pairs_of(case: Case) -> list[tuple[str, str]]:
    """The (prompt, target) pairs a case is scored on, in a fixed order (see case_metrics)."""
    new, true = case.target_new, case.target_true
    out = [(case.prompt, new), (case.prompt, true)]
    for p in case.paraphrase_prompts:
        out += [(p, new), (p, true)]
    for p, t in case.neighbours():
        out += [(p, new), (p, t)]
    return out


def case_metrics(case: Case, scored: Sequence[Scored], norm: str = "mean") -> dict[str, Any]:
    """ES/EM, PS/PM, NS/NM of one case from its scored pairs (in `_pairs_of` order)."""
    if norm not in NORMS:
        raise RankoneError(f"norm must be one of {NORMS}, not {norm!r}")
    p = [s.p(norm) for s in scored]
    n_par = len(case.paraphrase_prompts)
    par = list(zip(p[2:2 + 2 * n_par:2], p[3:2 + 2 * n_par:2]))  # (p_new, p_true) per paraphrase
    nb = list(zip(p[2 + 2 * n_par::2], p[3 + 2 * n_par::2]))  # (p_new, p_true_nb) per neighbour
    return {
        "case_id": case.case_id,
        "p_new": p[0], "p_true": p[1],
        "es": float(p[0] > p[1]), "em": p[0] - p[1],
        "top1_new": float(scored[0].top1), "top1_true": float(scored[1].top1),
        "ps": _mean(float(a > b) for a, b in par), "pm": _mean(a - b for a, b in par),
        "paraphrase_top1": _mean(float(scored[2 + 2 * j].top1) for j in range(n_par)),
        "ns": _mean(float(t > a) for a, t in nb), "nm": _mean(t - a for a, t in nb),
    }


def evaluate_cases(model: torch.nn.Module, tok: Any, cases: Sequence[Case], norm: str = "mean",
                   batch_size: int = 64, desc: str = "") -> list[dict[str, Any]]:
    """Per-case metrics on the model as it is now (all cases scored in one batched pass).
    With `desc`, a progress display (see core.progress) counts the scored prompts."""
    pairs = [_pairs_of(c) for c in cases]
    flat_pairs = [x for ps in pairs for x in ps]
    with Progress(len(flat_pairs), desc, "prompts", enabled=bool(desc)) as bar:
        flat = score(model, tok, flat_pairs, batch_size, on_batch=bar.update)
    out, i = [], 0
    for c, ps in zip(cases, pairs):
        out.append(case_metrics(c, flat[i:i + len(ps)], norm))
        i += len(ps)
    return out


SUMMARY_KEYS = ("es", "em", "ps", "pm", "ns", "nm", "top1_new", "paraphrase_top1")


def summarize(per_case: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Means over cases, and S = harmonic mean of ES, PS, NS."""
    s = {k: _mean(m[k] for m in per_case) for k in SUMMARY_KEYS}
    s["score"] = hmean([s["es"], s["ps"], s["ns"]])
    for k in ("fluency", "delta_fro"):
        if any(k in m for m in per_case):
            s[k] = _mean(m.get(k, float("nan")) for m in per_case)
    s["n"] = len(per_case)
    return s


# ---- fluency --------------------------------------------------------------------------------

_WORD = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


def words(text: str) -> list[str]:
    """Word tokens (words, and punctuation marks on their own), like nltk.word_tokenize."""
    return _WORD.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's generation entropy: mean over n of weight_n · H(n-gram frequencies) in bits."""
    w = words(text)
    hs = []
    for n, wt in zip(ns, weights):
        grams = Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        hs.append(wt * h)
    return sum(hs) / len(hs)


@torch.no_grad()
def continuation_ids(model: torch.nn.Module, tok: Any, prompt: str, max_new_tokens: int = 50, top_k: int = 5,
                     seed: int = 0) -> list[int]:
    """The tokens sampled after the prompt from the top-k tokens with a seeded generator (top_k=1:
    greedy), special tokens included: what the user would see, and what `degenerate` reads."""
    dev = next(model.parameters()).device
    ids = torch.tensor([encode(tok, prompt)[0]], device=dev)
    gen = torch.Generator().manual_seed(seed)
    limit = context_limit(model)
    out = model(input_ids=ids, use_cache=True)
    new: list[int] = []
    for _ in range(max_new_tokens):
        if ids.shape[1] + len(new) >= limit:
            break
        logits = out.logits[0, -1].float().cpu()
        top = torch.topk(logits, min(top_k, logits.shape[-1]))
        nxt = int(top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)]) if top_k > 1 \
            else int(top.indices[0])
        if tok.eos_token_id is not None and nxt == tok.eos_token_id:
            break
        new.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]], device=dev), **kv_cache_kwargs(model, kv_cache_of(out)), use_cache=True)
    return new


@torch.no_grad()
def continuations(model: torch.nn.Module, tok: Any, prompts: Sequence[str], max_new_tokens: int = 20, top_k: int = 1,
                  seed: int = 0) -> list[list[int]]:
    """The continuation of each prompt (special tokens kept, cut at EOS), all in one left-padded
    batch: greedy (top_k=1) gives what `continuation_ids(..., top_k=1)` gives each prompt alone,
    for a fraction of the time (equal up to float summation order, which can flip a near tie);
    top_k > 1 samples from the top-k tokens, seeded (the same prompts and seed, the same texts)."""
    if not prompts:
        return []
    dev = next(model.parameters()).device
    seqs = [encode(tok, p)[0] for p in prompts]
    width = max(map(len, seqs))
    n_new = max(0, min(max_new_tokens, context_limit(model) - width))
    if n_new == 0:
        return [[] for _ in prompts]
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    ids = torch.tensor([[pad] * (width - len(q)) + q for q in seqs], device=dev)
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in seqs], device=dev)
    how = dict(do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0) if top_k > 1 else \
        dict(do_sample=False, top_k=None, top_p=None, temperature=None)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=0, num_beams=1,
                             pad_token_id=pad, eos_token_id=eos, **how)
    return [r[: r.index(eos)] if eos is not None and eos in r else r for r in out[:, width:].tolist()]


def generate(model: torch.nn.Module, tok: Any, prompt: str, max_new_tokens: int = 50, top_k: int = 5,
             seed: int = 0) -> str:
    """prompt + continuation, sampled from the top-k tokens with a seeded generator (top_k=1: greedy)."""
    return prompt + tok.decode(continuation_ids(model, tok, prompt, max_new_tokens, top_k, seed), skip_special_tokens=True)


def degenerate(tok: Any, ids: Sequence[int], run: int = 4) -> bool:
    """Is a continuation degenerate: a special token in it (e.g. Gemma 3's `<start_of_image>`, which
    decoding with skip_special_tokens hides) or one token `run` times in a row?"""
    special = set(getattr(tok, "all_special_ids", []) or [])
    if any(i in special for i in ids):
        return True
    return any(len(set(ids[j:j + run])) == 1 for j in range(len(ids) - run + 1))


def generation_success(model: torch.nn.Module, tok: Any, prompt: str, target: str, max_new_tokens: int = 20) -> bool:
    """Generation-based success: the greedy continuation of the prompt (max_new_tokens, not cut to
    the target's length) states the target as whole words, case-insensitively. It counts what a
    user reads, where teacher-forced ES only compares two probabilities."""
    return says(generate(model, tok, prompt, max_new_tokens, top_k=1)[len(prompt):], target, anywhere=True)


def fluency(model: torch.nn.Module, tok: Any, prompts: Sequence[str], max_new_tokens: int = 50, top_k: int = 5,
            seed: int = 0) -> tuple[float, list[str]]:
    """Mean generation entropy over the prompts (sampled from the top-k tokens in one seeded batch), and the texts."""
    new = continuations(model, tok, prompts, max_new_tokens, top_k, seed)
    texts = [p + tok.decode(x, skip_special_tokens=True) for p, x in zip(prompts, new)]
    return _mean(ngram_entropy(t) for t in texts), texts


# ---- single edits ---------------------------------------------------------------------------


def evaluate_single_edits(handle: Any, cases: Sequence[Case], settings: Any,
                          stats_corpus: Any = None, norm: str = "mean", gen_tokens: int = 50,
                          progress: bool = True, on_result: Any = None) -> list[dict[str, Any]]:
    """Each case edited alone on the base model, measured, then reverted exactly (the papers' protocol).

    Per case: the metrics after the edit, fluency of its generation prompts (0 tokens: skipped),
    ‖Δ‖_F, the update's denominators and the seconds the edit took; `on_result(metrics)` is
    called after each case.
    """
    from rankone.edit.editor import Editor
    from rankone.artifacts.patch import revert_patch

    ed = Editor(handle, settings, stats_corpus, progress=progress)
    model, tok = ed.model, ed.tok
    out = []
    for c in track(cases, f"single edits ({ed.settings.method})", "edits", enabled=progress):
        t0 = time.perf_counter()
        patch = ed.edit([c.request], keep=True)
        t_edit = time.perf_counter() - t0
        try:
            m = evaluate_cases(model, tok, [c], norm)[0]
            if gen_tokens > 0:
                m["fluency"] = fluency(model, tok, c.generation_prompts, gen_tokens)[0]
        finally:
            revert_patch(model, patch)
        e = patch.edits[0]
        m["delta_fro"] = e.delta_fro
        m.update({k: e.diagnostics.get(k) for k in ("denominator", "denom_mean_mean", "denom_bare_bare",
                                                     "denom_bare_mean", "key_cosine", "weight_fro")})
        m["value_prob"] = e.diagnostics.get("value", {}).get("target_prob")
        m["clamped"] = e.diagnostics.get("value", {}).get("clamped")
        m["edit_seconds"] = t_edit
        out.append(m)
        if on_result is not None:  # e.g. append to a file, so that a long benchmark can resume
            on_result(m)
    return out


def alignable(model: torch.nn.Module, tok: Any, cases: Sequence[Case]) -> tuple[list[Case], list[str]]:
    """The cases whose request and every scored prompt align with the tokenizer, and why others do not."""
    from rankone.core.tokens import encode_request

    ok, why = [], []
    limit = context_limit(model)
    for c in cases:
        try:
            encode_request(tok, c.request)
            for p, t in _pairs_of(c):
                _encode_pair(tok, p, t, limit)
            ok.append(c)
        except RankoneError as e:
            why.append(f"case {c.case_id}: {e}")
    return ok, why


def generation_scores(model: Any, tok: Any, cases: Sequence[Case], max_new_tokens: int) -> tuple[float, float | None]:
    """Generation-based success of edited cases: the share whose greedy continuation of the prompt
    (one batch, not cut to the target's length) states the new target; likewise for each case's
    first paraphrase (None when no case has one)."""
    para = [c for c in cases if c.paraphrase_prompts]
    prompts = [c.prompt for c in cases] + [c.paraphrase_prompts[0] for c in para]
    texts = [tok.decode(x, skip_special_tokens=True) for x in continuations(model, tok, prompts, max_new_tokens)]
    hit = [says(t, c.target_new, anywhere=True) for t, c in zip(texts, cases + para)]
    return mean(hit[:len(cases)]), (mean(hit[len(cases):]) if para else None)
