"""What every editing method provides, and the one table that names them.

A method is one module. It defines a settings class (a `MethodSettings` with the paper's
defaults) and a `Method`: given the edit context (the model handle, the context templates, the
key statistics C of a layer, the keys earlier edits wrote) and some requests, it computes, for
each layer it edits, the update as rank-k factors ΔW = B A (B [out, k], A [k, in]). Nothing is
written by the method: the Editor (rankone.edit.editor) merges the factors, records the patch
and measures the outcome, the same way for every method. Rank one is k = 1.

    name        settings          one step edits           factors per step
    r-rome …    RomeSettings      one request              one layer, k = 1
    memit       MemitSettings     the whole batch          each window layer, k = n requests
    alphaedit   AlphaEditSettings the whole batch          each window layer, k = n
    emmet       EmmetSettings     the whole batch          each window layer, k = n

`METHODS` maps each name to "module:attribute" of its Method; it is read by the CLI (choices and
help), the Editor, eval and the sequential bench, and imported only when a method is used. Adding
a method is one module and one line here.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NamedTuple, Protocol, Sequence

import torch

from rankone.core.errors import RankoneError
from rankone.core.tokens import EditRequest
from rankone.methods.settings import MethodSettings

if TYPE_CHECKING:
    from rankone.methods.stats import LayerStats
    from rankone.models.handle import ModelHandle

DEFAULT_METHOD = "r-rome"

METHODS: dict[str, str] = {
    "r-rome": "rankone.methods.rome:R_ROME",
    "p-rome": "rankone.methods.rome:P_ROME",
    "rome": "rankone.methods.rome:ROME",
    "r-rome-bare": "rankone.methods.rome:R_ROME_BARE",
    "r-rome-2key": "rankone.methods.rome:R_ROME_2KEY",
    "memit": "rankone.methods.memit:MEMIT",
    "alphaedit": "rankone.methods.alphaedit:ALPHAEDIT",
    "emmet": "rankone.methods.emmet:EMMET",
}


def lowrank_fro(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B A‖_F without forming B A: ‖BA‖² = Σᵢⱼ (BᵀB)ᵢⱼ (AAᵀ)ᵢⱼ. B [out, k], A [k, in]."""
    b, a = B.double(), A.double()
    return float(((b.T @ b) * (a @ a.T)).sum().clamp_min(0).sqrt())


class LayerUpdate(NamedTuple):
    """One layer's update: ΔW = B A, to be added to the [out, in] weight of the projection at `module`."""

    module: str
    layer: int
    B: torch.Tensor  # [out, k] float64
    A: torch.Tensor  # [k, in] float64
    diagnostics: dict[str, Any]  # JSON-able, recorded with this layer's edit
    keys: torch.Tensor | None = None  # [in, k] float64: the keys this layer was solved with (kept in the patch)


@dataclass
class Computed:
    """What a method computed for one step (nothing written yet)."""

    updates: list[LayerUpdate]  # lowest layer first
    diagnostics: dict[str, Any] = field(default_factory=dict)  # JSON-able, recorded with every edit of the step
    denominator: float | None = None  # a rank-one update's kᵀC⁻¹k, which the guard watches; None for a batch
    detail: Any = None  # the method's intermediate results (ROME: the key and the value), for analysis

    @property
    def delta_fro(self) -> float:
        """‖ΔW‖_F over the step's layers: √Σ_l ‖B_l A_l‖²_F."""
        return float(sum(lowrank_fro(u.B, u.A) ** 2 for u in self.updates) ** 0.5)


class EditInputs(Protocol):
    """What the Editor's context gives a method (rankone.edit.context.EditContext)."""

    handle: "ModelHandle"
    cache_dir: Any  # where derived results are kept on disk (None: the user's cache)

    def templates(self, settings: MethodSettings) -> list[str]:
        """"{}" (the bare prompt, always first) and the context templates of these settings."""

    def stats(self, layers: Sequence[int], n_tokens: int) -> dict[int, "LayerStats"]:
        """C of each layer's projection input, measured once per context (missing layers in one pass)."""

    def preserved(self, layer: int, in_features: int) -> torch.Tensor:
        """[in, n_p] float64: the keys earlier edits kept in this model wrote at `layer`."""

    def memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        """A value derived once per context (e.g. AlphaEdit's null-space basis of a layer)."""


@dataclass
class PreservedKeys:
    """K_p per layer [in, n_p] float64: the keys of earlier edits that are kept in the model (AlphaEdit
    keeps their outputs). Patches carry their keys, so `of_patches` rebuilds exactly what an unbroken
    run holds, from a run's checkpointed patch or a registry's released patches in release order."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of_patches(cls, patches: Iterable[Any]) -> "PreservedKeys":
        store = cls()
        for p in patches:
            store.add_patch(p)
        return store

    def add_patch(self, patch: Any) -> None:
        for e in patch.edits:
            if e.keys is not None:
                self.add(e.layer, e.keys)

    def get(self, layer: int, in_features: int) -> torch.Tensor:
        k = self.keys.get(layer)
        if k is None:
            return torch.zeros(in_features, 0, dtype=torch.float64)
        if k.shape[0] != in_features:
            raise RankoneError(f"preserved keys of layer {layer} have {k.shape[0]} features, the layer has {in_features}: "
                               "they belong to another model")
        return k

    def add(self, layer: int, K: torch.Tensor) -> None:
        K = K.detach().to("cpu", torch.float64)
        self.keys[layer] = torch.cat([self.get(layer, K.shape[0]), K], dim=1)

    def count(self, layer: int) -> int:
        return 0 if layer not in self.keys else int(self.keys[layer].shape[1])


# A batch method's solve at one layer: (inputs, settings, layer, K [in, n], R [out, n]) -> (B, A,
# diagnostics), the update B A that writes R at the keys K, from the weights as they are.
Solver = Callable[[EditInputs, Any, int, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor, dict[str, Any]]"]


@dataclass(frozen=True)
class Method:
    name: str
    settings: type[MethodSettings]
    compute: Callable[[EditInputs, Sequence[EditRequest], Any], Computed]
    one_at_a_time: bool  # True: each request is its own step, on the model with the earlier ones merged
    summary: str  # one line for --help
    # forward passes a step runs at most, for the progress display: (settings, requests, templates) -> passes
    planned_passes: Callable[[Any, int, int], int] = lambda s, n, t: 0
    # the solve alone, given keys and what to write at them (the batch methods); a compaction
    # (rankone.edit.compaction) re-solves released edits with it
    solver: Solver | None = None


def method(name: str | None) -> Method:
    """The Method of a name in the table (None: the default method)."""
    name = name or DEFAULT_METHOD
    if name not in METHODS:
        raise RankoneError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module, attr = METHODS[name].split(":")
    found = getattr(importlib.import_module(module), attr)
    if not isinstance(found, Method) or found.name != name:
        raise RankoneError(f"the method table's entry for {name!r} ({METHODS[name]}) is not that Method")
    return found


def settings_fields() -> set[str]:
    """Every settings field any method knows (a model card may recommend any of them)."""
    return {f.name for name in METHODS for f in dataclasses.fields(method(name).settings)}


def user_settings(m: Method, given: Mapping[str, Any]) -> MethodSettings:
    """The user's settings checked alone (names, types, ranges), before any model is loaded."""
    return m.settings.from_dict({**given, "method": m.name})


def resolve_settings(handle: "ModelHandle", given: MethodSettings | Mapping[str, Any] | str | None = None
                     ) -> MethodSettings:
    """The one merge: paper defaults ← the model card ← `given` (the user's, "method" among them),
    made concrete for the model (layer, window, λ) and frozen. `given` may also be a method name,
    or a settings object, which is taken as complete (only a layer it leaves open is the model's)."""
    if isinstance(given, MethodSettings):
        return given.resolve(handle)
    given = {"method": given} if isinstance(given, str) else dict(given or {})
    m = method(given.get("method"))
    card = handle.card.recommended() if handle.card is not None else {}
    unknown = sorted(set(card) - settings_fields())
    if unknown:
        raise RankoneError(f"{handle.card.file or 'the model card'}: unknown hyper-parameter(s) "
                           f"{unknown}; known: {sorted(settings_fields())}")
    merged = m.settings.merge(card, given)
    merged["method"] = m.name
    return m.settings.from_dict(merged).resolve(handle)


def question(r: EditRequest) -> tuple[str, str]:
    """What a request asks (its prompt and subject, case and spacing aside): a batch asks each once."""
    return " ".join(r.prompt.lower().split()), r.subject.strip().lower()


def check_batch(requests: Sequence[EditRequest]) -> None:
    """A batch is at least one request, and asks each question (prompt and subject) once."""
    if not requests:
        raise RankoneError("no requests to edit: give at least one prompt/subject/target")
    seen: dict[tuple[str, str], str] = {}
    for r in requests:
        q = question(r)
        if q in seen:
            raise RankoneError(f"the batch asks {r.text()[0]!r} twice (targets {seen[q]!r} and {r.target!r}); "
                               "give each fact once per batch")
        seen[q] = r.target
