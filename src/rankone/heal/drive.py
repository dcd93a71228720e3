"""Driving one staged patch through its rollout: shadow, then the canary steps, each decided on
measured evidence (`rankone.heal.rollout.decide`) and written to the audit log before it acts.

The registry is the state: the step is the patch's staging (canary 0 % = the shadow step), and a
decision recorded after the latest `stage` entry but not yet carried out (heal was killed
between the two) is carried out on the next run. A rerun after a kill therefore resumes where
the registry says, and a promotion is one transaction: nothing is ever half-released.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from rankone.core.errors import RankoneError
from rankone.heal.client import ServerClient
from rankone.heal.policy import HealPolicy
from rankone.heal.probes import Probe, answer_tokens
from rankone.heal.rollout import POLICY_KEYS, Decision, Window, decide
from rankone.lifecycle.feedback import heal_events, record_event
from rankone.lifecycle.registry import Registry
from rankone.models.generation import says
from rankone.models.handle import ModelHandle

log = logging.getLogger("rankone.heal")
FAR = 1 << 62  # an event number beyond any: asks the server only for its head


@dataclass
class Outcome:
    patch_id: str
    result: str  # released | aborted | paused
    reason: str
    canary_users: int = 0


class Rollout:
    def __init__(self, reg: Registry, client: ServerClient, policy: HealPolicy, handle: ModelHandle,
                 probes: list[Probe], say: Callable[[str], None], clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.reg, self.client, self.policy, self.handle = reg, client, policy, handle
        self.probes, self.say, self.clock, self.sleep = probes, say, clock, sleep
        self.users_seen: set[str] = set()
        self.started_here: set[str] = set()  # patches this process staged (others are resumed)

    # ---- steps -------------------------------------------------------------------------------

    def steps(self) -> list[dict[str, Any]]:
        p = self.policy
        out = [{"kind": "shadow", "index": 0, "canary": 0.0, "shadow": p.shadow_percent}] if p.shadow_percent > 0 else []
        out += [{"kind": "canary", "index": i + 1, "canary": c, "shadow": p.canary_shadow_percent}
                for i, c in enumerate(p.canary_steps)]
        for s in out:
            s["last"] = s is out[-1]
        return out

    def _step_now(self, pid: str) -> dict[str, Any]:
        row = next((s for s in self.reg.staged() if s.id == pid), None)
        if row is None:
            raise RankoneError(f"patch {pid} is no longer staged")
        steps = self.steps()
        if row.canary == 0:
            step = steps[0]
        else:  # a canary share heal did not set (a person staged it) counts as the first step at or above it
            step = next((s for s in steps if s["kind"] == "canary" and s["canary"] >= row.canary), steps[-1])
        return dict(step, canary=row.canary, shadow=row.shadow)  # the shares actually staged

    def start(self, pid: str) -> None:
        first = self.steps()[0]
        self.reg.stage(pid, first["canary"], first["shadow"], actor="heal", reason=f"heal: {_name(first)}")
        self.started_here.add(pid)
        self.say(f"staged {pid}: {_name(first)}")

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, pid: str) -> Outcome:
        """Drive a staged patch until it is released, aborted or paused."""
        resumed = False
        while True:
            rec = self.reg.get(pid)
            if rec.state != "staged":
                return Outcome(pid, rec.state, f"patch {pid} is {rec.state}", len(self.users_seen))
            step = self._step_now(pid)
            pending = self._pending_decision(pid)
            if pending is not None:
                if pending.details["decision"] == "pause":
                    return Outcome(pid, "paused", f"paused at {_name(step)} (audit #{pending.seq}): promote or abort it "
                                                  "by hand, or stage it again to let heal go on", len(self.users_seen))
                self.say(f"carrying out the recorded decision #{pending.seq} ({pending.details['decision']}) for {pid}")
                out = self._act(pid, step, pending.details["decision"], pending.seq, pending.reason or "")
                if out is not None:
                    return out
                continue
            if not resumed and pid not in self.started_here:  # staged before this run: say so in the log
                record_event(self.reg, "heal-resume", pid, f"heal: resuming the rollout at {_name(step)}", {"step": step})
            resumed = True
            decision, seq = self._measure(pid, step)
            out = self._act(pid, step, decision.action, seq, decision.reason)
            if out is not None:
                return out

    def _pending_decision(self, pid: str) -> Any:
        """The latest decision after the latest stage entry of `pid` (None: the step is undecided)."""
        stage_seq = max((e.seq for e in self.reg.log(pid) if e.action == "stage"), default=0)
        later = [e for e in heal_events(self.reg, pid, "heal-decide") if e.seq > stage_seq]
        return later[-1] if later else None

    def _wait_served(self, pid: str, step: dict[str, Any], timeout_s: float = 120.0) -> None:
        """Until the server serves the patch at this step's percentages (it polls the registry)."""
        t0 = self.clock()
        while self.clock() - t0 < timeout_s:
            st = self.client.status()
            for arm in st.get("arms", []):
                for s in arm.get("staged", []):
                    if s["id"] == pid and s["canary"] == step["canary"] and s["shadow"] == step["shadow"]:
                        return
            self.sleep(min(1.0, self.policy.poll_s))
        raise RankoneError(f"the server at {self.client.url} did not pick up the staging of {pid} in {timeout_s:.0f} s; "
                           "is it serving this registry (--registry)?")

    def _measure(self, pid: str, step: dict[str, Any]) -> tuple[Decision, int]:
        self._wait_served(pid, step)
        stable = [r.id for r in self.reg.released()]
        window = Window(stable, stable + [pid], self.client.events(FAR, 1)["head"], self.clock())
        probes = self._probe_canary() if step["kind"] == "canary" else None
        self.say(f"{pid}: {_name(step)}: measuring" + (f" ({probes['n']} probes, {len(probes['regressions'])} "
                                                         "regressed on the canary)" if probes else ""))
        pol = {k: getattr(self.policy, k) for k in POLICY_KEYS}
        last_note = 0.0
        while True:
            while True:  # every event since the window began, page by page
                page = self.client.events(window.after, 5000)
                window.add(page)
                if window.after >= page["head"]:
                    break
            now = self.clock()
            evidence = window.evidence(now, probes)
            d = decide(evidence, pol, step)
            self.users_seen |= window.arms["canary"].users
            if d.action != "wait":
                seq = record_event(self.reg, "heal-decide", pid, f"heal: {_name(step)}: {d.action}: {d.reason}",
                                   {"decision": d.action, "step": step, "evidence": evidence, "policy": pol,
                                    "checks": d.checks})
                self.say(f"{pid}: {_name(step)}: {d.action} (audit #{seq}): {d.reason}")
                return d, seq
            if now - last_note > 30:
                last_note = now
                self.say(f"{pid}: {_name(step)}: waiting: {d.reason}")
            self.sleep(self.policy.poll_s)

    def _probe_canary(self) -> dict[str, Any]:
        """Every probe on stable and on the canary (pinned): those passing on stable and failing on the canary."""
        regress, protected = [], []
        for p in self.probes:
            n = answer_tokens(p.expected)
            if not says(self.client.answer(p.prompt, n, "stable")[0], p.expected):
                continue
            if not says(self.client.answer(p.prompt, n, "candidate")[0], p.expected):
                regress.append(p.prompt)
                if p.protected:
                    protected.append(p.prompt)
        return {"n": len(self.probes), "regressions": regress, "protected_regressions": protected}

    def _act(self, pid: str, step: dict[str, Any], action: str, seq: int, reason: str) -> Outcome | None:
        """Carry out a recorded decision; an Outcome when the rollout ended."""
        if action == "advance":
            steps = self.steps()
            nxt = steps[steps.index(next(s for s in steps if s["index"] == step["index"])) + 1]
            self.reg.stage(pid, nxt["canary"], nxt["shadow"], actor="heal", reason=f"heal: {_name(nxt)} (decision #{seq})")
            self.say(f"{pid}: on to {_name(nxt)}")
            return None
        if action == "promote":
            try:
                self.reg.promote(pid, actor="heal", reason=f"heal: every step passed (decision #{seq})", model=self.handle)
            except RankoneError as e:
                msg = f"heal: the release refused it: {' '.join(str(e).split())}"
                self.reg.abort(pid, actor="heal", reason=msg)
                return Outcome(pid, "aborted", msg, len(self.users_seen))
            return Outcome(pid, "released", reason, len(self.users_seen))
        if action == "abort":
            self.reg.abort(pid, actor="heal", reason=f"heal: {_name(step)} failed (decision #{seq}): {reason}"[:2000])
            return Outcome(pid, "aborted", reason, len(self.users_seen))
        if action == "pause":
            return Outcome(pid, "paused", reason, len(self.users_seen))
        raise ValueError(f"unknown decision {action!r}")


def _name(step: dict[str, Any]) -> str:
    if step["kind"] == "shadow":
        return f"the shadow step ({step['shadow']:g} % of stable requests re-run)"
    return f"canary step {step['index']} ({step['canary']:g} %)"
