"""r-rome-2key: one rank-one update that adds δ at both the averaged key k̄ and the bare prompt's k_o."""

import pytest
import torch

from rankone.core import architectures as arch
from rankone.methods.rome import VARIANTS, KeyResult, ValueResult, rank_one_update, two_key_direction
from rankone.methods.stats import LayerStats
from test_rome import NORMED_OUTPUT, REQ, setup
from tiny import CONFIGS
from conftest import handle_of  # noqa: E402


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_two_key_update_adds_the_same_residual_at_both_keys(model_type, tok, tok_bos, corpus):
    model, t, ed = setup(model_type, tok, tok_bos, corpus, "r-rome-2key")
    path = handle_of(model, None).proj_path(1)
    W = arch.weight_oi(arch.get_module(model, path)).detach().double().clone()
    c = ed.compute([REQ])
    upd, info = c.detail.update, c.detail
    ed.write(c, [REQ])
    dW = arch.weight_oi(arch.get_module(model, path)).detach().double() - W
    kr = info.key
    assert not torch.allclose(kr.k_mean, kr.k_bare, rtol=1e-3)  # the prefixes move the key: two constraints
    for k in (kr.k_mean, kr.k_bare):  # ΔW k̄ = ΔW k_o = r (float32 weights: relative 1e-4)
        assert (dW @ k - upd.residual).norm() / upd.residual.norm() < 1e-4
    assert upd.diagnostics["bare_key_gain"] == pytest.approx(1.0, abs=1e-9)
    s = torch.linalg.svdvals(dW)
    assert s[1] / s[0] < 1e-5
    if model_type not in NORMED_OUTPUT:  # r = δ: the residual is r-ROME's
        assert torch.allclose(upd.residual, info.value.delta, rtol=1e-9, atol=1e-12)


def _stats(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    c = a @ a.T / n + 0.1 * torch.eye(n, dtype=torch.float64)
    return c, LayerStats(c, n)  # C⁻¹ by the cached Cholesky factor, as in an edit


def test_two_key_direction_is_the_least_c_norm_answer():
    c, st = _stats(12, 0)
    g = torch.Generator().manual_seed(1)
    kb, ko = torch.randn(12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    d, den = two_key_direction(kb, ko, st.solve(kb), st.solve(ko))
    a = d / den
    assert float(a @ kb) == pytest.approx(1, abs=1e-12) and float(a @ ko) == pytest.approx(1, abs=1e-12)
    # the denominator the guard reads is 1 / aᵀCa, as r-ROME's kᵀC⁻¹k is for its own a, and never larger
    assert den == pytest.approx(1 / float(a @ c @ a), rel=1e-10)
    assert den < float(kb @ st.solve(kb))
    # any other a' with a'ᵀk̄ = a'ᵀk_o = 1 is a + z with zᵀk̄ = zᵀk_o = 0, and costs more in aᵀCa
    basis = torch.linalg.svd(torch.stack([kb, ko]))[2][2:]  # [10, 12]: the keys' orthogonal complement
    for z in torch.randn(20, 10, generator=g, dtype=torch.float64) @ basis:
        assert float((a + z) @ c @ (a + z)) > float(a @ c @ a)
    # never costs less than r-ROME's single-key answer, which gives k_o only k̄ᵀC⁻¹k_o / k̄ᵀC⁻¹k̄
    r = st.solve(kb) / float(kb @ st.solve(kb))
    assert float(a @ c @ a) >= float(r @ c @ r)
    assert abs(float(r @ ko) - 1) > 1e-3


@pytest.mark.parametrize("scale", [1.0, 2.0, 1 + 1e-9])
def test_parallel_keys_fall_back_to_r_rome(scale):
    _, st = _stats(8, 2)
    kb = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ko = scale * kb  # k_o ∥ k̄: one constraint (scale 1) or two that contradict (scale 2)
    d, den = two_key_direction(kb, ko, st.solve(kb), st.solve(ko))
    assert torch.equal(d, st.solve(kb)) and den == float(kb @ st.solve(kb))
    assert torch.isfinite(d).all()


def test_single_template_writes_exactly_r_rome():
    _, st = _stats(8, 4)
    g = torch.Generator().manual_seed(5)
    k = torch.randn(8, generator=g, dtype=torch.float64)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    key = KeyResult(keys=k[None], k_mean=k, k_bare=k.clone())
    val = ValueResult(delta=torch.randn(6, generator=g, dtype=torch.float64), current_value=torch.ones(6))
    a, b = (rank_one_update(w, key, val, st, VARIANTS[m]) for m in ("r-rome", "r-rome-2key"))
    assert torch.equal(a.key_dir, b.key_dir) and torch.equal(a.residual, b.residual)
