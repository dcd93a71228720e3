"""Compaction: a chain of patches re-solved as one update per module, from the base weights.

Every edit of a patch records what it wrote on its module: ΔW_j = B_j A_j (B [out, k], A [k, in])
and, for a batch edit, the keys K_j [in, k] it was solved with. A rank-one edit's key is
recovered from A and C exactly: ROME's A = (C⁻¹k)ᵀ / (kᵀC⁻¹k) gives k = C Aᵀ / (A C Aᵀ), and any
rank-k A without keys gives K = C Aᵀ (A C Aᵀ)⁻¹ (so that A K = I).

Per module, with every key of the chain side by side, K [in, N] (oldest first), the targets are
what the chain adds at each key, relative to the base weights W₀:

    written   T_i = Σ_{j ≤ i} B_j A_j k_i   what edit i made the module output at its key when it
                                             was written (its own constraint, later edits' drift
                                             at k_i left out; the default)
    released  T_i = Σ_j B_j A_j k_i          what the whole release outputs at k_i now

A key that points along a later one (sin² of their C⁻¹-angle below `duplicate_sin2`: the same
subject edited again, or two relations of one subject that share the key) is superseded by the
later one, as it is in the chain. Then one solve from W₀ in float64 on C's cached factor:

    emmet      ΔW = T (KᵀC⁻¹K + λI)⁻¹ KᵀC⁻¹        least C-norm update with ΔW K = T (λ relaxes it)
    memit      ΔW = T (λI + KᵀC⁻¹K)⁻¹ KᵀC⁻¹        MEMIT's λC-regularised least squares
    alphaedit  ΔW = T (Û X)ᵀ, X = (ÛᵀKKᵀÛ + αI)⁻¹ÛᵀK   confined to C's null space Û

(each the solver of its entry in the method table, `rankone.methods.base.METHODS`, with its
settings resolved as an edit resolves them, on inputs that keep no earlier keys: from the base,
nothing else is kept). The result is one edit per module of rank N (the
keys kept), which carries K and the facts behind them, so it can be compacted again, and records
the statistics it was solved with. `compact` makes that patch; `rankone.lifecycle.compact`
releases it in place of a registry's chain.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from rankone.artifacts.patch import Patch, library_versions, make_edit
from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import tensor_sha256
from rankone.core.util import user_name, utcnow
from rankone.edit.context import EditContext
from rankone.methods.base import METHODS, Method, method, resolve_settings
from rankone.methods.settings import MethodSettings, strict_from_dict
from rankone.methods.stats import LayerStats
from rankone.models.handle import ModelHandle

DEFAULT_COMPACT = "emmet"
TARGET_MODES = ("written", "released")


def compact_methods() -> tuple[str, ...]:
    """The methods a chain can be compacted with: those of the method table with a solver (a
    batch solve from given keys and targets), the default first."""
    names = [n for n in METHODS if method(n).solver is not None]
    return tuple(sorted(names, key=lambda n: n != DEFAULT_COMPACT))


@dataclass(frozen=True)
class CompactSettings:
    """How a chain is compacted. `hparams` are the solving method's own settings (e.g.
    {"emmet_lambda": 0}, {"mom2_update_weight": 5000}, {"l2": 1, "nullspace_energy": 0.02},
    {"stats_tokens": 100000}); what they leave open is the model card's, then the paper's."""

    method: str = DEFAULT_COMPACT
    targets: str = "written"
    hparams: dict[str, Any] = field(default_factory=dict)
    duplicate_sin2: float = 1e-6  # an earlier key this close (sin² of the C⁻¹-angle) to a later one is superseded

    def __post_init__(self) -> None:
        if self.method not in compact_methods():
            raise RankoneError(f"compaction solves with one of {', '.join(compact_methods())}, not {self.method!r}")
        if self.targets not in TARGET_MODES:
            raise RankoneError(f"compaction targets are {' or '.join(TARGET_MODES)}, not {self.targets!r}")
        if not isinstance(self.hparams, dict) or "method" in self.hparams:
            raise RankoneError("compaction hparams are a JSON object of the method's settings (without 'method')")
        if not 0 <= float(self.duplicate_sin2) < 1:
            raise RankoneError(f"duplicate_sin2 is between 0 and 1, got {self.duplicate_sin2}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CompactSettings":
        return strict_from_dict(cls, d, "compaction setting")


@dataclass
class _Column:
    """One key of the chain on a module: which edit wrote it, and the fact behind it."""

    edit: int  # index of the edit (in chain order) on this module
    fact: dict[str, str]


@dataclass
class _Module:
    """The chain's edits of one module, oldest first."""

    module: str
    layer: int
    B: list[torch.Tensor] = field(default_factory=list)  # [out, k_j] float64
    A: list[torch.Tensor] = field(default_factory=list)  # [k_j, in] float64
    K: list[torch.Tensor] = field(default_factory=list)  # [in, n_j] float64
    columns: list[_Column] = field(default_factory=list)
    recovered: int = 0  # keys recovered from A and C (edits that carry none)
    first_before: str = ""  # the base fingerprint: the first edit's sha256_before


def recover_keys(A: torch.Tensor, st: LayerStats) -> torch.Tensor:
    """K [in, k] = C Aᵀ (A C Aᵀ)⁻¹, so A K = I: for ROME's A = (C⁻¹k)ᵀ/(kᵀC⁻¹k), exactly k."""
    a = A.to("cpu", torch.float64)
    cat = st.mom2 @ a.T  # [in, k] C Aᵀ
    return torch.linalg.solve(a @ cat, cat.T).T.contiguous()  # (A C Aᵀ)⁻¹ is symmetric


def _gather(patches: Sequence[Patch], stats_of: Any) -> dict[str, _Module]:
    mods: dict[str, _Module] = {}
    for p in patches:
        for e in p.edits:
            m = mods.setdefault(e.module, _Module(e.module, e.layer, first_before=e.sha256_before))
            A = e.A.double()
            K = e.keys if e.keys is not None else recover_keys(A, stats_of(e.layer))
            m.recovered += 0 if e.keys is not None else K.shape[1]
            facts = e.facts if len(e.facts) == K.shape[1] else [e.request] * K.shape[1]
            idx = len(m.B)
            m.B.append(e.B.double())
            m.A.append(A)
            m.K.append(K.double())
            m.columns += [_Column(idx, dict(f)) for f in facts]
    return mods


def chain_targets(m: _Module, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(K [in, N], T [out, N]): every key of the module's chain and its target (module docstring)."""
    K = torch.cat(m.K, dim=1)
    owner = torch.tensor([c.edit for c in m.columns])  # [N] which edit each key belongs to
    rows = torch.cat([torch.full((a.shape[0],), j) for j, a in enumerate(m.A)])  # [Σk] which edit each row of A is
    M = torch.cat(m.A, dim=0) @ K  # [Σk, N]: every edit's A at every key
    if mode == "written":
        M = M * (rows[:, None] <= owner[None, :])  # edit j counts at key i only if j ≤ i
    return K, torch.cat(m.B, dim=1) @ M


def superseded(K: torch.Tensor, st: LayerStats, sin2: float) -> list[int]:
    """Columns of K along a later column (sin² of the C⁻¹-angle ≤ sin2): the later one is kept."""
    D = K.T @ st.solve(K)  # [N, N] KᵀC⁻¹K
    d = D.diagonal().clamp_min(1e-300)
    cos2 = D * D / (d[:, None] * d[None, :])
    later = torch.triu(cos2 >= 1 - sin2, diagonal=1)  # [i, j]: j > i and the two keys coincide
    return [int(i) for i in torch.nonzero(later.any(dim=1)).flatten()]


class _FromBase:
    """An edit context as a compaction's solve sees it: its statistics and what it derived from
    them, but no kept keys (the solve starts from the base weights, where no edit is kept)."""

    def __init__(self, ctx: EditContext) -> None:
        self.ctx, self.handle, self.cache_dir = ctx, ctx.handle, ctx.cache_dir

    def templates(self, s: MethodSettings) -> list[str]:
        return self.ctx.templates(s)

    def stats(self, layers: Sequence[int], n_tokens: int) -> dict[int, LayerStats]:
        return self.ctx.stats(layers, n_tokens)

    def preserved(self, layer: int, in_features: int) -> torch.Tensor:
        return torch.zeros(in_features, 0, dtype=torch.float64)

    def memo(self, key: tuple, make: Any) -> Any:
        return self.ctx.memo(key, make)


def solve(m: Method, s: MethodSettings, ctx: EditContext, layer: int, K: torch.Tensor, T: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(B [out, N], A [N, in], diagnostics): the method's update meeting ΔW K ≈ T from the base weights."""
    if m.solver is None:
        raise RankoneError(f"{m.name} has no solve from given keys and targets; compaction solves with one of "
                           f"{', '.join(compact_methods())}")
    return m.solver(_FromBase(ctx), s, layer, K, T)


def constraint_error(B: torch.Tensor, A: torch.Tensor, K: torch.Tensor, T: torch.Tensor) -> tuple[float, float]:
    """(‖B A K − T‖_F / ‖T‖_F, the largest per-key ‖·‖ / ‖t_i‖) in float64."""
    err = B.double() @ (A.double() @ K) - T
    per = err.norm(dim=0) / T.norm(dim=0).clamp_min(1e-300)
    return float(err.norm() / T.norm().clamp_min(1e-300)), float(per.max()) if per.numel() else 0.0


@dataclass
class Compacted:
    """A chain's compaction: the patch (one edit per module) and, per module, what the solve did."""

    patch: Patch
    modules: dict[str, dict[str, Any]]  # module -> the diagnostics its edit records under "compaction"
    seconds: float

    @property
    def max_constraint_error(self) -> float:
        """The largest relative error ‖ΔW K − T‖/‖T‖ over modules, with the factors as stored (float32)."""
        return max((d["constraint_error_stored"] for d in self.modules.values()), default=0.0)


def compact(handle: ModelHandle, patches: Sequence[Patch], settings: CompactSettings | None = None, *,
            context: EditContext | None = None, stats_corpus: str | os.PathLike | None = None,
            replaces: Sequence[str] | None = None, author: str | None = None, reason: str | None = None,
            progress: bool = True) -> Compacted:
    """The compaction of `patches` (in release order) on `handle`, whose model must hold the base
    weights of every module they edit (it is not changed). `context`: the edit context whose C to
    solve against (a sequential run's), else a new one over `stats_corpus` (the model's own
    corpus, or text sampled from it, when None). `replaces`: the ids recorded as replaced
    (default: the patches' content ids)."""
    t0 = time.perf_counter()
    settings = settings or CompactSettings()
    chain = [p for p in patches if p.edits]
    if not chain:
        raise RankoneError("nothing to compact: the chain holds no edits")
    s = resolve_settings(handle, {**_recorded_budget(chain), **settings.hparams, "method": settings.method})
    m_solve = method(s.method)
    ctx = context or EditContext(handle, stats_corpus, s.sampled_corpus_tokens, s.seed, progress=progress)
    layers = sorted({e.layer for p in chain for e in p.edits})
    for e in (e for p in chain for e in p.edits):
        if handle.proj_path(e.layer) != e.module:
            raise RankoneError(f"an edit of {e.module} is recorded at layer {e.layer}, whose edited projection is "
                               f"{handle.proj_path(e.layer)}: compaction solves against that projection's key statistics")
    stats = ctx.stats(layers, s.stats_tokens)
    mods = _gather(chain, lambda layer: stats[layer])
    ids = list(replaces) if replaces is not None else [p.content_id() for p in chain]
    out = Patch([], base=dict(chain[0].base), created_at=utcnow(), library_versions=library_versions())
    report: dict[str, dict[str, Any]] = {}
    for name in sorted(mods, key=lambda n: (mods[n].layer, n)):
        m = mods[name]
        w = arch.weight_oi(arch.get_module(handle.model, name)).detach()
        if tensor_sha256(w) != m.first_before:
            raise RankoneError(f"{name} does not hold the base weights these patches were made on: compaction solves "
                               "from the base model (give the registry's base, with nothing applied)")
        st = stats[m.layer]
        K_all, T_all = chain_targets(m, settings.targets)
        drop = set(superseded(K_all, st, settings.duplicate_sin2))
        keep = [i for i in range(K_all.shape[1]) if i not in drop]
        K, T = K_all[:, keep].contiguous(), T_all[:, keep].contiguous()
        B, A, extra = solve(m_solve, s, ctx, m.layer, K, T)
        err, worst = constraint_error(B, A, K, T)
        err32, worst32 = constraint_error(B.float(), A.float(), K, T)
        facts = [m.columns[i].fact for i in keep]
        diag = {**extra, "method": settings.method, "targets": settings.targets, "replaces": ids, "n_edits": len(m.B),
                "n_keys": int(K_all.shape[1]), "n_kept": len(keep), "keys_recovered": m.recovered,
                "superseded": [_fact_text(m.columns[i].fact) for i in sorted(drop)],
                "constraint_error": err, "max_key_error": worst, "constraint_error_stored": err32,
                "max_key_error_stored": worst32, "target_norm": float(T.norm())}
        e, _ = make_edit(w.clone(), B, A, module=name, layer=m.layer, request=facts[0], requests=facts, keys=K,
                         method=f"compact/{settings.method}", hparams=s.to_dict(), seed=s.seed,
                         diagnostics={"compaction": diag, "stats": {**ctx.stats_record(st), "layer": m.layer}},
                         author=author or user_name(), reason=reason)
        out.edits.append(e)
        report[name] = diag
    return Compacted(out, report, time.perf_counter() - t0)


def _recorded_budget(chain: Sequence[Patch]) -> dict[str, Any]:
    """The statistics budget most of the chain's edits were solved with (their recorded settings)."""
    budgets = Counter(n for p in chain for e in p.edits
                      if isinstance(n := e.hparams.get("stats_tokens"), int) and not isinstance(n, bool) and n > 0)
    return {"stats_tokens": budgets.most_common(1)[0][0]} if budgets else {}


def _fact_text(f: Mapping[str, str]) -> str:
    return f"{f.get('prompt', '').replace('{}', f.get('subject', ''))} -> {f.get('target', '')}"

