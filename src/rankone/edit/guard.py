"""The guard: refuse an anomalous rank-one update before it is written.

Why it exists: original ROME's update divides by k_oᵀC⁻¹k̄ (bare key against averaged key), which
can be tiny or negative; the update then has a huge ‖Δ‖_F and disables the model. The guard
compares each update with the ones accepted so far:

    refuse if ‖Δ‖_F or the denominator is not finite, or the denominator ≤ 0;
    after `warmup` accepted updates, refuse if ‖Δ‖_F > norm_factor · median(accepted ‖Δ‖_F)   (the spike rule)
                                     or denominator < median(accepted denominators) / denom_factor

(a small denominator is what blows ‖Δ‖ up; a large one only makes the update small, which is
harmless). Use as `Editor.edit(requests, guard=Guard())`; any callable (computed step, its
requests) → reason-or-None works there.

A batch (MEMIT, AlphaEdit) is judged as a whole, by the same rules on its ‖Δ‖ per fact:
‖ΣBA‖_F over its layers (√Σ_l ‖B_l A_l‖²_F) / √n for n facts (what each fact costs if their updates
are orthogonal; comparable between batches of different sizes, and for n = 1 the edit's ‖Δ‖_F).
Batch methods have no denominator, so only the norm rules apply.
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any, Sequence

from rankone.core.errors import RankoneError
from rankone.core.tokens import EditRequest
from rankone.methods.base import Computed

log = logging.getLogger(__name__)


def norm_spike(delta_fro: float, previous: Sequence[float], factor: float, warmup: int) -> str | None:
    """The spike rule: ‖Δ‖_F above `factor` × the median of the previous ones (once there are
    `warmup` of them), said in words; None when it is not a spike."""
    if len(previous) < warmup or not previous:
        return None
    med = statistics.median(previous)
    if delta_fro > factor * med:
        return f"‖Δ‖_F = {delta_fro:.3g} is {delta_fro / med:.1f}× the running median {med:.3g} (limit {factor:g}×)"
    return None


class Guard:
    """Refuse an update whose ‖Δ‖_F or denominator is anomalous against the updates accepted so far."""

    def __init__(self, norm_factor: float = 10.0, denom_factor: float = 10.0, warmup: int = 5) -> None:
        if not (norm_factor > 1 and denom_factor > 1 and warmup >= 1):
            raise RankoneError("guard factors must be > 1 and its warm-up at least 1 edit")
        self.norm_factor, self.denom_factor, self.warmup = norm_factor, denom_factor, warmup
        self.norms: list[float] = []
        self.denoms: list[float] = []
        self.refused: list[dict[str, Any]] = []

    def check(self, delta_fro: float, denom: float | None = None) -> str | None:
        """The reason to refuse an update of this ‖Δ‖_F and denominator (None: a batch, which has none)."""
        if not (math.isfinite(delta_fro) and (denom is None or math.isfinite(denom))):
            return f"non-finite update (‖Δ‖_F={delta_fro}, denominator={denom})"
        if denom is None:
            return norm_spike(delta_fro, self.norms, self.norm_factor, self.warmup)
        if denom <= 0:
            return f"denominator kᵀC⁻¹k = {denom:.3g} ≤ 0 (the keys disagree; ‖Δ‖_F would be {delta_fro:.3g})"
        spike = norm_spike(delta_fro, self.norms, self.norm_factor, self.warmup)
        if spike:
            return spike
        if len(self.denoms) >= self.warmup:
            dmed = statistics.median(self.denoms)
            if denom < dmed / self.denom_factor:
                return (f"denominator kᵀC⁻¹k = {denom:.3g} is {dmed / denom:.1f}× below the running median "
                        f"{dmed:.3g} (limit {self.denom_factor:g}×)")
        return None

    def accept(self, delta_fro: float, denom: float | None = None) -> None:
        self.norms.append(float(delta_fro))
        if denom is not None:
            self.denoms.append(float(denom))

    def __call__(self, c: Computed, requests: Sequence[EditRequest]) -> str | None:
        """A step's computed update: a rank-one edit is judged by its ‖Δ‖_F and denominator, a batch
        of n by its ‖Δ‖ per fact (no denominator)."""
        per_fact = c.delta_fro / math.sqrt(len(requests))
        why = self.check(per_fact, c.denominator)
        if why:
            self.refused.append({"requests": [r.to_dict() for r in requests], "reason": why, "delta_fro": c.delta_fro,
                                 "delta_fro_per_fact": per_fact, "denominator": c.denominator})
            log.warning("guard refused %s -> %s%s: %s", requests[0].text()[0], requests[0].target,
                        f" and {len(requests) - 1} more" if len(requests) > 1 else "", why)
        else:
            self.accept(per_fact, c.denominator)
        return why
