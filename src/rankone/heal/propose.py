"""From accepted corrections to a registered, validated patch.

    propose   the corrections as one patch: the policy's method_many (AlphaEdit: on top of the
              released patches' keys, `Editor.continue_from`) for several, method_one (r-ROME,
              on the released model) for one; a correction whose edit does not reach its target
              is dropped and the rest computed again, once (recompute_missed; else the patch is
              kept and the missed correction left out of the gates)
    register  `Registry.add` with actor `heal` and a reason listing the feedback ids and probes
    validate  the gates (`run_gates`): each correction on its prompt and paraphrases; the
              protected probes and a sample of passing probes kept (up to max_probe_regressions
              unprotected ones may fail, as on the canary); a correction's neighbours kept;
              held-out perplexity. Failing: the patch is rejected, with the gate report.

The model is the registry's base throughout; the released patches are applied around each use
and reverted exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankone.artifacts.patch import Patch, apply_patch
from rankone.core.errors import RankoneError
from rankone.core.tokens import EditRequest
from rankone.edit.editor import Editor, check_request, outcomes_of
from rankone.heal.policy import HealPolicy
from rankone.heal.probes import Probe, norm
from rankone.heal.triage import Correction
from rankone.lifecycle.gates import Check, GateReport, Suite, run_gates
from rankone.lifecycle.registry import Registry
from rankone.models.handle import ModelHandle

log = logging.getLogger("rankone.heal")


@dataclass
class Proposal:
    patch: Patch | None
    method: str
    made: list[Correction]  # written and reaching their targets
    missed: list[tuple[Correction, str]] = field(default_factory=list)  # dropped, with why


def request_of(c: Correction) -> EditRequest:
    assert c.subject is not None
    return EditRequest.create(c.prompt, c.subject, c.correction)


def unalignable(handle: ModelHandle, c: Correction, policy: HealPolicy) -> str | None:
    """Why the tokenizer cannot edit this correction (None: it can)."""
    from rankone.methods.base import resolve_settings

    try:
        check_request(handle, request_of(c), resolve_settings(handle, policy.settings(policy.method_many)))
    except RankoneError as e:
        return str(e)
    return None


def compute(handle: ModelHandle, released: list[Patch], corrections: list[Correction], policy: HealPolicy,
            reason: str) -> Proposal:
    """One patch for the corrections, made on top of `released` (the model given is the base)."""
    todo, missed = list(corrections), []
    for attempt in range(2):
        method = policy.method_many if len(todo) > 1 else policy.method_one
        ed = Editor(handle, policy.settings(method), policy.stats_corpus, progress=False)
        if ed.method.one_at_a_time:  # the ROME family edits the released model itself
            applied = apply_patch(handle.model, released) if released else None
        else:  # a batch method keeps the released patches' keys (AlphaEdit's null space)
            applied = ed.continue_from(released)
        try:
            patch = ed.edit([request_of(c) for c in todo], author="heal", reason=reason)
        finally:
            if applied is not None:
                applied.revert()
        reached = {(r["prompt"], r["subject"], r["target"]): o["reached"] for r, o in outcomes_of(patch)}
        ok = [c for c in todo if reached.get(_key(c), False)]
        miss = [c for c in todo if not reached.get(_key(c), False)]
        if not miss:
            return Proposal(patch, method, todo, missed)
        missed += [(c, f"the {method} edit did not reach {c.correction!r}") for c in miss]
        if ok and not policy.recompute_missed:
            return Proposal(patch, method, ok, missed)
        if not ok or attempt == 1:
            return Proposal(None, method, [], missed + [(c, "dropped with the others: a second try missed too") for c in ok])
        todo = ok
    raise AssertionError("unreachable")


def _key(c: Correction) -> tuple[str, str, str]:
    r = request_of(c)
    return r.prompt, r.subject, r.target


def reason_of(corrections: list[Correction]) -> str:
    ids = sorted({i for c in corrections for i in c.feedback_ids})
    probes = sorted({t.removeprefix("probe:") for c in corrections for t in c.trusted if t.startswith("probe:")})
    parts = [f"feedback #{', #'.join(map(str, ids))}" if ids else "", f"probes {', '.join(probes)}" if probes else ""]
    return f"heal: {len(corrections)} correction(s) from " + " and ".join(p for p in parts if p)


def register(reg: Registry, patch: Patch, reason: str) -> str:
    with tempfile.TemporaryDirectory(prefix="rankone-heal-") as d:
        patch.save(Path(d) / "patch")
        rec, created = reg.add(Path(d) / "patch", actor="heal", reason=reason)
    if not created:
        log.warning("the proposed patch %s is already in the registry (%s)", rec.id, rec.state)
    return rec.id


def suite_for(corrections: list[Correction], keep_probes: list[Probe], heldout: str | None) -> Suite:
    """The gate checks of a heal patch, as a suite (its digest names exactly these checks)."""
    checks = []
    for c in corrections:
        for q in [c.prompt, *c.paraphrases]:
            checks.append(Check("target", prompt=q, target=c.correction, where=f"correction {c.prompt!r}"))
        for q in c.neighbours:
            checks.append(Check("keep", prompt=q, where=f"neighbour of {c.prompt!r}"))
    for p in keep_probes:
        checks.append(Check("target", prompt=p.prompt, target=p.expected, where=f"probe {p.where}"))
    if heldout:
        checks.append(Check("perplexity", text=heldout, name="held-out text", where="heal policy"))
    body = json.dumps([vars(c) for c in checks], sort_keys=True).encode()
    return Suite(checks, "heal", hashlib.sha256(body).hexdigest())


def probes_to_keep(passing: list[Probe], corrected: list[Correction], sample: int, seed: str) -> list[Probe]:
    """Every protected probe that passes now, and a seeded sample of the other passing ones."""
    fixed = {norm(q) for c in corrected for q in [c.prompt, *c.paraphrases]}
    keep = [p for p in passing if norm(p.prompt) not in fixed]
    protected = [p for p in keep if p.protected]
    others = [p for p in keep if not p.protected]
    rng = random.Random(seed)
    return protected + (sorted(rng.sample(others, sample), key=others.index) if len(others) > sample else others)


def validate(reg: Registry, pid: str, handle: ModelHandle, suite: Suite, policy: HealPolicy,
             tolerated: set[str] = frozenset()) -> tuple[bool, GateReport]:
    """Run the gates and record the result. It passes when every check passes, except at most
    max_probe_regressions failing target checks on `tolerated` prompts (the unprotected probes:
    the same allowance the canary's probe check has)."""
    released = reg.released()
    report = run_gates(handle.model, handle.tokenizer, reg.load_patch(pid), suite, policy.gate_policy(),
                       [reg.load_patch(r.id) for r in released], [r.id for r in released])
    failed = [r for r in report.results if not r.passed]
    allowed = [r for r in failed if r.type == "target" and r.what in tolerated]
    passed = len(failed) == len(allowed) and len(allowed) <= policy.max_probe_regressions
    reason = "heal: the gates" + ("" if not failed else f": {len(failed)} check(s) failed, e.g. {failed[0].type} "
                                  f"{failed[0].what!r}: {failed[0].detail}")
    if failed and passed:
        reason += f" ({len(allowed)} unprotected probe(s), within max_probe_regressions {policy.max_probe_regressions})"
    reg.record_validation(pid, report.to_dict(), passed, actor="heal", reason=reason)
    if not passed:
        reg.reject(pid, actor="heal", reason=reason)
    return passed, report


def heldout_text(handle: ModelHandle, policy: HealPolicy) -> str | None:
    """The held-out text for the perplexity gate: the policy's file, else the model folder's corpus.txt."""
    path = Path(policy.heldout_text) if policy.heldout_text else (
        handle.folder / "corpus.txt" if handle.folder is not None else None)
    if path is None or not path.is_file():
        if policy.heldout_text:
            raise RankoneError(f"heal policy heldout_text {path} does not exist")
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[-policy.heldout_chars:]


def describe(p: Proposal) -> dict[str, Any]:
    return {"method": p.method, "corrections": [c.to_dict() for c in p.made],
            "missed": [{"correction": c.to_dict(), "why": why} for c, why in p.missed]}
