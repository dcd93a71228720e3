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
             this layer (`PreservedKeys`). ΔW (I − P) = 0, and on the basis Û it is symmetric:
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

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from rankone.core.atomic import write_bytes, write_cache
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import tensor_sha256
from rankone.core.tokens import EditRequest
from rankone.methods.hparams import AlphaEditHParams
from rankone.methods.memit import LayerUpdate, context_templates, run_window
from rankone.methods.stats import LayerStats, cache_root

log = logging.getLogger(__name__)
SCHEMA = "rankone.methods.alphaedit/1"
NULL_ENERGY_WARN = 0.05  # a null space holding more of the preserved keys' energy than this is logged


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


_NULL_MEMO: dict[str, torch.Tensor] = {}
_WARNED: set[int] = set()  # ids of memoised bases whose null-energy warning was logged


def cached_null_basis(
    stats: LayerStats, threshold: float, cache_dir: str | os.PathLike | None = None, energy: float | None = None,
) -> torch.Tensor:
    """Û for these statistics, computed once: from memory, else from a verified file beside the
    statistics cache (only for statistics that carry a cache key), else by eigendecomposition."""
    key = projector_key(stats, threshold, energy)
    if key in _NULL_MEMO:
        return _NULL_MEMO[key]
    f = (Path(cache_dir) if cache_dir is not None else cache_root() / "nullspace") / f"null-{key[:32]}.safetensors"
    U = _load_basis(f, key) if stats.meta else None
    if U is None:
        U = null_space_basis(stats.mom2, threshold, energy)
        if stats.meta:
            write_cache(f, safetensors_bytes({"basis": U}, {"key": key, "checksum": tensor_sha256(U)}), "null-space basis")
    _NULL_MEMO[key] = U
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


# ---- the keys of earlier edits --------------------------------------------------------------


@dataclass
class PreservedKeys:
    """K_p per layer: the keys every earlier AlphaEdit batch wrote there ([in, n_p] float64).
    Saved beside the registry or a sequential run's checkpoints, so a later session solves
    exactly the problem an unbroken run would."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)

    def get(self, layer: int, in_features: int) -> torch.Tensor:
        k = self.keys.get(layer)
        if k is None:
            return torch.zeros(in_features, 0, dtype=torch.float64)
        if k.shape[0] != in_features:
            raise RankoneError(f"preserved keys of layer {layer} have {k.shape[0]} features, the layer has {in_features}: "
                               "they belong to another model; start a new store")
        return k

    def add(self, layer: int, K: torch.Tensor) -> None:
        K = K.detach().to("cpu", torch.float64)
        self.keys[layer] = torch.cat([self.get(layer, K.shape[0]), K], dim=1)

    def count(self, layer: int) -> int:
        return 0 if layer not in self.keys else int(self.keys[layer].shape[1])

    def copy(self) -> "PreservedKeys":
        return PreservedKeys({l: k.clone() for l, k in self.keys.items()})

    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"layer.{l}": k.contiguous() for l, k in sorted(self.keys.items())}
        write_bytes(path, safetensors_bytes(tensors, {"schema": SCHEMA + "/preserved"}))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PreservedKeys":
        p = Path(path)
        if not p.is_file():
            raise RankoneError(f"preserved-keys file {p} does not exist; pass the file a previous AlphaEdit run saved")
        try:
            with safe_open(str(p), "pt") as fh:
                meta = fh.metadata() or {}
                keys = {int(n.split(".", 1)[1]): fh.get_tensor(n) for n in fh.keys()}
        except Exception as e:
            raise RankoneError(f"{p} is not a readable preserved-keys file ({str(e).splitlines()[0]})") from None
        if meta.get("schema") != SCHEMA + "/preserved" or any(k.ndim != 2 or k.dtype != torch.float64 for k in keys.values()):
            raise RankoneError(f"{p} is not a rankone preserved-keys file (schema {meta.get('schema')!r})")
        return cls(keys)


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


def edit_batch(
    model: torch.nn.Module, tok: Any, requests: Sequence[EditRequest], hparams: AlphaEditHParams,
    stats_for_layer: Callable[[int], LayerStats], preserved: PreservedKeys | None = None,
    templates: list[str] | None = None, cache_dir: str | os.PathLike | None = None,
) -> list[LayerUpdate]:
    """AlphaEdit for a batch: one LayerUpdate (module, layer, B, A, diagnostics) per window layer,
    lowest first, ΔW = B A. The model is not changed. `preserved` holds the earlier edits' keys;
    when given, this batch's keys are appended to it after every layer has been solved (so keep
    it only if the updates are written; pass preserved.copy() to try a batch). Û comes from
    `cached_null_basis(stats_for_layer(layer), threshold, cache_dir, energy)`."""
    if not requests:
        raise RankoneError("no requests to edit: give at least one prompt/subject/target")
    hp = hparams.resolve(model)
    tmpl = templates if templates is not None else context_templates(model, tok, hp)

    def solve(layer: int, K: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        st = stats_for_layer(layer)
        U = cached_null_basis(st, hp.nullspace_threshold, cache_dir, hp.nullspace_energy)
        leak = null_energy(st.mom2, U)
        if leak > NULL_ENERGY_WARN and id(U) not in _WARNED:  # once per cached basis, not per batch
            _WARNED.add(id(U))
            log.warning("AlphaEdit's null space at layer %d (%d of %d directions) holds %.0f%% of the key statistics' "
                        "energy, so updates confined to it still reach ordinary text's keys; a smaller null space: "
                        "--hparams '{\"nullspace_energy\": 0.02}' (fewer directions left to write in)",
                        layer, U.shape[1], K.shape[0], 100 * leak)
        Kp = preserved.get(layer, K.shape[0]) if preserved is not None else None
        B, A = alphaedit_update(K, R, U, Kp, hp.l2)
        moved = float((B @ (A @ Kp)).norm() / R.norm().clamp_min(1e-300)) if Kp is not None and Kp.shape[1] else 0.0
        return B, A, {"method": "alphaedit", "null_dim": int(U.shape[1]), "in_features": int(K.shape[0]),
                      "null_energy": leak, "threshold": hp.nullspace_threshold, "nullspace_energy": hp.nullspace_energy,
                      "l2": hp.l2, "n_preserved": 0 if Kp is None else int(Kp.shape[1]),
                      "preserved_shift": moved, "stats_tokens": st.n_tokens, "hparams": hp.to_dict(), "templates": tmpl}

    updates, keys = run_window(model, tok, requests, hp, tmpl, solve)
    if preserved is not None:
        for layer, K in keys.items():
            preserved.add(layer, K)
    return updates
