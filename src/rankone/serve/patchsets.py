"""Patch sets and arms: what each response is produced with.

A *patch set* is the base model plus patches in order; its digest names it in every response.
The *stable* arm is the base with the released patches merged into the weights, once and
exactly (`apply_patch`'s float64 merge, so its bits are those of `rankone apply`). Every other
patch set is stable plus low-rank deltas added in the forward pass of the rows that use it
(`rankone.serve.deltas`): the *candidate* (stable + the staged patches), *base* (stable minus
the released patches), a pinned patch. One copy of the model serves them all.

New stable weights are computed off the serving thread, on a detached copy of just the touched
modules (`StableBuilder`), and copied in between requests by the engine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from rankone.artifacts.patch import Patch, apply_patch, refuse_misfits
from rankone.core import architectures as arch
from rankone.core.errors import RankoneError

Factors = tuple[torch.Tensor, torch.Tensor]  # (A [k, in], B [out, k]): y += (x Aᵀ) Bᵀ


def patchset_digest(base_fp: str, ids: Iterable[str]) -> str:
    """The content digest of the base model plus these patches, in order: `rk_` + 16 hex."""
    body = json.dumps({"base": base_fp, "patches": list(ids)}, separators=(",", ":"))
    return "rk_" + hashlib.sha256(body.encode()).hexdigest()[:16]


def delta_factors(patches: Iterable[Patch], sign: float = 1.0, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> dict[str, Factors]:
    """{module: (A, B)}: every edit of the patches on a module side by side, so that one
    (x Aᵀ) Bᵀ adds Σ Bᵢ Aᵢ x (A [Σk, in] rows stacked, B [out, Σk] columns side by side)."""
    a: dict[str, list[torch.Tensor]] = {}
    b: dict[str, list[torch.Tensor]] = {}
    for p in patches:
        for e in p.edits:
            a.setdefault(e.module, []).append(e.A)
            b.setdefault(e.module, []).append(e.B * sign)
    return {m: (torch.cat(a[m], 0).to(device, dtype).contiguous(), torch.cat(b[m], 1).to(device, dtype).contiguous())
            for m in a}


def subjects_of(patches: Iterable[Patch]) -> tuple[str, ...]:
    """The edited subjects, for telling whether a prompt mentions one (shadow scope)."""
    return tuple(sorted({f["subject"] for p in patches for f in p.facts() if f.get("subject")}))


@dataclass(frozen=True)
class PatchSet:
    """A response's patch set: `ids` in order (released first), and the deltas on top of stable."""
    arm: str  # stable | candidate | base | pin
    ids: tuple[str, ...]
    digest: str
    stable_digest: str  # the stable weights these deltas are relative to
    deltas: dict[str, Factors] = field(default_factory=dict, compare=False, repr=False)
    subjects: tuple[str, ...] = ()  # subjects edited by the delta patches (not by stable)

    def describe(self) -> dict[str, object]:
        return {"arm": self.arm, "digest": self.digest, "patches": list(self.ids)}


@dataclass(frozen=True)
class Staged:
    """A staged patch as routing sees it."""
    id: str
    canary: float
    shadow: float
    patch: Patch = field(compare=False, repr=False)


@dataclass
class Arms:
    """The patch sets served now. Immutable once published, except the cache of partial candidates."""
    base_fp: str
    released: tuple[tuple[str, Patch], ...]
    staged: tuple[Staged, ...]
    dtype: torch.dtype
    device: torch.device | str
    version: int = 0  # the registry's audit head it was read at
    known: dict[str, str] = field(default_factory=dict)  # every registered patch id -> its state (for pins)
    _cache: dict[tuple[str, ...], PatchSet] = field(default_factory=dict, repr=False)

    @property
    def stable_ids(self) -> tuple[str, ...]:
        return tuple(i for i, _ in self.released)

    @property
    def stable(self) -> PatchSet:
        return self._get(("stable",), lambda: PatchSet("stable", self.stable_ids, self._digest(self.stable_ids),
                                                       self._digest(self.stable_ids)))

    @property
    def base(self) -> PatchSet:
        """The base model: stable minus the released patches (nothing to subtract before a release)."""
        return self._get(("base",), lambda: PatchSet(
            "base", (), self._digest(()), self.stable.digest,
            delta_factors([p for _, p in self.released], -1.0, self.dtype, self.device)))

    @property
    def candidate(self) -> PatchSet | None:
        return self.with_deltas([s.id for s in self.staged], "candidate") if self.staged else None

    def with_deltas(self, ids: list[str], arm: str, extra: dict[str, Patch] | None = None) -> PatchSet:
        """Stable plus these patches (staged ones, or `extra` given by id) as deltas."""
        known = {s.id: s.patch for s in self.staged} | dict(extra or {})
        ids = [i for i in ids if i not in self.stable_ids]
        if not ids:
            return self.stable
        key = (arm, *ids)

        def make() -> PatchSet:
            ps = [known[i] for i in ids]
            full = self.stable_ids + tuple(ids)
            return PatchSet(arm, full, self._digest(full), self.stable.digest,
                            delta_factors(ps, 1.0, self.dtype, self.device), subjects_of(ps))
        return self._get(key, make)

    def _digest(self, ids: tuple[str, ...]) -> str:
        return patchset_digest(self.base_fp, ids)

    def _get(self, key: tuple[str, ...], make) -> PatchSet:  # noqa: ANN001
        if key not in self._cache:
            if len(self._cache) > 64:  # partial candidates of many staged patches: bounded
                self._cache.clear()
            self._cache[key] = make()
        return self._cache[key]


class StableBuilder:
    """Stable weights for a release chain, computed on a detached copy of the touched modules.

    It keeps the base weights of every module a chain has touched (read from the live model
    before it first changes them), so any later chain, a rollback included, is merged from the
    base exactly as `rankone apply` merges it, and checked the same way (fingerprints, finite).
    """

    def __init__(self, model: nn.Module, spec: arch.ArchSpec | None = None) -> None:
        self.model, self.spec = model, spec or arch.spec_for(model)
        self.base_weights: dict[str, torch.Tensor] = {}  # module -> base weight [out, in]

    def remember(self, modules: Iterable[str]) -> None:
        """Copy the base weights of modules not seen before (they are still the base: call this
        before any chain touching them is swapped in)."""
        for m in modules:
            if m not in self.base_weights:
                self.base_weights[m] = arch.weight_oi(arch.get_module(self.model, m)).detach().clone()

    def shell(self, modules: Iterable[str]) -> nn.Module:
        """A module tree holding fresh modules of the same kind at these paths, with base weights
        (the live model is only read: the engine may be running it)."""
        from transformers.pytorch_utils import Conv1D

        root = nn.Module()
        for path in sorted(set(modules)):
            oi = self.base_weights[path]  # [out, in]
            if arch.is_conv1d(arch.get_module(self.model, path)):
                mod: nn.Module = Conv1D(oi.shape[0], oi.shape[1])
                mod.weight = nn.Parameter(oi.T.clone(), requires_grad=False)  # Conv1D keeps [in, out]
            else:
                mod = nn.Linear(oi.shape[1], oi.shape[0], bias=False, dtype=oi.dtype, device=oi.device)
                mod.weight = nn.Parameter(oi.clone(), requires_grad=False)
            parent = root
            *parents, leaf = path.split(".")
            for name in parents:
                if not hasattr(parent, name):
                    parent.add_module(name, nn.Module())
                parent = getattr(parent, name)
            parent.add_module(leaf, mod)
        return root

    def build(self, chain: list[Patch], check: Iterable[Patch] = ()) -> dict[str, torch.Tensor]:
        """{module: weight [out, in]} of base + chain, for every module any chain has touched.

        `check`: patches that must apply on top of the chain (the staged ones); they are merged
        on a second copy and dropped, so a patch that does not fit is refused here with apply's
        own message, exactly as `rankone apply --patch ...released --patch STAGED` would.
        """
        check = list(check)
        for p in [*chain, *check]:  # fit is judged on the live model; the shell holds only the touched modules
            refuse_misfits(self.model, p, self.spec)
        self.remember({e.module for p in [*chain, *check] for e in p.edits})
        root = self.shell(self.base_weights)
        apply_patch(root, chain, fitted=True)
        out = {m: arch.weight_oi(arch.get_module(root, m)).detach().clone() for m in self.base_weights}
        if check:
            apply_patch(self.shell(self.base_weights), chain + check, fitted=True)
        return out


def swap_in(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy stable weights into the live model (the engine calls this with no request in flight)."""
    with torch.no_grad():
        for m, w in weights.items():
            target = arch.weight_oi(arch.get_module(model, m))
            if target.shape != w.shape:
                raise RankoneError(f"stable weight for {m} is {list(w.shape)}, the model's is {list(target.shape)}")
            target.copy_(w)
