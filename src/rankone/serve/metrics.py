"""Per-arm metrics: Prometheus series for scrapers, totals and time buckets for /api/status.

vLLM counts adapter traffic under the base model; here every figure is kept per arm (stable,
candidate, base, pin) so that a canary can be compared with stable over the same window, by a
person on the dashboard or by a program reading /api/status. Everything lives in objects the
server holds (its own CollectorRegistry): two servers in one process never mix their counts.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RECENT = 1000  # requests per arm that the totals' percentiles are taken over


def percentile(xs: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by the nearest-rank rule; None for no values."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


@dataclass
class _ArmCounts:
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    unkeyed: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    ttfts: deque = field(default_factory=lambda: deque(maxlen=RECENT))

    def add(self, ok: bool, latency: float, ttft: float | None, tokens: int, keyed: bool) -> None:
        self.requests += 1
        self.errors += 0 if ok else 1
        self.tokens += tokens
        self.unkeyed += 0 if keyed else 1
        if ok:
            self.latencies.append(latency)
            if ttft is not None:
                self.ttfts.append(ttft)

    def summary(self, seconds: float | None = None) -> dict[str, Any]:
        lat, ttft = list(self.latencies), list(self.ttfts)
        out = {"requests": self.requests, "errors": self.errors, "tokens": self.tokens, "unkeyed": self.unkeyed,
               "error_rate": self.errors / self.requests if self.requests else 0.0,
               "latency_p50_s": percentile(lat, 0.5), "latency_p95_s": percentile(lat, 0.95),
               "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95)}
        if seconds is not None:
            out["requests_per_s"] = self.requests / seconds
            out["tokens_per_s"] = self.tokens / seconds
        return out


@dataclass
class _Bucket:
    t0: float
    arms: dict[str, _ArmCounts] = field(default_factory=dict)
    shadow: dict[str, list[int]] = field(default_factory=dict)  # scope -> [comparisons, disagreements]


class Metrics:
    def __init__(self, bucket_s: float = 5.0, n_buckets: int = 120, clock: Callable[[], float] = time.time) -> None:
        self.bucket_s, self.clock = bucket_s, clock
        self.started = clock()
        r = self.registry = CollectorRegistry()
        self.requests = Counter("rankone_requests", "Requests answered, by arm and HTTP status", ["arm", "status"], registry=r)
        self.unkeyed = Counter("rankone_unkeyed_requests", "Requests with no user key (routed at random)", ["arm"], registry=r)
        self.latency = Histogram("rankone_request_latency_seconds", "Request latency", ["arm"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.ttft = Histogram("rankone_time_to_first_token_seconds", "Time to the first generated token", ["arm"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("rankone_generated_tokens", "Tokens generated", ["arm"], registry=r)
        self.shadow = Counter("rankone_shadow_comparisons", "Shadow re-runs compared with the stable answer", ["scope"],
                              registry=r)
        self.shadow_dis = Counter("rankone_shadow_disagreements", "Shadow re-runs whose answer differed", ["scope"],
                                  registry=r)
        self.staged = Gauge("rankone_staged_percent", "Staged patches' canary and shadow percentages", ["patch", "kind"],
                            registry=r)
        self.patchset = Info("rankone_patchset", "The patch set of each arm", ["arm"], registry=r)
        self.reports = Counter("rankone_feedback_reports", "User feedback on answers, by the arm that answered and verdict",
                               ["arm", "verdict"], registry=r)
        self._feedback: dict[str, dict[str, int]] = {}
        self._totals: dict[str, _ArmCounts] = {}
        self._shadow_totals: dict[str, list[int]] = {}
        self._series: deque[_Bucket] = deque(maxlen=n_buckets)
        self._lock = threading.Lock()

    # ---- recording ------------------------------------------------------------------------------

    def request(self, arm: str, status: int, latency: float, ttft: float | None, tokens: int, keyed: bool = True) -> None:
        ok = status < 400
        self.requests.labels(arm, str(status)).inc()
        if ok:
            self.latency.labels(arm).observe(latency)
            if ttft is not None:
                self.ttft.labels(arm).observe(ttft)
        if tokens:
            self.tokens.labels(arm).inc(tokens)
        if not keyed:
            self.unkeyed.labels(arm).inc()
        with self._lock:
            for counts in (self._totals.setdefault(arm, _ArmCounts()), self._bucket().arms.setdefault(arm, _ArmCounts())):
                counts.add(ok, latency, ttft, tokens, keyed)

    def shadow_result(self, scope: str, agree: bool) -> None:
        self.shadow.labels(scope).inc()
        if not agree:
            self.shadow_dis.labels(scope).inc()
        with self._lock:
            for d in (self._shadow_totals, self._bucket().shadow):
                c = d.setdefault(scope, [0, 0])
                c[0] += 1
                c[1] += 0 if agree else 1

    def feedback(self, arm: str, verdict: str) -> None:
        self.reports.labels(arm, verdict).inc()
        with self._lock:
            counts = self._feedback.setdefault(arm, {"right": 0, "wrong": 0})
            counts[verdict] = counts.get(verdict, 0) + 1

    def arms_changed(self, patchsets: list[dict[str, Any]], staged: list[tuple[str, float, float]]) -> None:
        """Info series per arm (digest, patches, state) and the staged percentages."""
        self.patchset.clear()
        for ps in patchsets:
            self.patchset.labels(ps["arm"]).info({"digest": ps["digest"], "patches": ",".join(ps["patches"]),
                                                  "state": ps["state"]})
        self.staged.clear()
        for pid, canary, shadow in staged:
            self.staged.labels(pid, "canary").set(canary)
            self.staged.labels(pid, "shadow").set(shadow)

    def _bucket(self) -> _Bucket:
        t0 = math.floor(self.clock() / self.bucket_s) * self.bucket_s
        if not self._series or self._series[-1].t0 != t0:
            self._series.append(_Bucket(t0))
        return self._series[-1]

    # ---- reading --------------------------------------------------------------------------------

    def prometheus(self) -> bytes:
        return generate_latest(self.registry)

    def totals(self) -> dict[str, Any]:
        with self._lock:
            up = max(self.clock() - self.started, 1e-9)
            return {"arms": {a: c.summary(up) for a, c in sorted(self._totals.items())},
                    "feedback": {a: dict(c) for a, c in sorted(self._feedback.items())},
                    "shadow": {s: {"comparisons": c[0], "disagreements": c[1]} for s, c in sorted(self._shadow_totals.items())}}

    def series(self) -> dict[str, Any]:
        """Per bucket: each arm's request rate, error rate, p50/p95 latency, tokens/s; shadow disagreement."""
        with self._lock:
            out = []
            for b in self._series:
                arms = {}
                for a, c in b.arms.items():
                    s = c.summary(self.bucket_s)
                    arms[a] = {k: s[k] for k in ("requests_per_s", "error_rate", "latency_p50_s", "latency_p95_s",
                                                 "tokens_per_s")}
                n = sum(c[0] for c in b.shadow.values())
                out.append({"t": b.t0, "arms": arms,
                            "shadow_disagreement": (sum(c[1] for c in b.shadow.values()) / n) if n else None})
            return {"bucket_s": self.bucket_s, "buckets": out}
