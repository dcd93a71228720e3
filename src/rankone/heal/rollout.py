"""A rollout step's evidence and its decision: promote, go on, abort or pause.

A step reads the server's event log (GET /api/events) from the moment the step began: requests
answered by the canary (the released patches plus the staged one) and by stable over the same
window, the shadow comparisons of the candidate, and the reports on either's answers. Heal's
own pinned requests are left out. The evidence is plain JSON, and `decide(evidence, policy)`
is a pure function of it: every decision's audit entry holds both, so it can be replayed.

Checks (a canary step; the shadow step has only the shadow check):
    requests        at least min_requests canary requests, else wait
    error rate      canary above stable by more than max_error_rate_increase, and significant
                    (one-sided two-proportion z-test at alpha): fail
    p95 latency     canary p95 > max_p95_ratio × stable p95 + p95_slack_s: fail
    shadow          disagreement on prompts about no edited subject above max_unrelated_disagreement,
                    and significant (one-sided exact binomial test at alpha: 4 of 38 is no evidence
                    against a 10 % limit), once shadow_min_comparisons are in (the shadow step
                    waits for them): fail
    wrong feedback  canary's `wrong` reports per request above stable's, significant: fail
    probes          more than max_probe_regressions probes that pass on stable fail on the canary
                    (any protected one counts): fail at once, without waiting
A fail aborts; all passing moves on (promote after the last step); waiting past step_timeout_s
pauses (inconclusive: a person decides).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rankone.heal.policy import HealPolicy

POLICY_KEYS = ("min_requests", "shadow_min_comparisons", "max_unrelated_disagreement", "max_error_rate_increase",
               "max_p95_ratio", "p95_slack_s", "alpha", "max_probe_regressions", "step_timeout_s")


def nearest_rank(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def two_proportion_p(x1: int, n1: int, x2: int, n2: int) -> float:
    """One-sided p-value that proportion 1 (x1 of n1) exceeds proportion 2 (pooled z-test); 1.0 when undefined."""
    if n1 == 0 or n2 == 0:
        return 1.0
    p = (x1 + x2) / (n1 + n2)
    if p in (0.0, 1.0):
        return 1.0
    z = (x1 / n1 - x2 / n2) / math.sqrt(p * (1 - p) * (1 / n1 + 1 / n2))
    return 0.5 * math.erfc(z / math.sqrt(2))


def binomial_p_above(x: int, n: int, rate: float) -> float:
    """One-sided p-value that x of n comes from a rate above `rate`: P(X ≥ x) for X ~ Bin(n, rate)."""
    if x <= 0 or n == 0:
        return 1.0
    if rate <= 0.0:
        return 0.0
    if rate >= 1.0:
        return 1.0
    logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(rate)
            + (n - k) * math.log1p(-rate) for k in range(x, n + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


@dataclass
class _Arm:
    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    users: set[str] = field(default_factory=set)
    wrong: int = 0
    right: int = 0

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "p95_s": nearest_rank(self.latencies, 0.95),
                "users": len(self.users), "wrong": self.wrong, "right": self.right}


class Window:
    """Events of one step, split into canary and stable by the patch set that answered."""

    def __init__(self, stable: list[str], canary: list[str], after: int, started: float) -> None:
        self.stable, self.canary = list(stable), list(canary)
        self.after = self.first = after  # the last event seen
        self.started = started
        self.arms = {"canary": _Arm(), "stable": _Arm()}
        self.shadow: dict[str, list[int]] = {}  # scope -> [comparisons, disagreements]
        self.missed = 0
        self.canary_users: set[str] = set()

    def _arm(self, patches: list[str]) -> str | None:
        return "canary" if patches == self.canary else "stable" if patches == self.stable else None

    def add(self, page: dict[str, Any]) -> None:
        if page["first"] > self.after + 1:
            self.missed += page["first"] - self.after - 1  # the server's log turned over before we read it
        for ev in page["events"]:
            if ev["seq"] <= self.after:
                continue
            self.after = ev["seq"]
            kind = ev["kind"]
            if kind == "shadow":
                if ev.get("patches") == self.canary:
                    c = self.shadow.setdefault(ev["scope"], [0, 0])
                    c[0] += 1
                    c[1] += 0 if ev["agree"] else 1
                continue
            if ev.get("arm") not in ("stable", "candidate"):
                continue  # refused before routing, or a pin (heal's own probes)
            arm = self._arm(ev.get("patches") or [])
            if arm is None:
                continue
            a = self.arms[arm]
            if kind == "request" and not ev.get("pin"):
                a.requests += 1
                if ev["status"] >= 400:
                    a.errors += 1
                elif ev.get("latency_s") is not None:
                    a.latencies.append(float(ev["latency_s"]))
                if ev.get("user"):
                    a.users.add(ev["user"])
            elif kind == "feedback":
                if ev["verdict"] == "wrong":
                    a.wrong += 1
                else:
                    a.right += 1

    def evidence(self, now: float, probes: dict[str, Any] | None) -> dict[str, Any]:
        return {"window": {"after_seq": self.first, "to_seq": self.after, "seconds": round(now - self.started, 3),
                           "missed_events": self.missed},
                "canary": self.arms["canary"].summary(), "stable": self.arms["stable"].summary(),
                "shadow": {s: {"comparisons": c[0], "disagreements": c[1]} for s, c in sorted(self.shadow.items())},
                "probes": probes}


@dataclass
class Decision:
    action: str  # advance | promote | abort | pause | wait
    checks: list[dict[str, Any]]
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "reason": self.reason, "checks": self.checks}


def decide(evidence: dict[str, Any], policy: HealPolicy | dict[str, Any], step: dict[str, Any]) -> Decision:
    """The decision for one step from its evidence. `step`: {"kind": "shadow"|"canary", "index", "last"}."""
    pol = policy if isinstance(policy, dict) else {k: getattr(policy, k) for k in POLICY_KEYS}
    checks: list[dict[str, Any]] = []

    def check(name: str, status: str, detail: str, **numbers: Any) -> None:
        checks.append({"check": name, "status": status, "detail": detail, **numbers})

    c, s = evidence["canary"], evidence["stable"]
    un = evidence["shadow"].get("unrelated", {"comparisons": 0, "disagreements": 0})
    n_sh, d_sh = un["comparisons"], un["disagreements"]
    if n_sh >= pol["shadow_min_comparisons"] and n_sh > 0:
        rate, limit = d_sh / n_sh, pol["max_unrelated_disagreement"]
        p = binomial_p_above(d_sh, n_sh, limit)
        ok = rate <= limit or p >= pol["alpha"]
        check("shadow", "pass" if ok else "fail", f"unrelated-prompt disagreement {d_sh}/{n_sh} = {rate:.3f} "
              f"(limit {limit}, p = {p:.3g})", value=rate, limit=limit, p=p)
    elif step["kind"] == "shadow" and pol["shadow_min_comparisons"] > 0:
        check("shadow", "wait", f"{n_sh} of {pol['shadow_min_comparisons']} unrelated-prompt comparisons")
    if step["kind"] == "canary":
        probes = evidence.get("probes") or {}
        regress = probes.get("regressions", [])
        protected = probes.get("protected_regressions", [])
        if probes:
            ok = len(regress) <= pol["max_probe_regressions"] and not protected
            check("probes", "pass" if ok else "fail",
                  f"{len(regress)} probe(s) that pass on stable fail on the canary"
                  + (f", {len(protected)} protected" if protected else "") + (f": {regress[:3]}" if regress else ""),
                  value=len(regress), limit=pol["max_probe_regressions"])
        if c["requests"] < pol["min_requests"]:
            check("requests", "wait", f"{c['requests']} of {pol['min_requests']} canary requests")
        else:
            check("requests", "pass", f"{c['requests']} canary requests, {s['requests']} stable")
            er_c, er_s = c["errors"] / c["requests"], (s["errors"] / s["requests"] if s["requests"] else 0.0)
            p = two_proportion_p(c["errors"], c["requests"], s["errors"], s["requests"])
            bad = er_c - er_s > pol["max_error_rate_increase"] and p < pol["alpha"]
            check("error_rate", "fail" if bad else "pass", f"canary {er_c:.4f} vs stable {er_s:.4f} (p = {p:.3g})",
                  value=er_c, baseline=er_s, p=p)
            if c["p95_s"] is not None and s["p95_s"] is not None:
                limit = pol["max_p95_ratio"] * s["p95_s"] + pol["p95_slack_s"]
                check("p95_latency", "fail" if c["p95_s"] > limit else "pass",
                      f"canary {c['p95_s']:.3f} s vs stable {s['p95_s']:.3f} s (limit {limit:.3f} s)",
                      value=c["p95_s"], limit=limit)
            p = two_proportion_p(c["wrong"], c["requests"], s["wrong"], s["requests"])
            bad = p < pol["alpha"]
            check("wrong_feedback", "fail" if bad else "pass",
                  f"canary {c['wrong']}/{c['requests']} vs stable {s['wrong']}/{s['requests']} wrong reports (p = {p:.3g})",
                  p=p)
    failed = [x for x in checks if x["status"] == "fail"]
    waiting = [x for x in checks if x["status"] == "wait"]
    if failed:
        return Decision("abort", checks, "; ".join(f"{x['check']}: {x['detail']}" for x in failed))
    if waiting:
        if evidence["window"]["seconds"] > pol["step_timeout_s"]:
            return Decision("pause", checks, "inconclusive after "
                            f"{evidence['window']['seconds']:.0f} s: " + "; ".join(x["detail"] for x in waiting))
        return Decision("wait", checks, "; ".join(x["detail"] for x in waiting))
    action = "promote" if step["kind"] == "canary" and step["last"] else "advance"
    return Decision(action, checks, "every check passed: " + "; ".join(f"{x['check']}: {x['detail']}" for x in checks))
