"""One heal cycle, and the watch loop around it.

    collect   the probes on what is deployed (recorded: drift = passed before, fails now) and the
              open `wrong` reports in the registry's database
    triage    `rankone.heal.triage`: K distinct users or a trusted source; refusals
    re-check  on the deployed model: a correction it already gives (prompt and paraphrases) is dropped
    subject   given by a probe or a report, else found by corruption (`rankone.heal.subject`);
              ambiguous or unfindable: skipped
    propose   one patch, registered by `heal` with a reason naming the reports and probes
    validate  the gates; a failure rejects the patch. Its corrections (or an aborted patch's) are
              retried in halves (`heal-split`; the next proposals take the first half pending);
              a lone correction whose patch fails is skipped for good (`breaks_checks`)
    roll out  with a server: shadow, canary steps, promote | abort | pause (`rankone.heal.drive`)

Every refusal, drop and skip is an audit entry with its evidence, and the reports it settles
get that status, so each is decided once. `dry_run` does the reading and the thinking and prints
the plan, writing nothing: no audit entry, no report status, no probe result, no patch.
A patch heal proposed earlier and that is still proposed, validated or staged is taken up first
(a rerun after a kill resumes it); heal rolls out one patch at a time.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from rankone.core.errors import RankoneError
from rankone.heal.client import ServerClient
from rankone.heal.deployed import Deployed
from rankone.heal.drive import Outcome, Rollout
from rankone.heal.policy import HealPolicy
from rankone.heal.probes import ProbeOutcome, ProbeSet, answer_tokens, results_of, run_probes
from rankone.heal.propose import (compute, describe, heldout_text, probes_to_keep, reason_of, suite_for, unalignable,
                                  validate)
from rankone.heal.subject import find_subject
from rankone.heal.triage import Correction, Verdict, refuse_by_subject, triage
from rankone.lifecycle.compact import compact_release
from rankone.lifecycle.feedback import FeedbackLog, heal_events, record_event
from rankone.lifecycle.registry import Registry
from rankone.lifecycle.store import content_id
from rankone.models.generation import says
from rankone.models.handle import ModelHandle

log = logging.getLogger("rankone.heal")
STATUS_OF = {"refuse": "refused", "drop": "dropped", "skip": "skipped"}
ACTION_OF = {"refuse": "heal-refuse", "drop": "heal-drop", "skip": "heal-skip"}


@dataclass
class Plan:
    probes: list[ProbeOutcome] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)
    ready: bool = False
    waiting_why: str = ""
    active: str = ""  # what heal does with a patch already in flight
    proposal: dict[str, Any] | None = None
    patch_id: str | None = None
    outcome: Outcome | None = None

    def lines(self) -> list[str]:
        failing = [o for o in self.probes if not o.passed]
        out = [f"probes: {len(self.probes) - len(failing)} of {len(self.probes)} pass"
               + "".join(f"\n  FAIL{' (' + o.change + ')' if o.change else ''} {o.probe.prompt!r}: {o.answer!r}, expected "
                         f"{o.probe.expected!r}" for o in failing)]
        by: dict[str, list[Verdict]] = {}
        for v in self.verdicts:
            by.setdefault(v.action, []).append(v)
        names = {"accept": "edits", "wait": "waiting (not enough reports)", "refuse": "refused", "drop": "dropped (already "
                 "answered right)", "skip": "skipped"}
        for action in ("accept", "refuse", "drop", "skip", "wait"):
            vs = by.get(action, [])
            if vs:
                out.append(f"{names[action]}: {len(vs)}")
                out += [f"  {_fact(v.correction)}" + (f"  [{v.rule}] {v.reason}" if action != "accept" else
                                                      f"  ({v.reason.split(': ', 1)[-1]})") for v in vs]
        if not self.verdicts:
            out.append("no open reports")
        if self.waiting_why:
            out.append(self.waiting_why)
        if self.active:
            out.append(self.active)
        if self.patch_id:
            out.append(f"proposed {self.patch_id}")
        if self.outcome is not None:
            out.append(f"{self.outcome.patch_id}: {self.outcome.result}: {self.outcome.reason}")
        return out


def _fact(c: Correction) -> str:
    subj = f" (subject {c.subject!r}, {c.subject_from})" if c.subject else ""
    return f"{c.prompt!r} -> {c.correction!r}{subj} feedback {c.feedback_ids or '-'}"


def _corrections(proposal: Any) -> list[Correction]:
    """The corrections a `heal-propose` audit entry names."""
    return [Correction(**{k: v for k, v in c.items() if k in Correction.__dataclass_fields__})
            for c in proposal.details.get("corrections", [])]


def _key(c: Correction) -> str:
    return f"{c.prompt}\n{c.correction}"


def _age_s(at: str, now: float) -> float:
    return now - datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()


class Healer:
    def __init__(self, registry: str | Path, probes: ProbeSet, policy: HealPolicy, handle: ModelHandle,
                 client: ServerClient | None = None, dry_run: bool = False, say: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        self.path, self.probes, self.policy, self.handle = Path(registry), probes, policy, handle
        self.client, self.dry_run, self.say, self.clock, self.sleep = client, dry_run, say, clock, sleep
        self.deployed = Deployed(handle, client)
        self.reg = Registry(self.path, create=False)
        self.reg.check_model(handle)  # heal edits the registry's base model, nothing else
        self.fb = FeedbackLog(self.path)
        self.rollout = Rollout(self.reg, client, policy, handle, probes.probes, say, clock, sleep) if client else None
        self._probed: tuple[float, list[str], list[ProbeOutcome]] | None = None  # (when, release, outcomes)

    def close(self) -> None:
        self.fb.close()
        self.reg.close()
        if self.client is not None:
            self.client.close()

    # ---- a cycle ---------------------------------------------------------------------------------

    def cycle(self) -> Plan:
        plan = Plan()
        if not self.dry_run:
            self._reconcile()
        released = [self.reg.load_patch(r.id) for r in self.reg.released()]
        plan.probes = self._probe(released)
        active = self._active()
        if active is not None:
            self._continue(active, plan, plan.probes)
            return plan
        failing = [o for o in plan.probes if not o.passed]
        plan.verdicts = triage(self.fb.reports(("open",)), self.probes, failing, self.policy)
        accepted = [v for v in plan.verdicts if v.action == "accept"]
        plan.ready, plan.waiting_why = self._ready(accepted)
        if accepted and (plan.ready or self.dry_run):
            self._check(accepted, released)
        if not self.dry_run:
            for v in plan.verdicts:
                if v.action in STATUS_OF:
                    self._settle(v)
        edits = self._after_splits([v.correction for v in plan.verdicts if v.action == "accept"])
        edits = edits[: self.policy.max_corrections]
        if not edits or not plan.ready:
            return plan
        if self.dry_run:
            plan.active = f"would propose one patch of {len(edits)} correction(s) ({self._method(len(edits))}), validate " \
                          "it" + (" and roll it out" if self.client else "")
            return plan
        pid = self._propose(edits, released, plan)
        if pid is not None:
            self._continue(pid, plan, plan.probes)
        return plan

    def _probe(self, released: list[Any]) -> list[ProbeOutcome]:
        """The probes on stable: run at most every probe_interval_s, and again once the release changed."""
        ids = [r.id for r in self.reg.released()]
        last = self._probed
        if last is not None and last[1] == ids and self.clock() - last[0] < self.policy.probe_interval_s:
            return last[2]
        with self.deployed.arm("stable", released) as answer:
            outcomes = run_probes(self.probes.probes, answer, self.fb.last_probe_results())
        if not self.dry_run:
            self.fb.record_probes(f"heal-{int(self.clock())}", results_of(outcomes, "stable", ids))
        self._probed = (self.clock(), ids, outcomes)
        return outcomes

    def _method(self, n: int) -> str:
        return self.policy.method_many if n > 1 else self.policy.method_one

    def _ready(self, accepted: list[Verdict]) -> tuple[bool, str]:
        """Propose once no correction has become acceptable for quiet_s (more reports on one already
        acceptable change nothing), or the first became acceptable max_wait_s ago."""
        fed = [v.correction for v in accepted if v.correction.source == "feedback"]
        if not accepted or len(fed) < len(accepted) or not fed:
            return bool(accepted), ""
        now = self.clock()
        last = min(_age_s(c.ready_at, now) for c in fed)
        first = max(_age_s(c.ready_at, now) for c in fed)
        if last >= self.policy.quiet_s or first >= self.policy.max_wait_s:
            return True, ""
        return False, (f"waiting for reports to settle: the latest correction became actionable {last:.0f} s ago "
                       f"(quiet_s {self.policy.quiet_s:g}), the first {first:.0f} s ago (max_wait_s {self.policy.max_wait_s:g})")

    def _check(self, accepted: list[Verdict], released: list[Any]) -> None:
        """Re-check on the deployed model, then find missing subjects and refuse protected subjects."""
        with self.deployed.arm("stable", released) as answer:
            for v in accepted:
                c = v.correction
                got = {q: answer(q, answer_tokens(c.correction)).strip() for q in [c.prompt, *c.paraphrases]}
                if all(says(a, c.correction) for a in got.values()):
                    self._turn(v, "drop", "already_right", f"the deployed model already answers {c.correction!r} on "
                               f"{len(got)} prompt(s)", {"answers": got})
                else:
                    v.evidence["deployed_answers"] = got
        with self.deployed.local(released):  # subjects are found on what is deployed
            for v in accepted:
                c = v.correction
                if v.action != "accept" or c.subject:
                    continue
                p = self.policy
                f = find_subject(self.handle, c.prompt, p.subject_max_words, p.subject_min_drop, p.subject_ambiguity,
                                 p.subject_noise_samples, p.subject_noise_factor, p.subject_min_p)
                v.evidence["subject"] = f.to_dict()
                if f.status == "found":
                    c.subject, c.subject_from = f.subject, "found"
                else:
                    self._turn(v, "skip", f"subject_{f.status}", f"no subject given and none found: {f.reason}", {})
        for v in accepted:
            if v.action != "accept":
                continue
            r = refuse_by_subject(v, self.probes)
            if r is not None:
                self._turn(v, "refuse", r.rule, r.reason, r.evidence)
                continue
            why = unalignable(self.handle, v.correction, self.policy)
            if why:
                self._turn(v, "skip", "unalignable", why, {})

    @staticmethod
    def _turn(v: Verdict, action: str, rule: str, reason: str, evidence: dict[str, Any]) -> None:
        v.action, v.rule = action, rule
        v.reason = f"{v.correction.prompt!r} -> {v.correction.correction!r}: {reason}"
        v.evidence.update(evidence)

    def _settle(self, v: Verdict) -> None:
        """A refusal, drop or skip: an audit entry with its evidence; its reports get that status."""
        c = v.correction
        record_event(self.reg, ACTION_OF[v.action], None, f"heal: {v.rule}: {v.reason}"[:2000], v.to_dict())
        self.fb.set_status(c.feedback_ids, STATUS_OF[v.action], note=f"{v.rule}: {v.reason}"[:500])

    def _after_splits(self, edits: list[Correction]) -> list[Correction]:
        """The corrections to propose now: none whose lone patch failed, and while a split batch is
        retried, only the first half (latest split first) with a correction pending."""
        broken = {e.details.get("key") for e in heal_events(self.reg, action="heal-skip")
                  if e.details.get("rule") == "breaks_checks"}
        edits = [c for c in edits if _key(c) not in broken]
        pending = {_key(c) for c in edits}
        for e in reversed(heal_events(self.reg, action="heal-split")):
            for half in e.details["halves"]:
                if pending & set(half):
                    return [c for c in edits if _key(c) in set(half)]
        return edits

    def _split(self, pid: str, corrections: list[Correction], why: str) -> None:
        """A failed heal patch: its reports reopen and its corrections are retried in halves; a lone
        correction is skipped for good (its reports get that status)."""
        ids = [i for c in corrections for i in c.feedback_ids]
        if len(corrections) == 1:
            c = corrections[0]
            reason = f"heal: breaks_checks: {c.prompt!r} -> {c.correction!r}: its patch {pid} {why}"
            record_event(self.reg, "heal-skip", pid, reason[:2000], {"rule": "breaks_checks", "key": _key(c),
                                                                    "correction": c.to_dict()})
            self.fb.set_status(ids, "skipped", pid, reason[:500])
            return
        keys = [_key(c) for c in corrections]
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        reason = (f"heal: {pid} {why}; its {len(keys)} corrections are retried in halves of "
                  f"{len(halves[0])} and {len(halves[1])}")
        record_event(self.reg, "heal-split", pid, reason[:2000], {"halves": halves})
        self.fb.set_status(ids, "open", None, reason[:500])
        self.say(reason)

    # ---- proposing -----------------------------------------------------------------------------

    def _propose(self, edits: list[Correction], released: list[Any], plan: Plan) -> str | None:
        reason = reason_of(edits)
        self.say(f"proposing {len(edits)} correction(s) with {self._method(len(edits))}: {reason}")
        proposal = compute(self.handle, released, edits, self.policy, reason)
        plan.proposal = describe(proposal)
        for c, why in proposal.missed:
            v = next(v for v in plan.verdicts if v.correction is c)
            self._turn(v, "skip", "edit_missed", why, {})
            self._settle(v)
        if proposal.patch is None:
            return None
        reason = reason_of(proposal.made)
        with tempfile.TemporaryDirectory(prefix="rankone-heal-") as d:
            proposal.patch.save(Path(d) / "patch")
            pid = content_id(Path(d) / "patch")
            # the plan first (a kill before `add` leaves the reports open; after it, this names them)
            record_event(self.reg, "heal-propose", pid, reason, plan.proposal)
            rec, _ = self.reg.add(Path(d) / "patch", actor="heal", reason=reason)
        self.fb.set_status([i for c in proposal.made for i in c.feedback_ids], "acted", rec.id, reason[:500])
        plan.patch_id = rec.id
        self.say(f"proposed {rec.id} ({proposal.method}, {len(proposal.made)} correction(s))")
        return rec.id

    def _reconcile(self) -> None:
        """What is left half done: open reports of a live heal proposal, and a rejected or aborted
        heal patch whose corrections were not yet split for retrying (after a kill or an abort)."""
        state = {r.id: r.state for r in self.reg.list()}
        events = heal_events(self.reg)
        settled = {e.patch_id for e in events if e.action in ("heal-split", "heal-skip")}
        for e in (e for e in events if e.action == "heal-propose"):
            st = state.get(e.patch_id)
            if st in ("rejected", "aborted") and e.patch_id not in settled:
                self._split(e.patch_id, _corrections(e), f"was {st} (see its audit entries)")
            elif st in ("proposed", "validated", "staged", "released"):
                ids = [i for c in _corrections(e) for i in c.feedback_ids]
                still = [r.id for r in self.fb.get(ids) if r.status == "open"]
                if still:
                    self.fb.set_status(still, "acted", e.patch_id, (e.reason or "")[:500])

    # ---- patches in flight -----------------------------------------------------------------------

    def _active(self) -> str | None:
        """The patch heal is working on: its own proposed/validated/staged one, or (adopt_staged) any staged one."""
        mine = sorted((r for r in self.reg.list() if r.added_by == "heal" and r.state in ("proposed", "validated", "staged")),
                      key=lambda r: (r.state != "staged", r.added_at))
        if mine and mine[0].state == "staged":
            return mine[0].id
        staged = [s.id for s in self.reg.staged()]
        if self.policy.adopt_staged and staged:  # on live traffic now: guarded before heal's own next patch
            return staged[0]
        return mine[0].id if mine else None

    def _continue(self, pid: str, plan: Plan, probes: list[ProbeOutcome]) -> None:
        rec = self.reg.get(pid)
        if self.dry_run:
            plan.active = f"would continue patch {pid} ({rec.state})" + ("" if self.client else " (no server: no rollout)")
            return
        if rec.state == "proposed":
            e = [x for x in heal_events(self.reg, pid, "heal-propose")]
            if not e:
                raise RankoneError(f"heal patch {pid} is proposed but its proposal is not in the audit log; validate or "
                                   "reject it by hand (`rankone registry validate|reject`)")
            corrections = _corrections(e[-1])
            keep = probes_to_keep([o.probe for o in probes if o.passed], corrections, self.policy.probe_sample, pid)
            suite = suite_for(corrections, keep, heldout_text(self.handle, self.policy))
            self.say(f"validating {pid}: {len(suite.checks)} check(s)")
            tolerated = {p.prompt for p in keep if not p.protected}
            passed, report = validate(self.reg, pid, self.handle, suite, self.policy, tolerated)
            failed = [r for r in report.results if not r.passed]
            self.say(f"{pid}: the gates " + ("passed" if passed else "failed; rejected") + (
                f" ({len(failed)} check(s) failed: " + "; ".join(f"{r.type} {r.what!r}: {r.detail}" for r in failed[:3])
                + ")" if failed else ""))
            if not passed:
                self._split(pid, corrections, "failed the gates (" + "; ".join(
                    f"{r.type} {r.what!r}: {r.detail}" for r in failed[:3]) + ")")
                return
            rec = self.reg.get(pid)
        if self.rollout is None:
            plan.active = f"{pid} is {rec.state}; roll it out with --server (or `rankone registry stage`)"
            return
        if rec.state == "validated":
            if self.reg.staged():
                plan.active = f"{pid} waits: another patch is staged, and heal rolls out one at a time"
                return
            self.rollout.start(pid)
        plan.outcome = self.rollout.run(pid)
        if plan.outcome.result == "released":
            self._maybe_compact(probes)

    def _maybe_compact(self, probes: list[ProbeOutcome]) -> None:
        """Once `compact_after_patches` patches are released, the release compacted
        (`rankone.lifecycle.compact`) and released in their place when it passes the gates: every
        fact the replaced patches write, the probes that pass now, the held-out text."""
        n = self.policy.compact_after_patches
        count = len(self.reg.released())
        if n is None or count < n:
            return
        if self.reg.staged():
            self.say(f"{count} patches are released (compact_after_patches {n}); compaction waits until nothing is staged")
            return
        keep = probes_to_keep([o.probe for o in probes if o.passed], [], self.policy.probe_sample, "compact")
        suite = suite_for([], keep, heldout_text(self.handle, self.policy))
        res = compact_release(self.reg, self.handle, reason=f"heal: {count} released patches (compact_after_patches {n})",
                              suite=suite, policy=self.policy.gate_policy(), actor="heal")
        failed = [r for r in res.report.results if not r.passed]
        self.say(f"compacted {len(res.replaced)} released patches into {res.patch_id}: " + (
            "released in their place" if res.released else
            f"the gates failed ({len(failed)} check(s), e.g. {failed[0].type} {failed[0].what!r}); the release is unchanged"))

    # ---- watching --------------------------------------------------------------------------------

    def watch(self, max_cycles: int | None = None) -> None:
        n = 0
        while max_cycles is None or n < max_cycles:
            plan = self.cycle()
            for line in plan.lines():
                log.info(line)
            if plan.patch_id or plan.outcome or any(v.action in STATUS_OF for v in plan.verdicts):
                for line in plan.lines():
                    self.say(line)
            n += 1
            if max_cycles is None or n < max_cycles:
                self.sleep(self.policy.watch_interval_s)
