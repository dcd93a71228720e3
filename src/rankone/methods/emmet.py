"""EMMET (Gupta et al. 2024, "A Unified Framework for Model Editing"): ROME's equality constraints
for a whole batch, the batched generalisation of r-ROME by the same authors.

Notation as in memit.py: the batch's keys K [in, n] (each fact's key k̄ averaged over the context
templates), the residuals R = V − W K [out, n] (what the layer must add at each key), C = E[k kᵀ].

 (1)–(3)  targets, keys and residuals: MEMIT's (memit.py), over a window of one layer by default
 (4)      the least-C-norm update that meets every constraint exactly,

              min_ΔW tr(ΔW C ΔWᵀ)   subject to   ΔW K = R   (= V − W K)

          is  ΔW = R (Kᵀ C⁻¹ K)⁻¹ Kᵀ C⁻¹,  so B = R [out, n] and A = D⁻¹ (C⁻¹K)ᵀ [n, in] with
          D = KᵀC⁻¹K [n, n]. For one fact, D = k̄ᵀC⁻¹k̄ and ΔW = r (C⁻¹k̄)ᵀ / (k̄ᵀC⁻¹k̄): r-ROME's
          update. A batch of n > 1 adds emmet_lambda · I to D (the authors' guard against an
          ill-conditioned D when two keys nearly coincide), which relaxes the constraints to
          ΔW K = R D (D + λI)⁻¹.                                                  `emmet_update`

Unlike MEMIT's least-squares (λC + KKᵀ)⁻¹, nothing trades the batch's own constraints against the
preserved keys: they hold (to λ) whatever the batch size, and C only chooses among the updates
that meet them. The authors' defaults: one layer (ROME's), emmet_lambda = 0.1 (their Llama-2
setting, with C unscaled); the targets use MEMIT's settings here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from rankone.core.errors import RankoneError
from rankone.methods.base import EditInputs, Method
from rankone.methods.memit import MemitHParams, window_passes, window_step
from rankone.methods.stats import LayerStats
from rankone.models.handle import ModelHandle


@dataclass(frozen=True)
class EmmetHParams(MemitHParams):
    """MEMIT's window and target settings (mom2_update_weight is not used), one layer by default."""

    method: str = "emmet"
    emmet_lambda: float = 0.1  # added to KᵀC⁻¹K's diagonal for a batch of more than one fact

    def check(self) -> None:
        super().check()
        if not (math.isfinite(self.emmet_lambda) and self.emmet_lambda >= 0):
            raise RankoneError(f"emmet_lambda must be a finite number ≥ 0, got {self.emmet_lambda}")

    @staticmethod
    def default_window(n_layers: int) -> int:
        return 1  # the authors edit ROME's single layer

    def resolve(self, handle: ModelHandle) -> "EmmetHParams":
        return dataclasses.replace(super().resolve(handle), mom2_update_weight=None)


def emmet_update(K: torch.Tensor, R: torch.Tensor, C: LayerStats, lam: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Step (4): (B [out, n], A [n, in], diagnostics) with B A = R (KᵀC⁻¹K + λI)⁻¹ KᵀC⁻¹ in float64
    on C's cached Cholesky factor; λ is used only when n > 1."""
    K, R = K.to("cpu", torch.float64), R.to("cpu", torch.float64)
    cinv_k = C.solve(K)  # [in, n] C⁻¹K
    D = K.T @ cinv_k  # [n, n] KᵀC⁻¹K, symmetric positive (semi)definite
    n = D.shape[0]
    if n > 1:
        D = D + lam * torch.eye(n, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(D)
    if int(info) != 0:
        raise RankoneError(f"EMMET's KᵀC⁻¹K is singular for this batch of {n} (two facts share a key?); give each "
                           "subject once per batch, or raise emmet_lambda, e.g. --hparams '{\"emmet_lambda\": 10}'")
    A = torch.cholesky_solve(cinv_k.T.contiguous(), chol)  # [n, in] = D⁻¹ KᵀC⁻¹
    diag = torch.diagonal(D)
    return R.clone(), A, {"D_cond": float(torch.linalg.cond(D)), "D_diag_mean": float(diag.mean())}


def emmet_solver(ctx: EditInputs, hp: EmmetHParams, layer: int, K: torch.Tensor, R: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    st = ctx.stats([layer], hp.stats_tokens)[layer]
    B, A, extra = emmet_update(K, R, st, hp.emmet_lambda)
    met = float((B @ (A @ K.double()) - R.double()).norm() / R.double().norm().clamp_min(1e-300))
    return B, A, {"emmet_lambda": hp.emmet_lambda, "constraint_error": met, "stats_tokens": st.n_tokens,
                  "jitter": st.jitter, **extra}


EMMET = Method(name="emmet", settings=EmmetHParams, compute=functools.partial(window_step, emmet_solver),
               one_at_a_time=False, planned_passes=window_passes, solver=emmet_solver,
               summary="the batch's equality constraints ΔW K = V − W K met exactly (Gupta et al. 2024)")
