"""Hyper-parameters of one edit: a typed dataclass that round-trips to JSON, with ROME's defaults."""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Callable

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
    layer: int | None = None  # None: the model card's layer, else n_layers // 4 (models.card.default_layer)
    # value optimisation (ROME paper defaults)
    v_steps: int = 20
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 0.05
    kl_prompt: str = "{} is a"
    fast_value: bool = True  # replay cached hidden states below the edited layer
    # keys: prefixes sampled from the model, (new tokens, count) pairs; or given verbatim
    prefix_spec: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    prefixes: list[str] | None = None
    seed: int = 0
    # key statistics
    stats_tokens: int = 1_000_000

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RankoneError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name in ("v_steps", "stats_tokens"):
            if int(getattr(self, name)) < 1:
                raise RankoneError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("v_lr", "clamp_norm_factor"):
            if not float(getattr(self, name)) > 0:
                raise RankoneError(f"{name} must be positive, got {getattr(self, name)}")
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
        """The paper's defaults, then what the model card recommends, then `overrides` (the user's).

        `model` is a ModelHandle, a ModelCard, None (no recommendations) or a model loaded from a
        folder (its card is found through the folder transformers recorded as its name_or_path).
        """
        card = _card_of(model)
        rec = card.recommended() if card is not None else {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(rec) - names)
        if unknown:
            where = card.folder / "rankone.json" if card is not None and card.folder else "the model card"
            raise RankoneError(f"{where}: unknown hyper-parameter(s) {unknown}; known: {sorted(names)}")
        return cls.from_dict({**rec, **overrides})

    def over(self, model: Any) -> "EditHParams":
        """These hyper-parameters merged over the model card's recommendations: the fields the
        caller set win, the others come from the card, then the paper's defaults (as the CLI does)."""
        return type(self).for_model(model, **self.given)

    @property
    def given(self) -> dict[str, Any]:
        """The fields the caller set: constructor arguments, from_dict keys and replace() changes."""
        return {k: getattr(self, k) for k in sorted(getattr(self, "_given", ()))}

    def replace(self, **changes: Any) -> "EditHParams":
        new = dataclasses.replace(self, **changes)
        new._given = frozenset(getattr(self, "_given", ())) | frozenset(changes)
        return new


def _record_given(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap the dataclass __init__ to remember which fields the caller passed (not a field itself:
    it is neither compared, nor saved, nor shown)."""
    names = [f.name for f in dataclasses.fields(EditHParams)]

    @functools.wraps(init)
    def __init__(self: EditHParams, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._given = frozenset(names[: len(args)]) | frozenset(kwargs)

    return __init__


EditHParams.__init__ = _record_given(EditHParams.__init__)  # type: ignore[method-assign]


def _card_of(model: Any) -> Any:
    from rankone.models.card import ModelCard
    from rankone.models.handle import ModelHandle

    if model is None or isinstance(model, ModelCard):
        return model
    if isinstance(model, ModelHandle):
        return model.card
    return ModelHandle.of(model, None).card
