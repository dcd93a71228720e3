"""AlphaEdit (Fang et al., ICLR 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for
Language Models"): MEMIT's targets, keys and residuals, with the update confined to the null space
of the preserved knowledge's keys and the keys of earlier edits kept, one function per step.

 (1)–(3)     targets z, keys K_l [in, k] and residuals R_l [out, k] over the window: memit.py
 (4) P       C_l = E[k kᵀ] = U Λ Uᵀ; Û [in, r] = the eigenvectors whose eigenvalue is below the
             threshold (or, scale-free, the r smallest with Σ_{i≤r} λ_i ≤ ε tr C), P = Û Ûᵀ
             [in, in]. The preserved keys K₀ have P K₀ ≈ 0, so any update of the form Δ P
             leaves W K₀ unchanged                        `null_space_basis`, `null_space_projector`
             How far "≈ 0" is: E‖P k‖² / E‖k‖² = tr(Ûᵀ C Û) / tr C, the share of the
             preserved keys' energy inside the null space                         `null_energy`
 (5) update  ΔW_l = R_l K_lᵀ P (K_p K_pᵀ P + K_l K_lᵀ P + α I)⁻¹
             the minimiser of ‖Δ P K_l − R_l‖² + ‖Δ P K_p‖² + α ‖Δ P‖² (the paper's closed form;
             α is `L2` in the authors' code), K_p [in, n_p] the keys of all earlier edits on
             this layer (the edit context's `preserved`). ΔW (I − P) = 0, and on the basis Û it is symmetric:
                 ΔW = R (Û X)ᵀ,  X = (Ûᵀ S Û + α I_r)⁻¹ Ûᵀ K,  S = K_p K_pᵀ + K Kᵀ,
             with G = Ûᵀ [K_p K] [r, m] and Ûᵀ S Û = G Gᵀ; when m < r, (G Gᵀ + αI)⁻¹ G =
             G (Gᵀ G + αI)⁻¹ makes it an m × m solve. Float64, Cholesky. B = R [out, k],
             A = (Û X)ᵀ [k, in]                                                 `alphaedit_update`

What it guarantees: ΔW x = 0 exactly for every x orthogonal to range(P) (the preserved
subspace); for earlier edits' keys, ΔW K_p = −α [0 R] (GᵀG + αI)⁻¹ restricted to K_p's columns,
so ‖ΔW K_p‖ ≤ α ‖R‖ / (σ_min(G)² + α): earlier edits move only as much as α allows.

Defaults are the authors' (threshold 2e-2 on the eigenvalues of E[k kᵀ], α = 10, and MEMIT's
target settings). Both are in units of key², so they are not scale-free across models:
`null_dim`, `null_energy` and `written_fraction` in the diagnostics show what they did on a given
model, and a null space that holds more than NULL_ENERGY_WARN of the key energy is logged (a
model whose keys' spectrum has no gap gets a "null space" that ordinary text uses: BENCHMARKS.md,
"AlphaEdit's null space on a real model"). `nullspace_energy` = ε picks the null space by energy
instead; a smaller ε preserves more and leaves fewer directions to write in.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from rankone.core.atomic import write_bytes, write_cache
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import tensor_sha256
from rankone.methods.base import EditInputs, Method
from rankone.methods.cache import cache_root
from rankone.methods.memit import MemitHParams, window_passes, window_step
from rankone.methods.stats import LayerStats
from rankone.models.handle import ModelHandle

log = logging.getLogger(__name__)
SCHEMA = "rankone.methods.alphaedit/1"
NULL_ENERGY_WARN = 0.05  # a null space holding more of the preserved keys' energy than this is logged


@dataclass(frozen=True)
class AlphaEditHParams(MemitHParams):
    """MEMIT's window and target settings (mom2_update_weight is not used) and the null-space ones."""

    method: str = "alphaedit"
    nullspace_threshold: float = 2e-2  # eigenvalues of E[k kᵀ] below this span the null space (key² units)
    # instead, scale-free: the smallest eigen-directions that together hold at most this share of trace E[k kᵀ]
    nullspace_energy: float | None = None
    l2: float = 10.0  # α

    def check(self) -> None:
        super().check()
        for name in ("nullspace_threshold", "l2"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v > 0):
                raise RankoneError(f"{name} must be a positive finite number, got {getattr(self, name)}")
        if self.nullspace_energy is not None and not 0 < float(self.nullspace_energy) < 1:
            raise RankoneError(f"nullspace_energy is a share of the key energy, between 0 and 1 (e.g. 0.02), "
                               f"got {self.nullspace_energy}")

    def resolve(self, handle: ModelHandle) -> "AlphaEditHParams":
        return dataclasses.replace(super().resolve(handle), mom2_update_weight=None)


# ---- (4) the null-space projector -----------------------------------------------------------


def null_space_basis(C: torch.Tensor, threshold: float, energy: float | None = None) -> torch.Tensor:
    """Û [in, r]: orthonormal eigenvectors of C (symmetric PSD, [in, in]) with eigenvalue <
    threshold; or, when `energy` = ε is given, the r smallest ones whose eigenvalues sum to at
    most ε · tr C (the threshold is then not used)."""
    evals, evecs = torch.linalg.eigh(C.detach().to("cpu", torch.float64))  # ascending
    if energy is None:
        return evecs[:, evals < threshold].contiguous()
    share = torch.cumsum(evals.clamp_min(0), 0) / evals.clamp_min(0).sum().clamp_min(1e-300)
    return evecs[:, : int((share <= energy).sum())].contiguous()


def null_space_projector(C: torch.Tensor, threshold: float, energy: float | None = None) -> torch.Tensor:
    """P = Û Ûᵀ [in, in] float64, the orthogonal projector onto C's (near-)null space."""
    U = null_space_basis(C, threshold, energy)
    return U @ U.T


def null_energy(C: torch.Tensor, U: torch.Tensor) -> float:
    """tr(Ûᵀ C Û) / tr C = E‖P k‖² / E‖k‖²: the share of the preserved keys' energy that lies in
    the null space, i.e. that an update confined to it still reaches (0 for a true null space)."""
    C = C.detach().to("cpu", torch.float64)
    return float(((U.T @ C) * U.T).sum() / torch.trace(C).clamp_min(1e-300))


def projector_key(stats: LayerStats | torch.Tensor, threshold: float, energy: float | None = None) -> str:
    """What identifies Û: the statistics' own cache key (model, layer, corpus, budget) when they
    have one, else the exact bytes of C; and the rule (threshold, or energy share)."""
    if isinstance(stats, LayerStats) and stats.meta:
        ident: dict[str, str] = dict(stats.meta)
    else:
        c = stats.mom2 if isinstance(stats, LayerStats) else stats
        ident = {"mom2_sha256": tensor_sha256(c.detach().to("cpu", torch.float64).contiguous())}
    rule = {"threshold": repr(float(threshold))} if energy is None else {"energy": repr(float(energy))}
    ident.update(null_schema=SCHEMA, **rule)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def cached_null_basis(
    stats: LayerStats, threshold: float, cache_dir: str | os.PathLike | None = None, energy: float | None = None,
) -> torch.Tensor:
    """Û for these statistics: from a verified file beside the statistics cache (only for
    statistics that carry a cache key), else by eigendecomposition (and saved there)."""
    key = projector_key(stats, threshold, energy)
    f = (Path(cache_dir) if cache_dir is not None else cache_root() / "nullspace") / f"null-{key[:32]}.safetensors"
    U = _load_basis(f, key) if stats.meta else None
    if U is None:
        U = null_space_basis(stats.mom2, threshold, energy)
        if stats.meta:
            write_cache(f, safetensors_bytes({"basis": U}, {"key": key, "checksum": tensor_sha256(U)}), "null-space basis")
    return U


def _load_basis(f: Path, key: str) -> torch.Tensor | None:
    if not f.is_file():
        return None
    try:
        with safe_open(str(f), "pt") as fh:
            meta, U = fh.metadata() or {}, fh.get_tensor("basis")
    except Exception as e:  # truncated or foreign file
        log.warning("ignoring unreadable null-space cache %s (%s); recomputing", f, e)
        return None
    if meta.get("key") != key or meta.get("checksum") != tensor_sha256(U) or U.ndim != 2:
        log.warning("ignoring null-space cache %s: it does not match these statistics or fails its checksum", f)
        return None
    return U


# ---- (5) the update -------------------------------------------------------------------------


def alphaedit_update(
    K: torch.Tensor, R: torch.Tensor, null_basis: torch.Tensor, K_prev: torch.Tensor | None = None,
    l2: float = 10.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step (5): (B [out, k], A [k, in]) with B A = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹.

    K: [in, k] this batch's keys; R: [out, k] residuals; null_basis: Û [in, r] (P = Û Ûᵀ);
    K_prev: K_p [in, n_p] earlier edits' keys on this layer; l2: α > 0."""
    f64 = dict(device="cpu", dtype=torch.float64)
    K, R, U = K.to(**f64), R.to(**f64), null_basis.to(**f64)
    Kp = K_prev.to(**f64) if K_prev is not None else torch.zeros(K.shape[0], 0, **f64)
    G = U.T @ torch.cat([Kp, K], dim=1)  # [r, m]
    r, m = G.shape
    k = K.shape[1]
    if r == 0:  # no null space: nothing may change
        return R.clone(), torch.zeros(k, K.shape[0], **f64)
    if r <= m:
        chol = torch.linalg.cholesky(G @ G.T + l2 * torch.eye(r, **f64))
        X = torch.cholesky_solve(G[:, m - k:].contiguous(), chol)  # [r, k]
    else:
        chol = torch.linalg.cholesky(G.T @ G + l2 * torch.eye(m, **f64))
        X = G @ torch.cholesky_solve(torch.eye(m, **f64)[:, m - k:].contiguous(), chol)  # [r, k]
    return R.clone(), (U @ X).T.contiguous()


def null_basis(ctx: EditInputs, hp: AlphaEditHParams, layer: int, st: LayerStats) -> torch.Tensor:
    """Û of a layer, computed (or read from disk) once per edit context; a leaky one is logged once."""
    def make() -> torch.Tensor:
        U = cached_null_basis(st, hp.nullspace_threshold, ctx.cache_dir, hp.nullspace_energy)
        leak = null_energy(st.mom2, U)
        if leak > NULL_ENERGY_WARN:
            log.warning("AlphaEdit's null space at layer %d (%d of %d directions) holds %.0f%% of the key statistics' "
                        "energy, so updates confined to it still reach ordinary text's keys; a smaller null space: "
                        "--hparams '{\"nullspace_energy\": 0.02}' (fewer directions left to write in)",
                        layer, U.shape[1], U.shape[0], 100 * leak)
        return U
    return ctx.memo(("alphaedit.null_basis", layer, projector_key(st, hp.nullspace_threshold, hp.nullspace_energy)), make)


def alphaedit_solver(ctx: EditInputs, hp: AlphaEditHParams, layer: int, K: torch.Tensor, R: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    st = ctx.stats([layer], hp.stats_tokens)[layer]
    U = null_basis(ctx, hp, layer, st)
    Kp = ctx.preserved(layer, K.shape[0])  # [in, n_p] the keys of earlier edits kept in the model
    B, A = alphaedit_update(K, R, U, Kp, hp.l2)
    moved = float((B @ (A @ Kp)).norm() / R.norm().clamp_min(1e-300)) if Kp.shape[1] else 0.0
    return B, A, {"null_dim": int(U.shape[1]), "in_features": int(K.shape[0]), "null_energy": null_energy(st.mom2, U),
                  "threshold": hp.nullspace_threshold, "nullspace_energy": hp.nullspace_energy, "l2": hp.l2,
                  "n_preserved": int(Kp.shape[1]), "preserved_shift": moved, "stats_tokens": st.n_tokens}


ALPHAEDIT = Method(name="alphaedit", settings=AlphaEditHParams, compute=functools.partial(window_step, alphaedit_solver),
                   one_at_a_time=False, planned_passes=window_passes, solver=alphaedit_solver,
                   summary="MEMIT's batch confined to the null space of C, earlier edits' keys kept (Fang et al. 2025)")
