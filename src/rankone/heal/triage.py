"""Triage: which reported corrections heal may act on, and which it must refuse.

Pure functions over the open reports, the probes and the policy (no model, no server): the
loop adds the re-check on the deployed model and the subject.

    group     reports by their prompt (template and subject written in), then by correction
    accept    a correction given by ≥ K distinct users, or by a trusted source (a failing probe,
              a token-authenticated reporter); with trusted_only, trusted sources alone
    contested two different corrections of one prompt both acceptable: skipped, never chosen
    refuse    a correction that contradicts a protected probe or any probe's expected answer;
              later (subject known) one whose subject a protected probe's prompt mentions
    wait      fewer than K users and no trusted source: left open, counted again next cycle

A user is the reporter the server recorded: the OpenAI `user` of the request reported on. It
is self-declared, so K resists a careless or lone reporter, not an organised one; a deployment
facing organised ones sets trusted_only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rankone.heal.policy import HealPolicy
from rankone.heal.probes import Probe, ProbeOutcome, ProbeSet, norm
from rankone.lifecycle.feedback import Report


@dataclass
class Correction:
    """One fact to correct: a prompt and the answer it should get, with what stands behind it."""
    prompt: str
    correction: str
    subject: str | None = None
    feedback_ids: list[int] = field(default_factory=list)
    users: list[str] = field(default_factory=list)  # distinct untrusted reporters of this correction
    trusted: list[str] = field(default_factory=list)  # trusted sources: "reporter:NAME" or "probe:FILE:LINE"
    paraphrases: list[str] = field(default_factory=list)
    neighbours: list[str] = field(default_factory=list)
    first_at: str = ""
    last_at: str = ""
    ready_at: str = ""  # when it became acceptable: the K-th distinct user's report, or the first trusted one
    subject_from: str = ""  # probe | report | found

    @property
    def source(self) -> str:
        return "probe" if any(t.startswith("probe:") for t in self.trusted) else "feedback"

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "correction": self.correction, "subject": self.subject,
                "subject_from": self.subject_from, "feedback_ids": self.feedback_ids, "users": self.users,
                "trusted": self.trusted, "paraphrases": self.paraphrases, "neighbours": self.neighbours,
                "first_at": self.first_at, "last_at": self.last_at, "ready_at": self.ready_at}


@dataclass
class Verdict:
    correction: Correction
    action: str  # accept | wait | refuse | drop | skip
    rule: str  # k_users | trusted | below_k | contested | protected | contradicts_probe | protected_subject | ...
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "rule": self.rule, "reason": self.reason, "correction": self.correction.to_dict(),
                "evidence": self.evidence}


def _trusted_name(r: Report, policy: HealPolicy) -> str | None:
    if not r.trusted:
        return None
    name = r.reporter.removeprefix("trusted:")
    return name if policy.trusted_reporters is None or name in policy.trusted_reporters else None


def triage(reports: list[Report], probes: ProbeSet | None, failing: list[ProbeOutcome], policy: HealPolicy) -> list[Verdict]:
    """A verdict for every (prompt, correction) among the open `wrong` reports and failing probes."""
    out: list[Verdict] = []
    groups: dict[str, list[Report]] = {}
    for r in reports:
        if r.verdict == "wrong" and r.correction:
            groups.setdefault(norm(r.prompt), []).append(r)
    probe_fix = {norm(o.probe.prompt): o for o in failing}
    for key, rs in groups.items():
        by: dict[str, list[Report]] = {}
        for r in rs:
            by.setdefault(norm(r.correction or ""), []).append(r)
        corr = {c: _correction(group, policy) for c, group in by.items()}
        if key in probe_fix:  # a failing probe asks the same prompt: its expected answer is the correction
            p = probe_fix[key].probe
            for c, x in corr.items():
                if c != norm(p.expected):
                    out.append(_refusal(x, "contradicts_probe", p))
            continue  # the probe's own correction comes below (with these reports' ids when they agree)
        acceptable = {c: x for c, x in corr.items() if x.trusted or (not policy.trusted_only and len(x.users) >= policy.k_users)}
        trusted = {c: x for c, x in acceptable.items() if x.trusted}
        chosen = trusted or acceptable
        for c, x in corr.items():
            if c in chosen:
                continue
            n = len(x.users)
            why = ("only trusted sources count (trusted_only)" if policy.trusted_only
                   else f"{n} of {policy.k_users} distinct users needed")
            if c in acceptable:
                why = "a trusted source gives another correction"
            out.append(Verdict(x, "wait", "below_k", f"{x.prompt!r} -> {x.correction!r}: {why}", {"users": n}))
        if len(chosen) > 1:
            for x in chosen.values():
                out.append(Verdict(x, "skip", "contested",
                                   f"{x.prompt!r}: {len(chosen)} different corrections are each backed "
                                   f"({', '.join(repr(y.correction) for y in chosen.values())}); heal does not choose",
                                   {"corrections": {y.correction: {"users": y.users, "trusted": y.trusted}
                                                    for y in chosen.values()}}))
            continue
        for x in chosen.values():
            probe = probes.matching(x.prompt) if probes is not None else None
            if probe is not None and norm(probe.expected) != norm(x.correction):
                out.append(_refusal(x, "protected" if probe.protected else "contradicts_probe", probe))
                continue
            if probe is not None:  # agrees with a probe that passes: nothing to correct there
                x.paraphrases, x.neighbours = list(probe.paraphrases), list(probe.neighbours)
                x.subject, x.subject_from = x.subject or probe.subject, x.subject_from or ("probe" if probe.subject else "")
            rule = "trusted" if x.trusted else "k_users"
            out.append(Verdict(x, "accept", rule, f"{x.prompt!r} -> {x.correction!r}: "
                               + (f"trusted ({', '.join(x.trusted)})" if x.trusted else f"{len(x.users)} distinct users"),
                               {"users": x.users, "trusted": x.trusted}))
    for key, o in probe_fix.items():
        p = o.probe
        agree = [r for r in groups.get(key, []) if norm(r.correction or "") == norm(p.expected)]
        x = _correction(agree, policy) if agree else Correction(p.prompt, p.expected)
        x.prompt, x.correction = p.prompt, p.expected
        x.trusted = [f"probe:{p.where}", *x.trusted]
        x.subject, x.subject_from = p.subject or x.subject, "probe" if p.subject else x.subject_from
        x.paraphrases, x.neighbours = list(p.paraphrases), list(p.neighbours)
        out.append(Verdict(x, "accept", "trusted", f"probe {p.where} fails ({o.change or 'failing'}): {p.prompt!r} "
                           f"answers {o.answer!r}, expected {p.expected!r}", {"probe": p.where, "answer": o.answer,
                                                                              "change": o.change}))
    return out


def refuse_by_subject(v: Verdict, probes: ProbeSet | None) -> Verdict | None:
    """A refusal when the correction's subject is mentioned by a protected probe (other than its own
    prompt restored to the probe's expected answer): editing that subject could move a protected fact."""
    x = v.correction
    if probes is None or not x.subject:
        return None
    for p in probes.probes:
        if not p.protected:
            continue
        own = norm(x.prompt) in {norm(q) for q in p.prompts} and norm(x.correction) == norm(p.expected)
        mentions = (p.subject is not None and norm(p.subject) == norm(x.subject)) or \
            any(norm(x.subject) in norm(q) for q in p.prompts)
        if mentions and not own:
            return _refusal(x, "protected_subject", p)
    return None


def _correction(rs: list[Report], policy: HealPolicy) -> Correction:
    users = sorted({r.reporter for r in rs if not r.trusted})
    trusted = sorted({f"reporter:{n}" for r in rs if (n := _trusted_name(r, policy))})
    subjects = Counter(r.subject for r in rs if r.subject and r.subject in r.prompt)
    subject = subjects.most_common(1)[0][0] if subjects else None
    seen: set[str] = set()
    ready_at = ""
    for r in sorted(rs, key=lambda r: r.at):  # the report that made it acceptable
        if _trusted_name(r, policy):
            ready_at = r.at
            break
        seen |= set() if r.trusted else {r.reporter}
        if len(seen) >= policy.k_users and not policy.trusted_only:
            ready_at = r.at
            break
    return Correction(rs[0].prompt, rs[0].correction or "", subject, [r.id for r in rs], users, trusted,
                      first_at=min(r.at for r in rs), last_at=max(r.at for r in rs), ready_at=ready_at,
                      subject_from="report" if subject else "")


def _refusal(x: Correction, rule: str, probe: Probe) -> Verdict:
    what = {"protected": "contradicts the protected fact", "contradicts_probe": "contradicts the probe",
            "protected_subject": "would edit the subject of the protected fact"}[rule]
    return Verdict(x, "refuse", rule, f"{x.prompt!r} -> {x.correction!r} {what} {probe.prompt!r} -> {probe.expected!r} "
                                      f"({probe.where})", {"probe": probe.where, "probe_prompt": probe.prompt,
                                                           "expected": probe.expected, "protected": probe.protected})
