"""Validation gates: the checks a patch must pass before it can be released.

A *suite* is a JSONL file, one check per line:

    {"type": "target", "prompt": "Tetok Punnok was born in", "target": "Rome"}
        the patched model's greedy answer must be the target (whole words);
    {"type": "keep", "prompt": "Thathai Thurber was born in"}
        the greedy answer must stay what the reference model says, and the probability of that
        answer (teacher forced) must not move by more than `keep_max_prob_change`;
    {"type": "perplexity", "text_file": "heldout.txt"}   (or "text": "...")
        perplexity on a held-out text may rise by at most the fraction `max_perplexity_rise`.
        A relative `text_file` is read from the suite file's folder.

Every run also applies the ‖Δ‖ size gate: for each module the patch edits, ΔW = Σ u vᵀ over its
edits must satisfy ‖ΔW‖_F ≤ max_delta_rel · ‖W‖_F (and ≤ max_delta_fro when set).

Thresholds come from a `GatePolicy` (JSON file, see docs/policy.example.json). The *reference*
model is the base with the already released patches applied (what is deployed now); the
*candidate* is the reference plus the patch under test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import inside, json_lines, read_text
from rankone.core.text import shown
from rankone.models.generation import first_word, greedy, perplexity, says, target_logprob
from rankone.artifacts.patch import Patch, apply_patch
from rankone.methods.base import lowrank_fro
from rankone.methods.settings import policy_file, policy_from_dict
from rankone.core.util import utcnow

CHECK_TYPES = ("target", "keep", "perplexity")


# ---- policy ---------------------------------------------------------------------------------


@dataclass
class GatePolicy:
    """Thresholds for validation and release. JSON keys starting with "_" are comments."""

    keep_max_prob_change: float = 0.05  # |p_after − p_before| of the reference answer, absolute
    keep_answer_must_match: bool = True  # a "keep" prompt's greedy answer may not change
    max_perplexity_rise: float = 0.02  # ppl_after / ppl_before − 1 for each perplexity text
    max_delta_rel: float | None = 3.0  # ‖ΣΔW‖_F / ‖W‖_F per edited module; null: no limit (see docs)
    max_delta_fro: float | None = None  # ‖ΣΔW‖_F per edited module, absolute; null: no limit
    conflict_key_cosine: float = 0.9  # release refuses |cos(v₁, v₂)| above this (see conflicts.py)
    answer_tokens: int = 4  # greedy tokens generated to read an answer

    def __post_init__(self) -> None:
        for name in ("keep_max_prob_change", "max_perplexity_rise", "max_delta_rel", "max_delta_fro", "conflict_key_cosine"):
            v = getattr(self, name)
            if v is None and name in ("max_delta_rel", "max_delta_fro"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise RankoneError(f"policy {name} must be a non-negative number, got {v!r}")
        if not isinstance(self.keep_answer_must_match, bool):
            raise RankoneError(f"policy keep_answer_must_match must be true or false, got {self.keep_answer_must_match!r}")
        if isinstance(self.answer_tokens, bool) or not isinstance(self.answer_tokens, int) or self.answer_tokens < 1:
            raise RankoneError(f"policy answer_tokens must be a positive integer, got {self.answer_tokens!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "policy") -> "GatePolicy":
        return policy_from_dict(cls, d, source)

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> "GatePolicy":
        """The policy in a JSON file, or the defaults when `path` is None."""
        return cls() if path is None else cls.from_dict(policy_file(path, "policy file"), str(path))


# ---- suite ----------------------------------------------------------------------------------


@dataclass
class Check:
    type: str  # target | keep | perplexity
    prompt: str = ""
    target: str = ""
    text: str = ""
    name: str = ""  # what the table shows for perplexity texts
    where: str = ""  # "suite.jsonl:3"
    regression_only: bool = False  # a target check that fails only where the reference says the target and the candidate does not


@dataclass
class Suite:
    checks: list[Check]
    path: str = ""
    sha256: str = ""


def load_suite(path: str | os.PathLike) -> Suite:
    """Parse a JSONL suite; any problem is one line naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise RankoneError(f"suite file {p} does not exist")
    raw = p.read_bytes()
    checks = [parse_check(d, where, p.parent) for where, d in json_lines(p, "one check object per line")]
    if not checks:
        raise RankoneError(f"suite file {p} holds no checks; add lines like "
                           '{"type": "target", "prompt": "...", "target": "..."}')
    return Suite(checks, str(p), hashlib.sha256(raw).hexdigest())


def parse_check(d: dict[str, Any], where: str, folder: Path) -> Check:
    kind = d.get("type")
    if kind not in CHECK_TYPES:
        raise RankoneError(f"{where}: unknown check type {kind!r}; use one of {', '.join(CHECK_TYPES)}")
    allowed = {"target": {"prompt", "target"}, "keep": {"prompt"}, "perplexity": {"text", "text_file"}}[kind] | {"type", "name"}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise RankoneError(f"{where}: a {kind} check has no field(s) {unknown}; it takes {sorted(allowed)}")

    def text_field(key: str) -> str:
        v = d.get(key)
        if not isinstance(v, str) or not v.strip():
            raise RankoneError(f"{where}: a {kind} check needs a non-empty string {key!r}")
        return v

    if kind == "target":
        return Check(kind, prompt=text_field("prompt").rstrip(), target=text_field("target").strip(), where=where)
    if kind == "keep":
        return Check(kind, prompt=text_field("prompt").rstrip(), where=where)
    if ("text" in d) == ("text_file" in d):
        raise RankoneError(f"{where}: a perplexity check needs exactly one of 'text' or 'text_file'")
    if "text" in d:
        if len(text_field("text").split()) < 2:
            raise RankoneError(f"{where}: the perplexity text is too short (two words at least)")
        return Check(kind, text=text_field("text"), name=str(d.get("name") or "inline text"), where=where)
    f = inside(folder, text_field("text_file"), f"{where}: text_file")
    if not f.is_file():
        raise RankoneError(f"{where}: text_file {f} does not exist")
    text = read_text(f, f"{where}: text_file {f}")
    if len(text.split()) < 2:
        raise RankoneError(f"{where}: text_file {f} is too short for a perplexity")
    return Check(kind, text=text, name=str(d.get("name") or f.name), where=where)


# ---- report ---------------------------------------------------------------------------------


@dataclass
class CheckResult:
    type: str  # target | keep | perplexity | delta
    what: str  # the prompt, the text's name, or the module
    expected: str  # the target, the reference answer, or ""
    before: str  # reference model's answer / measure
    after: str  # candidate model's answer / measure
    measure: float | None  # the number compared with the limit (p change, ppl rise, ‖Δ‖ ratio)
    limit: float | None
    passed: bool
    detail: str = ""


@dataclass
class GateReport:
    passed: bool
    results: list[CheckResult]
    policy: dict[str, Any]
    suite: dict[str, Any]  # path, sha256, n_checks
    reference: list[str] = field(default_factory=list)  # released patches the reference model holds
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GateReport":
        return cls(**dict(d, results=[CheckResult(**r) for r in d["results"]]))

    def table(self) -> str:
        return format_table(self)


def format_table(report: GateReport, width: int = 34) -> str:
    def cut(s: str, n: int) -> str:
        s = shown(" ".join(str(s).split()))  # suites and answers are untrusted text: escaped for the terminal
        return s if len(s) <= n else s[: n - 1] + "…"

    def num(x: float | None) -> str:
        return "" if x is None else f"{x:.4g}"

    head = ("check", "what", "expected", "before", "after", "measure", "limit", "result")
    rows = [(r.type, cut(r.what, width), cut(r.expected, 16), cut(r.before, 22), cut(r.after, 22),
             num(r.measure), num(r.limit), "pass" if r.passed else "FAIL") for r in report.results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    n_fail = sum(not r.passed for r in report.results)
    lines.append(f"{len(report.results) - n_fail}/{len(report.results)} checks passed: "
                 + ("PASS" if report.passed else "FAIL"))
    return "\n".join(lines)


# ---- running the gates ----------------------------------------------------------------------


def _answer(model: torch.nn.Module, tok: Any, prompt: str, n_tokens: int) -> str:
    return greedy(model, tok, prompt, n_tokens)


def _prob(model: torch.nn.Module, tok: Any, prompt: str, answer: str) -> float | None:
    return math.exp(target_logprob(model, tok, prompt, answer)) if answer else None


def _measure(model: torch.nn.Module, tok: Any, checks: list[Check], policy: GatePolicy,
             answers: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """What the model says for each check. `answers`: reference answers whose p is measured."""
    out = []
    for i, c in enumerate(checks):
        if c.type == "target":
            n = policy.answer_tokens + len(tok(c.target, add_special_tokens=False)["input_ids"])
            cont = _answer(model, tok, c.prompt, n)
            out.append({"cont": cont, "p": _prob(model, tok, c.prompt, c.target)})
        elif c.type == "keep":
            ans = first_word(_answer(model, tok, c.prompt, policy.answer_tokens))
            ref = ans if answers is None else answers[i]
            out.append({"answer": ans, "p": _prob(model, tok, c.prompt, ref)})
        else:
            out.append({"ppl": perplexity(model, tok, c.text)})
    return out


def delta_norms(patch: Patch) -> dict[str, float]:
    """‖Σ Bᵢ Aᵢ‖_F per module, exactly from the factors (stacked into one low-rank product)."""
    by: dict[str, list[Any]] = {}
    for e in patch.edits:
        by.setdefault(e.module, []).append(e)
    return {m: lowrank_fro(torch.cat([e.B for e in es], 1), torch.cat([e.A for e in es], 0)) for m, es in by.items()}


def run_gates(model: torch.nn.Module, tok: Any, patch: Patch, suite: Suite, policy: GatePolicy,
              reference: Iterable[Patch] = (), reference_ids: Iterable[str] = (), spec: Any = None,
              replaces: bool = False) -> GateReport:
    """Measure the reference and the candidate; the model is left exactly as it was. `spec`: where
    the model's edited projections are (a ModelHandle's; default: the table's or discovery's).
    `replaces`: the patch takes the reference's place (a compaction), so the candidate is the base
    with the patch alone and ‖ΔW‖ is judged against the base weights."""
    ref = list(reference)

    def norms() -> dict[str, float]:
        return {m: float(arch.weight_oi(arch.get_module(model, m)).detach().double().norm())
                for m in {e.module for e in patch.edits}}

    w_norm = norms() if replaces else {}
    handle = apply_patch(model, ref, spec) if ref else None
    try:
        before = _measure(model, tok, suite.checks, policy)
        w_norm = w_norm or norms()
    finally:
        if handle is not None:
            handle.revert()
    answers = {i: b["answer"] for i, b in enumerate(before) if "answer" in b}
    handle = apply_patch(model, [patch] if replaces else ref + [patch], spec)  # one call: patches made on the base stack exactly
    try:
        after = _measure(model, tok, suite.checks, policy, answers)
    finally:
        handle.revert()

    results = [_judge(c, b, a, policy) for c, b, a in zip(suite.checks, before, after)]
    for m, d in sorted(delta_norms(patch).items()):
        rel = d / w_norm[m] if w_norm[m] > 0 else math.inf
        ok_rel = policy.max_delta_rel is None or rel <= policy.max_delta_rel
        ok_abs = policy.max_delta_fro is None or d <= policy.max_delta_fro
        results.append(CheckResult(
            "delta", m, "", f"|W|={w_norm[m]:.4g}", f"|ΔW|={d:.4g}", rel, policy.max_delta_rel, ok_rel and ok_abs,
            "" if ok_abs else f"|ΔW|_F {d:.4g} exceeds max_delta_fro {policy.max_delta_fro}"))
    return GateReport(all(r.passed for r in results), results, policy.to_dict(),
                      {"path": suite.path, "sha256": suite.sha256, "n_checks": len(suite.checks)},
                      list(reference_ids), utcnow())


def _fmt_p(p: float | None) -> str:
    return "" if p is None else f"p={p:.3f}"


def _judge(c: Check, b: dict[str, Any], a: dict[str, Any], policy: GatePolicy) -> CheckResult:
    if c.type == "target":
        ok = says(a["cont"], c.target)
        why = "" if ok else f"answer {a['cont'].strip()!r} is not {c.target!r}"
        if not ok and c.regression_only and not says(b["cont"], c.target):
            ok, why = True, "the reference does not say it either"
        return CheckResult("target", c.prompt, c.target, f"{first_word(b['cont'])} {_fmt_p(b['p'])}",
                           f"{first_word(a['cont'])} {_fmt_p(a['p'])}", a["p"], None, ok, why)
    if c.type == "keep":
        change = abs(a["p"] - b["p"]) if a["p"] is not None and b["p"] is not None else 0.0
        same = a["answer"] == b["answer"]
        ok = (same or not policy.keep_answer_must_match) and change <= policy.keep_max_prob_change
        why = [] if same or not policy.keep_answer_must_match else [f"answer moved {b['answer']!r} -> {a['answer']!r}"]
        if change > policy.keep_max_prob_change:
            why.append(f"p moved by {change:.3f}")
        return CheckResult("keep", c.prompt, b["answer"], f"{b['answer']} {_fmt_p(b['p'])}",
                           f"{a['answer']} {_fmt_p(a['p'])}", change, policy.keep_max_prob_change, ok, "; ".join(why))
    rise = a["ppl"] / b["ppl"] - 1
    ok = rise <= policy.max_perplexity_rise
    return CheckResult("perplexity", c.name, "", f"ppl={b['ppl']:.4g}", f"ppl={a['ppl']:.4g}", rise,
                       policy.max_perplexity_rise, ok, "" if ok else f"perplexity rose by {rise:.1%}")
