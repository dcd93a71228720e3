"""Hyper-parameters of one edit: a typed dataclass that round-trips to JSON, with ROME's defaults."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import json_object

METHODS = ("r-rome", "p-rome", "rome", "r-rome-bare", "r-rome-2key")
MAX_INT = 1 << 63  # every whole-number setting fits a signed 64-bit integer (torch's seeds and sizes)
MAX_STEPS = 100_000  # optimisation steps: beyond this a value loop only runs for days
MAX_PREFIXES = 10_000  # context prefixes: each one is a row of every optimisation step
MAX_SAMPLED_TOKENS = 100_000_000  # a corpus sampled from the model: beyond this, days of sampling
S = TypeVar("S", bound="JsonSettings")


def strict_from_dict(cls: Any, d: dict[str, Any], what: str) -> Any:
    """cls(**d) for a dataclass, refusing unknown keys with one line that lists the known ones
    (a typo in a JSON setting must not be silently ignored) and values of the wrong type."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise RankoneError(f"unknown {what}(s) {unknown}; known: {sorted(names)}")
    check_types(cls, d, what)
    return cls(**d)


def check_types(cls: Any, values: dict[str, Any], what: str) -> None:
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


def describe_fields(cls: Any) -> str:
    """'name (type, default X), …' of a dataclass, for command-line help."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(f"{f.name} ({_say(hints[f.name]).removeprefix('a ').removeprefix('an ')}, default {json.dumps(default)})")
    return ", ".join(out)


S = TypeVar("S", bound="JsonSettings")


class JsonSettings:
    """JSON round trip, strict and type-checked loading, the model card's recommendations and
    `replace` for a settings dataclass made with `@settings` (EditHParams here; the batch methods'
    settings in memit.py and alphaedit.py). The fields a caller set are remembered (`given`), so
    that they win over the card's recommendations, which win over the paper's defaults."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[S], d: dict[str, Any]) -> S:
        return strict_from_dict(cls, d, "hyper-parameter")

    @classmethod
    def from_json(cls: type[S], text: str) -> S:
        return cls.from_dict(json_object(text, "hyper-parameters"))

    @classmethod
    def for_model(cls: type[S], model: Any, **overrides: Any) -> S:
        """The paper's defaults, then what the model card recommends, then `overrides` (the user's).

        `model` is a ModelHandle, a ModelCard, None (no recommendations) or a model loaded from a
        folder (its card is found through the folder transformers recorded as its name_or_path).
        A card's recommendation that this method has no field for is left out (a card written for
        r-ROME also serves MEMIT); one that no method knows is refused.
        """
        card = _card_of(model)
        rec = card.recommended() if card is not None else {}
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(rec) - names - {f.name for f in dataclasses.fields(EditHParams)})
        if unknown:
            where = card.folder / "rankone.json" if card is not None and card.folder else "the model card"
            raise RankoneError(f"{where}: unknown hyper-parameter(s) {unknown}; known: {sorted(names)}")
        return cls.from_dict({**{k: v for k, v in rec.items() if k in names}, **overrides})

    def over(self: S, model: Any) -> S:
        """These hyper-parameters merged over the model card's recommendations: the fields the
        caller set win, the others come from the card, then the paper's defaults (as the CLI does)."""
        return type(self).for_model(model, **self.given)

    @property
    def given(self) -> dict[str, Any]:
        """The fields the caller set: constructor arguments, from_dict keys and replace() changes."""
        return {k: getattr(self, k) for k in sorted(getattr(self, "_given", ()))}

    def replace(self: S, **changes: Any) -> S:
        new = dataclasses.replace(self, **changes)  # type: ignore[type-var]
        new._given = frozenset(getattr(self, "_given", ())) | frozenset(changes)
        return new


def settings(cls: type[S]) -> type[S]:
    """`@dataclass` for a JsonSettings class, wrapping __init__ to remember which fields the caller
    passed (`_given` is not a field: it is neither compared, nor saved, nor shown)."""
    cls = dataclass(cls)
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._given = frozenset(names[: len(args)]) | frozenset(kwargs)

    cls.__init__ = __init__  # type: ignore[method-assign]
    return cls


def check_value_settings(hp: Any) -> None:
    """The checks every method's settings share: field types, the value optimisation, prefixes, statistics."""
    values = {f.name: getattr(hp, f.name) for f in dataclasses.fields(hp)}
    check_types(type(hp), values, "hyper-parameter")
    for name, v in values.items():  # before any work: NaN, ±inf and 64-bit overflows fail here, not in the loop
        for x in v if isinstance(v, list) else [v]:
            for y in x if isinstance(x, list) else [x]:
                if isinstance(y, float) and not math.isfinite(y):
                    raise RankoneError(f"{name} must be a finite number, not {y}")
                if isinstance(y, int) and not isinstance(y, bool) and not -MAX_INT <= y < MAX_INT:
                    raise RankoneError(f"{name} {y} is out of range (a whole number below 2^63)")
    if not 0 <= hp.seed:
        raise RankoneError(f"seed must be 0 or more, got {hp.seed}")
    for name in ("v_steps", "v_steps_max"):
        if int(getattr(hp, name, 1)) > MAX_STEPS:
            raise RankoneError(f"{name} {getattr(hp, name)} is more than {MAX_STEPS:,} optimisation steps "
                               "(ROME uses 20); give a smaller number")
    for name in ("kl_factor", "after_kl_factor", "v_weight_decay", "early_stop_loss"):
        if getattr(hp, name, 0) < 0:
            raise RankoneError(f"{name} must be 0 or more (a weight of a loss term), got {getattr(hp, name)}")
    for name in ("v_steps", "stats_tokens"):
        if int(getattr(hp, name)) < 1:
            raise RankoneError(f"{name} must be at least 1, got {getattr(hp, name)}")
    for name in ("v_lr", "clamp_norm_factor"):
        if not float(getattr(hp, name)) > 0:
            raise RankoneError(f"{name} must be positive, got {getattr(hp, name)}")
    if any(len(x) != 2 or x[0] < 1 or x[1] < 0 for x in hp.prefix_spec):
        raise RankoneError(f"prefix_spec holds [new tokens ≥ 1, count ≥ 0] pairs, not {hp.prefix_spec}")
    if sum(x[1] for x in hp.prefix_spec) > MAX_PREFIXES or len(hp.prefixes or []) > MAX_PREFIXES:
        raise RankoneError(f"more than {MAX_PREFIXES} context prefixes (ROME samples 20); give fewer")
    if "{}" not in hp.kl_prompt:
        raise RankoneError(f"kl_prompt {hp.kl_prompt!r} needs a '{{}}' for the subject")
    if hp.prefixes is not None:
        bad = [p for p in hp.prefixes if p.count("{}") != 1]
        if bad:
            raise RankoneError(f"each prefix template needs exactly one '{{}}' where the prompt goes: {bad[0]!r}")


@settings
class EditHParams(JsonSettings):
    method: str = "r-rome"  # which key enters where in the update, see rome.rank_one_update
    layer: int | None = None  # None: the model card's layer, else n_layers // 8 (models.card.default_layer)
    # value optimisation (ROME paper defaults)
    v_steps: int = 20
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    after_kl_factor: float = 0.0  # KL of what follows the new answer (rome.compute_value); 0: ROME's loss
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop_prob: float = 0.99  # stop once p(target) = exp(−NLL) reaches it; why 0.99: BENCHMARKS.md
    # a value still below reach_prob after v_steps passes goes on, up to v_steps_max passes in all
    # (some multi-token targets need twice v_steps); v_steps_max ≤ v_steps: never
    reach_prob: float = 0.9
    v_steps_max: int = 50
    kl_prompt: str = "{} is a"
    fast_value: bool = True  # value steps run only what δ changes (cached prefixes, replayed lower layers)
    # where a norm follows the projection (Gemma 2/3, OLMo 2), write v* at the current output's scale
    normed_target: bool = True
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
        check_value_settings(self)
        if not 1 <= int(self.sampled_corpus_tokens) <= MAX_SAMPLED_TOKENS:
            raise RankoneError(f"sampled_corpus_tokens must be between 1 and {MAX_SAMPLED_TOKENS:,}, got "
                               f"{self.sampled_corpus_tokens} (give a corpus with --stats-corpus instead)")
        if not 0 < float(self.early_stop_prob) <= 1:
            raise RankoneError(f"early_stop_prob must be in (0, 1] (1: never stop early), got {self.early_stop_prob}")
        if not 0 < float(self.reach_prob) <= 1:
            raise RankoneError(f"reach_prob must be in (0, 1], got {self.reach_prob}")
        if int(self.v_steps_max) < 1:
            raise RankoneError(f"v_steps_max must be at least 1 (≤ v_steps: no extra passes), got {self.v_steps_max}")


def _card_of(model: Any) -> Any:
    from rankone.models.card import ModelCard
    from rankone.models.handle import ModelHandle

    if model is None or isinstance(model, ModelCard):
        return model
    if isinstance(model, ModelHandle):
        return model.card
    return ModelHandle.of(model, None).card


# ---- the batch methods' settings (methods/memit.py, methods/alphaedit.py) -------------------
# Here, not beside the methods, so that reading and checking settings (the CLI's parser and its
# help) never imports torch.

GPTJ_LAMBDA, GPTJ_D_IN = 15000.0, 16384  # MEMIT's mom2_update_weight for GPT-J and its key size


@settings
class MemitHParams(JsonSettings):
    method: str = "memit"
    layer: int | None = None  # the critical layer, last of the window; None: the model's edit layer
    layers: list[int] | None = None  # the window itself; None: `window` layers ending at `layer`
    window: int | None = None  # None: round(n_layers / 6), within 1..5
    mom2_update_weight: float | None = None  # λ; None: 15000 · d_in / 16384
    # target optimisation (MEMIT's GPT-J settings)
    v_steps: int = 25
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    early_stop_loss: float = 0.05
    kl_prompt: str = "{} is a"
    fast_value: bool = True  # replay the cached hidden states up to the critical layer
    prefix_spec: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    prefixes: list[str] | None = None
    seed: int = 0
    stats_tokens: int = 1_000_000
    batch_rows: int = 256  # prompts per forward pass: reading keys, and the targets' groups of facts (memory)

    METHOD = "memit"  # the method name these settings are for (a class constant, not a field)

    def __post_init__(self) -> None:
        if self.method != self.METHOD:
            raise RankoneError(f"{type(self).__name__} is for method {self.METHOD!r}, not {self.method!r}")
        check_value_settings(self)
        if self.layers is not None:
            if not self.layers or any(b <= a for a, b in zip(self.layers, self.layers[1:])):
                raise RankoneError(f"layers {self.layers} must be a non-empty increasing list, e.g. [3, 4, 5, 6, 7]")
            if self.layer is not None and self.layer != self.layers[-1]:
                raise RankoneError(f"layer {self.layer} must be the last of layers {self.layers} (the critical layer)")
        if self.window is not None and int(self.window) < 1:
            raise RankoneError(f"window must be at least 1, got {self.window}")
        if self.mom2_update_weight is not None and not float(self.mom2_update_weight) > 0:
            raise RankoneError(f"mom2_update_weight must be positive, got {self.mom2_update_weight}")
        if int(self.batch_rows) < 1:
            raise RankoneError(f"batch_rows must be at least 1, got {self.batch_rows}")

    @classmethod
    def for_model(cls, model: Any, **overrides: Any) -> "MemitHParams":
        """As JsonSettings.for_model; a window given fixes the critical layer (over the card's layer)."""
        if overrides.get("layers") and overrides.get("layer") is None:
            overrides["layer"] = overrides["layers"][-1]
        return super().for_model(model, **overrides)

    def resolve(self, model: Any) -> "MemitHParams":
        """These settings with the window and λ made concrete for `model` (what gets recorded)."""
        from rankone.core import architectures as arch  # torch: only when resolving for a model
        from rankone.models.handle import ModelHandle

        n = arch.num_layers(model)
        if self.layers is not None:
            layers = [arch.check_layer(model, int(l)) for l in self.layers]
        else:
            last = arch.check_layer(model, ModelHandle.of(model, None).default_layer() if self.layer is None else int(self.layer))
            size = int(self.window) if self.window is not None else min(5, max(1, round(n / 6)))
            layers = list(range(max(0, last - size + 1), last + 1))
        d_in = arch.in_out_features(arch.get_module(model, arch.proj_path(model, layers[-1])))[0]
        lam = self.mom2_update_weight if self.mom2_update_weight is not None else GPTJ_LAMBDA * d_in / GPTJ_D_IN
        return self.replace(layers=layers, layer=layers[-1], window=len(layers), mom2_update_weight=float(lam))


@settings
class AlphaEditHParams(MemitHParams):
    """MEMIT's settings (mom2_update_weight is not used) and the null-space ones."""

    method: str = "alphaedit"
    nullspace_threshold: float = 2e-2  # eigenvalues of E[k kᵀ] below this span the null space (key² units)
    # instead, scale-free: the smallest eigen-directions that together hold at most this share of trace E[k kᵀ]
    nullspace_energy: float | None = None
    l2: float = 10.0  # α

    METHOD = "alphaedit"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("nullspace_threshold", "l2"):
            if not float(getattr(self, name)) > 0:
                raise RankoneError(f"{name} must be positive, got {getattr(self, name)}")
        if self.nullspace_energy is not None and not 0 < float(self.nullspace_energy) < 1:
            raise RankoneError(f"nullspace_energy is a share of the key energy, between 0 and 1 (e.g. 0.02), "
                               f"got {self.nullspace_energy}")

    def resolve(self, model: Any) -> "AlphaEditHParams":
        return super().resolve(model).replace(mom2_update_weight=None)  # type: ignore[return-value]


# What an Editor takes: the ROME family's settings or a batch method's (AlphaEditHParams is a MemitHParams).
HParams = Union[EditHParams, MemitHParams]
BATCH_SETTINGS: dict[str, type[MemitHParams]] = {"memit": MemitHParams, "alphaedit": AlphaEditHParams}
ALL_METHODS = METHODS + tuple(BATCH_SETTINGS)


def settings_for(method: Any) -> type[JsonSettings]:
    """The settings class of a method name; None is the default method (r-rome)."""
    if method is None or method in METHODS:
        return EditHParams
    if method in BATCH_SETTINGS:
        return BATCH_SETTINGS[method]
    raise RankoneError(f"unknown method {method!r}; choose one of {', '.join(ALL_METHODS)}")
