"""Heal's policy: one JSON file with defaults, validated like the gate policy.

Unknown keys, values of the wrong type and values out of range are refused with one line naming
the key; keys starting with "_" are comments. `gates` is a gate policy (`GatePolicy`) for the
validation of heal's patches; by default it allows a held-out perplexity rise of 5 %.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankone.core.errors import RankoneError
from rankone.lifecycle.gates import GatePolicy
from rankone.methods.base import METHODS
from rankone.methods.settings import policy_file, policy_from_dict


@dataclass
class HealPolicy:
    # triage
    k_users: int = 3  # distinct users who must give the same correction (unless a trusted source gives it)
    trusted_only: bool = False  # act on trusted sources only (probes, token-authenticated reporters)
    trusted_reporters: list[str] | None = None  # reporter names that count as trusted (None: every token reporter)
    quiet_s: float = 30.0  # propose once no correction has become actionable for this long ...
    max_wait_s: float = 600.0  # ... or once the first actionable one has waited this long
    max_corrections: int = 64  # corrections in one patch
    # subject finding (causal tracing's corruption over the prompt's word spans)
    subject_max_words: int = 5
    subject_min_drop: float = 0.3  # the best span must lower p(answer) by this share of p(answer) at least
    subject_ambiguity: float = 0.5  # another span (not nested) as short with this share of the drop: ambiguous
    subject_min_p: float = 0.1  # the model's current answer must have at least this probability
    subject_noise_samples: int = 10
    subject_noise_factor: float = 3.0
    # the patch
    method_one: str = "r-rome"  # one correction
    method_many: str = "alphaedit"  # several, on top of the released patches' keys
    hparams: dict[str, Any] = field(default_factory=dict)  # {method: {its settings}} over the model card's
    stats_corpus: str | None = None  # key statistics corpus (default: the model's)
    recompute_missed: bool = True  # a correction whose edit misses its target: computed again without it
    # (false: the patch is kept as computed, the missed correction is not checked by the gates and its reports are skipped)
    # validation
    gates: dict[str, Any] = field(default_factory=lambda: {"max_perplexity_rise": 0.05})
    heldout_text: str | None = None  # held-out text file for perplexity (default: the model folder's corpus.txt)
    heldout_chars: int = 20_000
    probe_sample: int = 20  # passing probes (besides the protected ones) the patch must keep
    # rollout
    adopt_staged: bool = False  # also drive patches staged by people (not only heal's own)
    shadow_percent: float = 50.0  # the shadow step: stable requests re-run on the candidate
    shadow_min_comparisons: int = 30  # unrelated-prompt comparisons before the shadow step decides
    canary_steps: list[float] = field(default_factory=lambda: [5.0, 25.0, 100.0])
    canary_shadow_percent: float = 20.0  # shadow kept on during canary steps
    min_requests: int = 50  # canary requests per step before it decides
    step_timeout_s: float = 1800.0  # inconclusive after this long: pause
    max_unrelated_disagreement: float = 0.1  # shadow disagreement on prompts about no edited subject
    max_error_rate_increase: float = 0.01  # canary error rate above stable's by more (and significant): abort
    max_p95_ratio: float = 1.5  # canary p95 latency above stable's × this + slack: abort
    p95_slack_s: float = 0.25
    alpha: float = 0.05  # one-sided significance of the two-proportion tests
    max_probe_regressions: int = 0  # unprotected probes passing now that may fail on the canary (and in the gates)
    poll_s: float = 5.0  # how often a rollout reads the server
    probe_interval_s: float = 60.0  # the probes run on stable at most this often (and after every release)
    watch_interval_s: float = 15.0  # --watch: seconds between cycles
    # a server that is down or answers errors
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    retry_total_s: float = 300.0
    # after a release, compact the release (rankone.lifecycle.compact) once this many patches are released (None: never)
    compact_after_patches: int | None = None

    def __post_init__(self) -> None:
        ints = {"k_users": 1, "max_corrections": 1, "subject_max_words": 1, "subject_noise_samples": 1, "heldout_chars": 100,
                "probe_sample": 0, "shadow_min_comparisons": 0, "min_requests": 1, "max_probe_regressions": 0}
        for name, low in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise RankoneError(f"heal policy {name} must be a whole number of at least {low}, not {v!r}")
        for name in ("quiet_s", "max_wait_s", "subject_noise_factor", "step_timeout_s", "max_error_rate_increase",
                     "p95_slack_s", "poll_s", "probe_interval_s", "watch_interval_s", "retry_initial_s", "retry_max_s", "retry_total_s"):
            _number(name, getattr(self, name), 0, math.inf)
        for name in ("subject_min_drop", "subject_ambiguity", "subject_min_p", "max_unrelated_disagreement", "alpha"):
            _number(name, getattr(self, name), 0, 1)
        _number("max_p95_ratio", self.max_p95_ratio, 1, math.inf)
        for name in ("shadow_percent", "canary_shadow_percent"):
            _number(name, getattr(self, name), 0, 100)
        if not self.canary_steps or any(not 0 < s <= 100 for s in self.canary_steps) \
                or list(self.canary_steps) != sorted(set(self.canary_steps)) or self.canary_steps[-1] != 100:
            raise RankoneError(f"heal policy canary_steps must rise strictly from above 0 to 100 %, e.g. [5, 25, 100], "
                               f"not {self.canary_steps!r}")
        for name in ("method_one", "method_many"):
            if getattr(self, name) not in METHODS:
                raise RankoneError(f"heal policy {name} must be one of {', '.join(METHODS)}, not {getattr(self, name)!r}")
        for name, hp in self.hparams.items():
            if name not in METHODS or not isinstance(hp, dict):
                raise RankoneError(f"heal policy hparams maps a method ({', '.join(METHODS)}) to its settings object, "
                                   f"not {name!r}: {hp!r}")
            from rankone.methods.base import method, user_settings

            try:
                user_settings(method(name), dict(hp, method=name))
            except RankoneError as e:
                raise RankoneError(f"heal policy hparams {name}: {e}") from None
        if self.compact_after_patches is not None and (isinstance(self.compact_after_patches, bool)
                                                       or self.compact_after_patches < 2):
            raise RankoneError(f"heal policy compact_after_patches must be null or at least 2, not {self.compact_after_patches!r}")
        self.gate_policy()  # its own checks, named as heal's

    def settings(self, method: str) -> dict[str, Any]:
        """The method's settings as the Editor takes them: the method and the policy's settings for it."""
        return {"method": method, **self.hparams.get(method, {})}

    def gate_policy(self) -> GatePolicy:
        return GatePolicy.from_dict(self.gates, "heal policy gates")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "heal policy") -> "HealPolicy":
        return policy_from_dict(cls, d, source, "heal policy key")

    @classmethod
    def load(cls, path: str | os.PathLike | None) -> "HealPolicy":
        """The policy in a JSON file (relative paths inside it are read from its folder), or the defaults."""
        if path is None:
            return cls()
        p = Path(path)
        d = policy_file(p, "heal policy file")
        pol = cls.from_dict(d, str(p))
        for name in ("stats_corpus", "heldout_text"):
            v = getattr(pol, name)
            if v is not None and not Path(v).is_absolute():
                setattr(pol, name, str(p.parent / v))
        return pol


def _number(name: str, v: Any, low: float, high: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not low <= v <= high:
        rng = f"from {low:g} to {high:g}" if math.isfinite(high) else f"of at least {low:g}"
        raise RankoneError(f"heal policy {name} must be a number {rng}, not {v!r}")
