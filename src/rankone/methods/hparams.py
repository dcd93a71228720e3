"""Hyper-parameters of one edit: a typed dataclass that round-trips to JSON, with ROME's defaults."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from rankone.core.errors import RankoneError

METHODS = ("r-rome", "p-rome", "rome")


def strict_from_dict(cls: Any, d: dict[str, Any], what: str) -> Any:
    """cls(**d) for a dataclass, refusing unknown keys with one line that lists the known ones
    (a typo in a JSON setting must not be silently ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise RankoneError(f"unknown {what}(s) {unknown}; known: {sorted(names)}")
    return cls(**d)


@dataclass
class EditHParams:
    method: str = "r-rome"  # which key enters where in the update, see rome.rank_one_update
    layer: int | None = None  # None: the model's recorded edit layer, else n_layers // 4
    # value optimisation (ROME paper defaults)
    v_steps: int = 20
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop_prob: float = 0.95  # stop once p(target) = exp(−NLL) reaches it (v_steps: the cap)
    kl_prompt: str = "{} is a"
    fast_value: bool = True  # value steps run only what δ changes (cached prefixes, replayed lower layers)
    # keys: prefixes sampled from the model, (new tokens, count) pairs; or given verbatim
    prefix_spec: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    prefixes: list[str] | None = None
    seed: int = 0
    # key statistics
    stats_tokens: int = 1_000_000
    sampled_corpus_tokens: int = 100_000  # when the model has no corpus: tokens sampled from it

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RankoneError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("v_steps", "stats_tokens", "sampled_corpus_tokens"):
            if int(getattr(self, name)) < 1:
                raise RankoneError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("v_lr", "clamp_norm_factor"):
            if not float(getattr(self, name)) > 0:
                raise RankoneError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < float(self.early_stop_prob) <= 1:
            raise RankoneError(f"early_stop_prob must be in (0, 1] (1: never stop early), got {self.early_stop_prob}")
        if "{}" not in self.kl_prompt:
            raise RankoneError(f"kl_prompt {self.kl_prompt!r} needs a '{{}}' for the subject")
        if self.prefixes is not None:
            bad = [p for p in self.prefixes if p.count("{}") != 1]
            if bad:
                raise RankoneError(f"each prefix template needs exactly one '{{}}' where the prompt goes: {bad[0]!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditHParams":
        return strict_from_dict(cls, d, "hyper-parameter")

    @classmethod
    def from_json(cls, text: str) -> "EditHParams":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise RankoneError(f"hyper-parameters are not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise RankoneError("hyper-parameters must be a JSON object")
        return cls.from_dict(d)

    @classmethod
    def for_model(cls, model: Any, **overrides: Any) -> "EditHParams":
        """The paper's defaults, then what the model folder recommends, then `overrides`."""
        from rankone.models.load import recommended_hparams

        names = {f.name for f in dataclasses.fields(cls)}
        rec = {k: v for k, v in recommended_hparams(model).items() if k in names}
        return cls.from_dict({**rec, **overrides})

    def replace(self, **changes: Any) -> "EditHParams":
        return dataclasses.replace(self, **changes)
