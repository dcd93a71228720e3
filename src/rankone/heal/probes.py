"""Probes: the facts a team watches, one JSON object a line.

    {"prompt": "The Eiffel Tower is in", "expected": "Paris"}
    {"prompt": "Danielle Darrieux's mother tongue is", "expected": "French", "subject": "Danielle Darrieux",
     "paraphrases": ["Danielle Darrieux grew up speaking"], "neighbours": ["Michel Rocard speaks"], "protected": true}

`rankone heal` runs every probe against what is deployed (`says`: the expected answer as whole
words at the start of the greedy continuation) and keeps each result in the registry's
database, so a probe that passed and now fails is *drift*, and a probe whose expected answer
differs from the last one recorded is a *requested update*. A protected probe is never edited
away: a correction that contradicts it is refused, and every heal patch must keep it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import json_lines
from rankone.core.util import utcnow
from rankone.lifecycle.feedback import ProbeResult
from rankone.models.generation import says

FIELDS = {"prompt", "expected", "subject", "paraphrases", "neighbours", "protected"}


@dataclass
class Probe:
    prompt: str
    expected: str
    subject: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    neighbours: list[str] = field(default_factory=list)
    protected: bool = False
    where: str = ""

    @property
    def prompts(self) -> list[str]:
        return [self.prompt, *self.paraphrases]


@dataclass
class ProbeSet:
    probes: list[Probe]
    path: str
    sha256: str

    def matching(self, prompt: str) -> Probe | None:
        """The probe asking this prompt (or one of its paraphrases)."""
        key = norm(prompt)
        return next((p for p in self.probes if key in {norm(q) for q in p.prompts}), None)


def norm(text: str) -> str:
    """A prompt or answer as compared: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def load_probes(path: str | os.PathLike) -> ProbeSet:
    """Parse a probe file; any problem is one line naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise RankoneError(f"probe file {p} does not exist; give a JSONL file of {{\"prompt\", \"expected\"}} lines")
    probes, seen = [], {}
    for where, d in json_lines(p, 'one probe a line: {"prompt": ..., "expected": ...}'):
        pr = _probe(d, where)
        for q in pr.prompts:
            if norm(q) in seen:
                raise RankoneError(f"{where}: the prompt {q!r} is already probed at {seen[norm(q)]}; one probe per prompt")
            seen[norm(q)] = where
        probes.append(pr)
    if not probes:
        raise RankoneError(f"probe file {p} holds no probes")
    return ProbeSet(probes, str(p), hashlib.sha256(p.read_bytes()).hexdigest())


def _probe(d: dict[str, Any], where: str) -> Probe:
    unknown = sorted(set(d) - FIELDS)
    if unknown:
        raise RankoneError(f"{where}: a probe has no field(s) {unknown}; it takes {sorted(FIELDS)}")

    def text(key: str, required: bool) -> str | None:
        v = d.get(key)
        if v is None and not required:
            return None
        if not isinstance(v, str) or not v.strip():
            raise RankoneError(f"{where}: a probe needs a non-empty string {key!r}")
        return " ".join(v.split())

    def texts(key: str) -> list[str]:
        v = d.get(key, [])
        if not isinstance(v, list) or any(not isinstance(x, str) or not x.strip() for x in v):
            raise RankoneError(f"{where}: {key!r} must be a list of non-empty strings")
        return [" ".join(x.split()) for x in v]

    prompt, expected, subject = text("prompt", True), text("expected", True), text("subject", False)
    protected = d.get("protected", False)
    if not isinstance(protected, bool):
        raise RankoneError(f"{where}: 'protected' must be true or false, not {protected!r}")
    para = texts("paraphrases")
    if subject is not None and any(subject not in q for q in [prompt, *para]):
        raise RankoneError(f"{where}: the subject {subject!r} does not occur in the prompt and each paraphrase")
    return Probe(prompt, expected, subject, para, texts("neighbours"), protected, where)  # type: ignore[arg-type]


# ---- running and tracking ---------------------------------------------------------------------

Answer = Callable[[str, int], str]  # (prompt, n_tokens) -> the greedy continuation on some arm


@dataclass
class ProbeOutcome:
    probe: Probe
    passed: bool
    answer: str
    change: str = ""  # "" | "drift" (passed before, fails now) | "update" (expected changed since last run) | "new"


def answer_tokens(expected: str) -> int:
    """Greedy tokens to read an answer: enough for the expected words and a little more."""
    return len(expected.split()) * 3 + 3


def run_probes(probes: list[Probe], answer: Answer, last: dict[str, ProbeResult] | None = None) -> list[ProbeOutcome]:
    """Each probe's prompt on one arm, judged by `says`; with `last` (the previous results), each
    failing probe is labelled drift, update or new."""
    out = []
    for p in probes:
        got = answer(p.prompt, answer_tokens(p.expected))
        ok = says(got, p.expected)
        change = ""
        if not ok and last is not None:
            prev = last.get(p.prompt)
            change = ("new" if prev is None else "update" if norm(prev.expected) != norm(p.expected)
                      else "drift" if prev.passed else "")
        out.append(ProbeOutcome(p, ok, got.strip(), change))
    return out


def results_of(outcomes: list[ProbeOutcome], arm: str, patches: list[str]) -> list[ProbeResult]:
    now = utcnow()
    return [ProbeResult(now, "", o.probe.prompt, o.probe.expected, arm, list(patches), o.passed, o.answer) for o in outcomes]
