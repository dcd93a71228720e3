"""Settings of an editing method: a frozen dataclass that round-trips to JSON, loaded strictly.

Every method's settings class (`rome.RomeSettings`, `memit.MemitSettings`, ...) derives from
`MethodSettings`, which holds what every method shares: which layer, the seed, the key
statistics' budget and the context templates. They are merged once, explicitly,

    paper defaults (the class's field defaults)  ←  model card (rankone.json "hparams", "layer")
                                                 ←  the user's (--hparams, flags, a dict in Python)

by `methods.base.resolve_settings`, then made concrete for the model (`resolve`: the layer, a
window, λ) and frozen: that object is what the edit runs with and what the patch records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TypeVar

from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import json_object, read_text

S = TypeVar("S", bound="MethodSettings")
T = TypeVar("T")
MAX_INT = 1 << 63  # every whole-number setting fits a signed 64-bit integer (torch's seeds and sizes)
MAX_STEPS = 100_000  # optimisation steps: beyond this a value loop only runs for days
MAX_PREFIXES = 10_000  # context prefixes: each one is a row of every optimisation step
MAX_SAMPLED_TOKENS = 100_000_000  # a corpus sampled from the model: beyond this, days of sampling


# ---- strict, typed loading ------------------------------------------------------------------


def strict_from_dict(cls: Any, d: Mapping[str, Any], what: str) -> Any:
    """cls(**d) for a dataclass, refusing unknown keys with one line that lists the known ones
    (a typo in a JSON setting must not be silently ignored) and values of the wrong type."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise RankoneError(f"unknown {what}(s) {unknown}; known: {sorted(names)}")
    check_types(cls, d, what)
    return cls(**d)


def policy_from_dict(cls: type[T], d: Mapping[str, Any], source: str, what: str = "policy key") -> T:
    """A policy dataclass from its JSON object: keys starting with "_" are comments, the rest go
    through `strict_from_dict`; a refusal names `source` (the file, or the policy it sits in)."""
    keys = {k: v for k, v in d.items() if not k.startswith("_")}
    try:
        return strict_from_dict(cls, keys, what)
    except RankoneError as e:
        raise RankoneError(f"{source}: {e}") from None


def policy_file(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The JSON object in a policy file; `what` names the file in the message ("heal policy file")."""
    p = Path(path)
    if not p.is_file():
        raise RankoneError(f"{what} {p} does not exist")
    return json_object(read_text(p, f"{what} {p}"), f"{what} {p}")


def check_types(cls: Any, values: Mapping[str, Any], what: str) -> None:
    """Each value against its dataclass field's annotation (int, float, str, bool, lists, None)."""
    hints = typing.get_type_hints(cls)
    for name, v in values.items():
        t = hints.get(name)
        if t is not None and not _fits(v, t):
            raise RankoneError(f"{what} {name} must be {_say(t)}, not {json.dumps(v) if _jsonable(v) else repr(v)}")


def _fits(v: Any, t: Any) -> bool:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if t is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(v, a) for a in args)
    if t is type(None):
        return v is None
    if t is bool:
        return isinstance(v, bool)
    if t is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if t is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if origin in (list, tuple):
        return isinstance(v, (list, tuple)) and all(_fits(x, args[0]) for x in v) if args else isinstance(v, (list, tuple))
    if origin is dict or t is dict:
        return isinstance(v, dict)
    return isinstance(v, t) if isinstance(t, type) else True


_NAMES = {int: ("a whole number", "whole numbers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "true/false values"), type(None): ("null", "nulls"), dict: ("an object", "objects")}


def _say(t: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_say(a, plural) for a in args)
    if origin in (list, tuple):
        return ("lists" if plural else "a list") + (f" of {_say(args[0], True)}" if args else "")
    names = _NAMES.get(t, (getattr(t, "__name__", str(t)),) * 2)
    return names[plural]


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def describe_fields(cls: Any, skip: frozenset[str] = frozenset()) -> str:
    """'name (type, default X), …' of a dataclass, for command-line help."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(f"{f.name} ({_say(hints[f.name]).removeprefix('a ').removeprefix('an ')}, default {json.dumps(default)})")
    return ", ".join(out)


# ---- the settings every method shares ---------------------------------------------------------


@dataclass(frozen=True)
class MethodSettings:
    """What every method has. A subclass adds its own fields (with defaults: the paper's) and may
    override `check` (field rules, run on construction) and `resolve` (made concrete for a model)."""

    method: str = ""
    layer: int | None = None  # the edited layer (a window's last, critical layer); None: the model card's, else n_layers // 8
    seed: int = 0  # of the sampled context prefixes and of a corpus sampled from the model
    stats_tokens: int = 1_000_000  # tokens of the statistics corpus behind C = E[k kᵀ]
    # when the model has no corpus: tokens sampled from it. 20,000 is nowhere worse than 100,000 tokens
    # of natural text by more than 0.01 on 100 CounterFact cases of SmolLM2 and of Gemma 3 (BENCHMARKS.md,
    # "How many sampled tokens the statistics need")
    sampled_corpus_tokens: int = 20_000
    # the context templates keys and values average over: prefixes sampled from the model as
    # (new tokens, count) pairs, or given verbatim (each with one "{}" where the prompt goes)
    prefix_spec: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    prefixes: list[str] | None = None

    def __post_init__(self) -> None:
        values = self.to_dict()
        check_types(type(self), values, "hyper-parameter")
        for name, v in values.items():  # before any work: NaN, ±inf and 64-bit overflows fail here, not in a loop
            for x in v if isinstance(v, list) else [v]:
                for y in x if isinstance(x, list) else [x]:
                    if isinstance(y, float) and not math.isfinite(y):
                        raise RankoneError(f"{name} must be a finite number, not {y}")
                    if isinstance(y, int) and not isinstance(y, bool) and not -MAX_INT <= y < MAX_INT:
                        raise RankoneError(f"{name} {y} is out of range (a whole number below 2^63)")
        self.check()

    @classmethod
    def serves(cls, name: str) -> bool:
        """Whether these settings are for the method `name` (by default: their own `method` default)."""
        return name == cls.__dataclass_fields__["method"].default

    def check(self) -> None:
        """Refuse values out of range, before any work (one line naming the field)."""
        if not self.serves(self.method):
            raise RankoneError(f"{type(self).__name__} is for method {type(self).__dataclass_fields__['method'].default!r}, "
                               f"not {self.method!r}")
        if int(self.stats_tokens) < 1:
            raise RankoneError(f"stats_tokens must be at least 1, got {self.stats_tokens}")
        if not 1 <= int(self.sampled_corpus_tokens) <= MAX_SAMPLED_TOKENS:
            raise RankoneError(f"sampled_corpus_tokens must be between 1 and {MAX_SAMPLED_TOKENS:,}, got "
                               f"{self.sampled_corpus_tokens} (give a corpus with --stats-corpus instead)")
        if self.seed < 0:
            raise RankoneError(f"seed must be 0 or more, got {self.seed}")
        if self.layer is not None and self.layer < 0:
            raise RankoneError(f"layer must be 0 or more, got {self.layer}")
        if any(len(x) != 2 or x[0] < 1 or x[1] < 0 for x in self.prefix_spec):
            raise RankoneError(f"prefix_spec holds [new tokens ≥ 1, count ≥ 0] pairs, not {self.prefix_spec}")
        if sum(x[1] for x in self.prefix_spec) > MAX_PREFIXES or len(self.prefixes or []) > MAX_PREFIXES:
            raise RankoneError(f"more than {MAX_PREFIXES} context prefixes (ROME samples 20); give fewer")
        if self.prefixes is not None:
            bad = [p for p in self.prefixes if p.count("{}") != 1]
            if bad:
                raise RankoneError(f"each prefix template needs exactly one '{{}}' where the prompt goes: {bad[0]!r}")

    def resolve(self: S, handle: Any) -> S:
        """These settings made concrete for the model of `handle` (a ModelHandle): the layer."""
        layer = handle.default_layer() if self.layer is None else self.layer
        return self.replace(layer=handle.check_layer(layer))

    @property
    def layers(self) -> list[int]:
        """Every layer an edit writes (one, unless a method spreads it over a window)."""
        if self.layer is None:
            raise RankoneError("the settings are not resolved for a model yet (no layer)")
        return [self.layer]

    @classmethod
    def merge(cls, card: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
        """The explicit merge: the card's recommendations for fields this method has, then the user's."""
        names = {f.name for f in dataclasses.fields(cls)}
        return {**{k: v for k, v in card.items() if k in names}, **user}

    # -- JSON --

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[S], d: Mapping[str, Any]) -> S:
        return strict_from_dict(cls, d, "hyper-parameter")

    @classmethod
    def from_json(cls: type[S], text: str) -> S:
        return cls.from_dict(json_object(text, "hyper-parameters"))

    def replace(self: S, **changes: Any) -> S:
        return dataclasses.replace(self, **changes)


def check_value_loop(s: Any) -> None:
    """The checks the value optimisations share (ROME's δ, MEMIT's targets): finite and in range."""
    for name in ("v_steps", "v_steps_max"):
        if not hasattr(s, name):
            continue
        if int(getattr(s, name)) < 1:
            raise RankoneError(f"{name} must be at least 1, got {getattr(s, name)}")
        if int(getattr(s, name)) > MAX_STEPS:
            raise RankoneError(f"{name} {getattr(s, name)} is more than {MAX_STEPS:,} optimisation steps "
                               "(ROME uses 20); give a smaller number")
    for name in ("v_lr", "clamp_norm_factor"):
        v = float(getattr(s, name))
        if not (math.isfinite(v) and v > 0):
            raise RankoneError(f"{name} must be a positive finite number, got {getattr(s, name)}")
    for name in ("kl_factor", "v_weight_decay"):
        if not float(getattr(s, name)) >= 0:
            raise RankoneError(f"{name} must be 0 or more (a weight of a loss term), got {getattr(s, name)}")
    if "{}" not in s.kl_prompt:
        raise RankoneError(f"kl_prompt {s.kl_prompt!r} needs a '{{}}' for the subject")
