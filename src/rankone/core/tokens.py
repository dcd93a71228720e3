"""Prompts, subjects and targets as token positions, found through character offsets.

Tokenizers differ (a BOS token or none; " Paris" vs "Paris"; a subject tokenizes differently at
the start of a text and after a space), so nothing here assumes GPT-2's habits: every position
is found by mapping character spans onto the offsets the tokenizer itself reports for the whole
text. Bad alignment is a `RankoneError`, never a silently wrong position.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from rankone.core.errors import RankoneError
from rankone.core.progress import Progress

PREFIX_STARTS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: `prompt` holds `{}` where the subject goes; `target` is the new object."""

    prompt: str
    subject: str
    target: str

    @classmethod
    def create(cls, prompt: str, subject: str, target: str) -> "EditRequest":
        if not isinstance(subject, str) or not subject.strip():
            raise RankoneError("the subject is empty: give the entity whose fact changes, e.g. --subject 'Paris'")
        if not isinstance(target, str) or not target.strip():
            raise RankoneError("the target is empty: give the new object, e.g. --target 'Rome'")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RankoneError("the prompt is empty: give e.g. --prompt '{} is the capital of'")
        n = prompt.count("{}")
        if n > 1:
            raise RankoneError(f"the prompt {prompt!r} has {n} '{{}}' placeholders; use exactly one")
        if n == 0:
            if subject not in prompt:
                raise RankoneError(
                    f"the prompt {prompt!r} contains neither '{{}}' nor the subject {subject!r}; "
                    "write the subject into the prompt or mark its place with {}"
                )
            if prompt.count(subject) > 1:
                raise RankoneError(f"the subject {subject!r} appears {prompt.count(subject)} times in the prompt {prompt!r}; "
                                   "mark the one to edit with {}")
            i = prompt.index(subject)
            prompt = prompt[:i] + "{}" + prompt[i + len(subject):]
        if prompt.rstrip() != prompt:
            prompt = prompt.rstrip()  # the target is joined with one space; trailing blanks would double it
        return cls(prompt=prompt, subject=subject, target=target.strip())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditRequest":
        """A request from JSON: exactly the fields prompt, subject and target, each a string (a typo
        in a field name or a number for a target is refused, never ignored or converted)."""
        fields = ("prompt", "subject", "target")
        if not isinstance(d, dict):
            raise RankoneError(f"an edit request is an object with {', '.join(fields)}, not {type(d).__name__}")
        missing = [k for k in fields if k not in d]
        if missing:
            raise RankoneError(f"edit request {d!r} lacks the field(s) {missing}; each needs prompt, subject, target")
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise RankoneError(f"edit request has unknown field(s) {unknown}; a request has exactly {', '.join(fields)}")
        for k in fields:
            if not isinstance(d[k], str):
                raise RankoneError(f"the {k} of an edit request must be a string, not {json.dumps(d[k])}")
        return cls.create(d["prompt"], d["subject"], d["target"])

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def text(self, template: str = "{}") -> tuple[str, int, int]:
        """The prompt inside a context template, and the subject's character span in it."""
        prompt = template.replace("{}", self.prompt, 1) if "{}" in template else template + self.prompt
        start = prompt.index("{}")
        return prompt.replace("{}", self.subject, 1), start, start + len(self.subject)


def join_target(prompt_text: str, target: str) -> tuple[str, int]:
    """prompt + ' ' + target, and the character where the target starts."""
    sep = "" if (prompt_text[-1:].isspace() or target[:1].isspace()) else " "
    return prompt_text + sep + target, len(prompt_text) + len(sep)


# ---- offsets ------------------------------------------------------------------------------


def encode(tok: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids (with the tokenizer's own special tokens) and each token's character span."""
    if not getattr(tok, "is_fast", False):
        raise RankoneError(
            f"tokenizer {type(tok).__name__} is a slow (Python) tokenizer without character "
            "offsets; save the model with a fast tokenizer (tokenizer.json) and retry"
        )
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _trimmed(text: str, span: tuple[int, int]) -> tuple[int, int]:
    # Some tokenizers report " Paris" as (s-1, e), others as (s, e): strip blanks either way.
    s, e = span
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def token_span(
    tok: Any, text: str, start: int, end: int, offsets: list[tuple[int, int]] | None = None,
    what: str = "subject",
) -> tuple[int, int]:
    """Indices [first, last] of the tokens that exactly cover text[start:end]."""
    if offsets is None:
        _, offsets = encode(tok, text)
    first = last = None
    for i, span in enumerate(offsets):
        s, e = _trimmed(text, span)
        if e <= s:
            continue  # special token (BOS) or pure whitespace
        if s < end and e > start:
            first = i if first is None else first
            last = i
            if s < start or e > end:
                piece = text[s:e]
                raise RankoneError(
                    f"the {what} {text[start:end]!r} does not fall on token boundaries in "
                    f"{text!r}: token {piece!r} crosses its edge; rephrase the prompt so the "
                    f"{what} is a separate word"
                )
    if first is None or last is None:
        raise RankoneError(f"the {what} {text[start:end]!r} covers no token in {text!r}")
    return first, last


@dataclass
class Encoded:
    """One text ready for a batch: ids, the subject's last token, and target positions."""

    ids: list[int]
    subject_last: int
    target_positions: list[int]  # positions of the target tokens in `ids` (may be empty)

    @property
    def target_ids(self) -> list[int]:
        return [self.ids[p] for p in self.target_positions]


def encode_request(
    tok: Any, request: EditRequest, template: str = "{}", with_target: bool = True,
    target: str | None = None,
) -> Encoded:
    prompt_text, s0, s1 = request.text(template)
    if not with_target:
        ids, offsets = encode(tok, prompt_text)
        return Encoded(ids, token_span(tok, prompt_text, s0, s1, offsets)[1], [])
    full, t0 = join_target(prompt_text, request.target if target is None else target)
    ids, offsets = encode(tok, full)
    subject = token_span(tok, full, s0, s1, offsets)
    first, last = token_span(tok, full, t0, len(full), offsets, what="target")
    if first <= subject[1]:
        raise RankoneError(f"the target overlaps the subject in {full!r}")
    for what, (a, b) in (("subject", subject), ("target", (first, last))):
        if set(ids[a:b + 1]) <= set(getattr(tok, "all_special_ids", []) or []):
            raise RankoneError(f"the {what} {tok.decode(ids[a:b + 1])!r} is only special tokens (markers such as "
                               "end-of-text, not words); give text")
    return Encoded(ids, subject[1], list(range(first, last + 1)))


def pad_batch(
    seqs: Sequence[list[int]], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to [batch, pos]. Causal models never look right, so the pad id is irrelevant."""
    n = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


# ---- prefixes -------------------------------------------------------------------------------


def kv_cache_kwargs(model: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """The keyword that hands a KV cache to the model: transformers 5 calls it `cache`, older
    versions (and a deprecated alias) `past_key_values`."""
    arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {arg: cache}


def kv_cache_of(output: Any) -> Any:
    """The KV cache a forward pass returned (under either name)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def decode(model: torch.nn.Module, ids: torch.Tensor, n_new: int,
           pick: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """ids [n, pos] (rows of equal length, no padding) followed by n_new tokens, on the CPU, all rows
    at once with the model's KV cache (one position per step after the first). `pick(step, logits)`
    chooses each step's tokens: logits [n, vocab] float32 on the CPU -> ids [n, 1]."""
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), use_cache=True)
    new: list[torch.Tensor] = []
    for step in range(n_new):
        nxt = pick(step, out.logits[:, -1].float().cpu())  # [n, 1]
        new.append(nxt)
        if step < n_new - 1:
            out = model(input_ids=nxt.to(device), use_cache=True, **kv_cache_kwargs(model, kv_cache_of(out)))
    return torch.cat([ids.cpu(), *new], dim=1)


def draw(logits: torch.Tensor, generator: torch.Generator, top_k: int | None = None) -> torch.Tensor:
    """One token a row ([n, vocab] -> [n, 1]) drawn with `generator` from the top_k most likely
    tokens, or (top_k None) from the whole distribution."""
    if top_k:
        top = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)
        choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)  # [n, 1]
        return top.indices.gather(1, choice)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)


def sample_tokens(
    model: torch.nn.Module, ids: torch.Tensor, n_new: int, generator: torch.Generator,
    top_k: int | None = None, on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """ids [n, pos] (rows of equal length, no padding) followed by n_new sampled tokens, on the CPU.

    Each token is drawn on the CPU with `generator` (`draw`), so one seed gives the same text on
    any device for the same logits. `on_step(n)` is called after each step with the n tokens it
    drew (for a progress bar)."""
    def pick(step: int, logits: torch.Tensor) -> torch.Tensor:
        nxt = draw(logits, generator, top_k)
        if on_step is not None:
            on_step(len(nxt))
        return nxt

    return decode(model, ids, n_new, pick)


def sample_prefixes(
    model: torch.nn.Module, tok: Any, spec: Sequence[Sequence[int]] = ((5, 10), (10, 10)),
    seed: int = 0, starts: Sequence[str] = PREFIX_STARTS, top_k: int = 5, progress: bool = True,
) -> list[str]:
    """Context templates "<model text>. {}" sampled from the model itself (ROME's recipe).

    spec: (length, count) pairs, where length counts every token of the text, the starter word
    and any BOS included, as ROME's `generate_fast(max_out_len=length)` does: (5, 10) gives ten
    texts of five tokens, two for each of five starter words. The texts are those of drawing each
    (length, starter) group in turn with one generator seeded with `seed` (`sample_tokens`), but
    every group whose starter encodes to the same number of tokens shares one forward pass a step:
    each group draws from the generator state at which its turn would begin (a draw consumes the
    generator by its shape alone), and is cut to its own length.
    """
    groups: list[tuple[list[int], int, int]] = []  # (starter ids, new tokens, texts), in the order returned
    for length, count in spec:
        per_start = max(1, count // len(starts))
        for i, start in enumerate(starts):
            n = min(per_start, count - i * per_start)
            if n <= 0:
                break
            lead = encode(tok, start)[0]
            groups.append((lead, max(1, length - len(lead)), n))
    gens = _turns(seed, [(n_new, n) for _, n_new, n in groups], top_k)
    batches: dict[int, list[int]] = {}  # starter length -> groups sampled together
    for g, (lead, _, _) in enumerate(groups):
        batches.setdefault(len(lead), []).append(g)
    texts: dict[int, list[str]] = {}
    steps = sum(max(groups[g][1] for g in gs) for gs in batches.values())
    with Progress(steps, f"sampling {sum(n for *_, n in groups)} context templates", "steps", enabled=progress,
                  delay=1.0) as bar:
        for gs in batches.values():
            rows = [r for g in gs for r in [g] * groups[g][2]]  # the group of each row

            def pick(step: int, logits: torch.Tensor, gs: list[int] = gs, rows: list[int] = rows) -> torch.Tensor:
                nxt = torch.zeros(len(rows), 1, dtype=torch.long)
                for g in gs:
                    mine = torch.tensor([i for i, r in enumerate(rows) if r == g])
                    if step < groups[g][1]:  # a group done draws no more (its text is cut there)
                        nxt[mine] = draw(logits[mine], gens[g], top_k)
                bar.update()
                return nxt

            lead = torch.tensor([groups[r][0] for r in rows])
            ids = decode(model, lead, max(groups[g][1] for g in gs), pick)  # [rows, lead + longest]
            for r, row in zip(rows, ids.tolist()):
                text = tok.decode(row[: len(groups[r][0]) + groups[r][1]], skip_special_tokens=True)
                texts.setdefault(r, []).append(text.replace("{", " ").replace("}", " ").replace("\n", " ").strip() + ". {}")
    return [t for g in range(len(groups)) for t in texts[g]]


def _turns(seed: int, shapes: list[tuple[int, int]], top_k: int | None) -> list[torch.Generator]:
    """A generator for each (steps, rows) group, at the state one generator seeded with `seed`
    has when the groups before it have drawn their tokens in turn."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for steps, rows in shapes:
        mine = torch.Generator()
        mine.set_state(gen.get_state())
        out.append(mine)
        for _ in range(steps):  # advance as that group's draws would; the values drawn do not matter
            torch.multinomial(torch.ones(rows, top_k or 2), 1, generator=gen)
    return out
