"""AlphaEdit: the projector, the update's closed form and what it leaves alone (the preserved
subspace, earlier edits' keys), the key store across sessions, and lifelong edits on the testbed."""

import pytest
import torch

from rankone.core.errors import RankoneError
from rankone.core.tokens import EditRequest
from rankone.artifacts.patch import revert_patch
from rankone.edit.editor import Editor
from rankone.methods.alphaedit import (
    AlphaEditHParams, alphaedit_update, cached_null_basis, null_energy, null_space_basis,
    null_space_projector, projector_key,
)
from rankone.methods.base import PreservedKeys
from rankone.methods.memit import updates_applied
from rankone.methods.stats import LayerStats, layer_stats
from conftest import handle_of
from tiny import make_model

F64 = dict(dtype=torch.float64)


def _problem(d_in=40, d_out=16, k=4, n_prev=6, null=24, seed=0):
    """C with `null` eigenvalues under 1e-2 (the rest ≥ 0.5), fresh keys and earlier keys."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, **F64))[0]
    ev = torch.cat([torch.rand(null, generator=g, **F64) * 1e-2, 0.5 + torch.rand(d_in - null, generator=g, **F64)])
    C = Q @ torch.diag(ev) @ Q.T
    K = torch.randn(d_in, k, generator=g, **F64)
    Kp = torch.randn(d_in, n_prev, generator=g, **F64)
    R = torch.randn(d_out, k, generator=g, **F64)
    return C, K, Kp, R, Q[:, null:]  # the last: an orthonormal basis of the preserved subspace


def _paper(K, R, P, Kp, alpha):
    """ΔW = R Kᵀ P (K_p K_pᵀ P + K Kᵀ P + α I)⁻¹, literally."""
    M = Kp @ Kp.T @ P + K @ K.T @ P + alpha * torch.eye(P.shape[0], **F64)
    return R @ K.T @ P @ torch.linalg.inv(M)


@pytest.mark.parametrize("n_prev, null", [(6, 24), (30, 24), (0, 24), (6, 8)])  # m < r and m ≥ r
def test_factors_are_the_papers_update(n_prev, null):
    C, K, Kp, R, _ = _problem(n_prev=n_prev, null=null)
    U = null_space_basis(C, 1e-2)
    assert U.shape[1] == null
    B, A = alphaedit_update(K, R, U, Kp, 10.0)
    assert B.shape == (16, 4) and A.shape == (4, 40)
    ref = _paper(K, R, U @ U.T, Kp, 10.0)
    assert (B @ A - ref).norm() / ref.norm() < 1e-8


def test_preserved_subspace_is_untouched():
    C, K, Kp, R, keep = _problem()
    B, A = alphaedit_update(K, R, null_space_basis(C, 1e-2), Kp, 10.0)
    dW = B @ A
    x = keep @ torch.randn(keep.shape[1], 9, generator=torch.Generator().manual_seed(3), **F64)  # [in, 9]
    rel = (dW @ x).norm() / (torch.linalg.matrix_norm(dW, 2) * x.norm())
    assert rel < 1e-6, rel
    # while a key with a null-space part is moved
    assert (dW @ K).norm() / (torch.linalg.matrix_norm(dW, 2) * K.norm()) > 1e-2


def test_preserved_subspace_of_a_models_own_statistics(tok, corpus):
    st = layer_stats(handle_of(make_model("gpt2"), tok), [1], corpus, 20_000, progress=False)[1]
    evals, evecs = torch.linalg.eigh(st.mom2)
    thr = float(evals.median())  # half of the directions are preserved
    U = cached_null_basis(st, thr)
    P = U @ U.T
    assert torch.allclose(P @ P, P, atol=1e-10) and torch.allclose(P, P.T)
    g = torch.Generator().manual_seed(0)
    K, R = torch.randn(128, 3, generator=g, **F64), torch.randn(32, 3, generator=g, **F64)
    dW = torch.mm(*alphaedit_update(K, R, U, None, 1e-3))
    kept = evecs[:, evals >= thr]  # the directions C's preserved keys live in
    x = kept @ torch.randn(kept.shape[1], 5, generator=g, **F64)
    assert (dW @ x).norm() / (torch.linalg.matrix_norm(dW, 2) * x.norm()) < 1e-6


def test_earlier_edits_keys_keep_their_outputs():
    C, K, Kp, R, _ = _problem(n_prev=6, null=24)
    U = null_space_basis(C, 1e-2)
    G = U.T @ torch.cat([Kp, K], 1)
    smin2 = float(torch.linalg.svdvals(G)[-1]) ** 2
    for alpha in (10.0, 1e-8 * smin2):
        dW = torch.mm(*alphaedit_update(K, R, U, Kp, alpha))
        # ‖ΔW K_p‖ ≤ α ‖R‖ / (σ_min(G)² + α): ~0 once α is small next to the keys
        assert (dW @ Kp).norm() <= alpha * R.norm() / (smin2 + alpha) * (1 + 1e-9)
    assert (dW @ Kp).norm() / R.norm() < 1e-6
    assert (dW @ K - R).norm() / R.norm() < 1e-6  # and this batch is written
    # without the earlier keys the same batch does move their outputs
    free = torch.mm(*alphaedit_update(K, R, U, None, alpha))
    assert (free @ Kp).norm() / R.norm() > 1e-2


def test_projector_and_its_cache(tmp_path, tok, corpus):
    C, *_ = _problem()
    P = null_space_projector(C, 1e-2)
    assert torch.allclose(P @ P, P, atol=1e-12)
    assert float(torch.linalg.matrix_norm(P @ C @ P, 2)) < 1e-2  # only small eigenvalues survive
    st = layer_stats(handle_of(make_model("gpt2"), tok), [1], corpus, 20_000, progress=False)[1]
    thr = float(torch.linalg.eigvalsh(st.mom2).median())
    key = projector_key(st, thr)
    assert key != projector_key(st, thr * 2) and key == projector_key(st, thr)
    U = cached_null_basis(st, thr, tmp_path)
    files = list(tmp_path.glob("null-*.safetensors"))
    assert len(files) == 1
    assert torch.equal(cached_null_basis(st, thr, tmp_path), U)  # from the file
    files[0].write_bytes(files[0].read_bytes()[:-40])  # a truncated file is recomputed, not trusted
    assert torch.equal(cached_null_basis(st, thr, tmp_path), U)
    # statistics without a cache key (a bare C) are not written
    cached_null_basis(LayerStats(C, 10), 1e-2, tmp_path)
    assert len(list(tmp_path.glob("null-*.safetensors"))) == 1


def test_null_space_by_energy_share_is_scale_free():
    C, *_ = _problem(null=24)
    ev = torch.linalg.eigvalsh(C)
    for eps in (1e-4, 1e-3, 0.02, 0.3):
        U = null_space_basis(C, 1e-2, energy=eps)
        r = U.shape[1]
        # the largest r whose r smallest eigenvalues hold at most ε of the trace
        assert ev[:r].sum() <= eps * ev.sum() < ev[: r + 1].sum()
        assert null_energy(C, U) == pytest.approx(float(ev[:r].sum() / ev.sum()), rel=1e-9)
        assert torch.allclose(U.T @ U, torch.eye(r, **F64), atol=1e-10)
        # the same keys 100× longer: the energy rule picks the same directions, the threshold does not
        U100 = null_space_basis(100 * C, 1e-2, energy=eps)
        assert U100.shape[1] == r and torch.allclose(U100 @ U100.T, U @ U.T, atol=1e-8)
    assert null_space_basis(100 * C, 1e-2).shape[1] < null_space_basis(C, 1e-2).shape[1] == 24
    # the threshold's null space of _problem holds the 24 small eigenvalues' share of the energy
    assert null_energy(C, null_space_basis(C, 1e-2)) == pytest.approx(float(ev[:24].sum() / ev.sum()), rel=1e-9)
    assert null_energy(C, null_space_basis(C, 1e-2)) < 0.02
    assert projector_key(C, 1e-2) != projector_key(C, 1e-2, 0.02) != projector_key(C, 1e-2, 0.05)


def test_a_leaky_null_space_is_reported(tok, corpus, caplog):
    """A threshold above most of C's eigenvalues makes a 'null space' that ordinary keys live in:
    the diagnostics say how much of their energy it holds, and the log says so once per edit context."""
    h = handle_of(make_model("gpt2"), tok)
    st = layer_stats(h, [1], corpus, 20_000, progress=False)
    hp = AlphaEditHParams(layers=[1], v_steps=2, v_lr=0.05, stats_tokens=20_000, prefixes=["A b. {}"],
                          nullspace_threshold=float(torch.linalg.eigvalsh(st[1].mom2)[-1]) * 2)
    req = [EditRequest.create("{} was born in", "Danielle Darrieux", "Rome")]
    ed = Editor(h, hp, corpus, progress=False)
    with caplog.at_level("WARNING", logger="rankone.methods.alphaedit"):
        for _ in range(2):
            (up,) = ed.compute(req).updates
    assert up.diagnostics["null_dim"] == up.diagnostics["in_features"]
    assert up.diagnostics["null_energy"] == pytest.approx(1.0, abs=1e-9)
    assert sum("holds 100% of the key statistics' energy" in r.message for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="rankone.methods.alphaedit"):
        (up,) = Editor(h, hp.replace(nullspace_energy=0.01), corpus, progress=False).compute(req).updates
    assert up.diagnostics["null_energy"] <= 0.01 and up.diagnostics["nullspace_energy"] == 0.01
    assert 0 < up.diagnostics["null_dim"] < up.diagnostics["in_features"] and not caplog.records


def test_preserved_keys_add_up_per_layer_and_refuse_another_models():
    C, K, Kp, R, _ = _problem()
    store = PreservedKeys()
    store.add(3, Kp[:, :4])
    store.add(3, Kp[:, 4:])
    store.add(5, K)
    assert torch.equal(store.get(3, 40), Kp) and store.count(5) == 4 and store.count(7) == 0
    assert store.get(7, 40).shape == (40, 0)
    with pytest.raises(RankoneError, match="another model"):
        store.get(3, 41)


def test_settings_round_trip():
    hp = AlphaEditHParams(layers=[1, 2], nullspace_threshold=1e-3, l2=0.5)
    assert AlphaEditHParams.from_json(hp.to_json()) == hp
    assert AlphaEditHParams.from_json(hp.replace(nullspace_energy=0.02).to_json()).nullspace_energy == 0.02
    assert hp.method == "alphaedit"
    h = handle_of(make_model("llama", num_hidden_layers=12), None)
    assert AlphaEditHParams().resolve(h).mom2_update_weight is None  # λ is MEMIT's, not used here
    for bad in ({"l2": 0.0}, {"nullspace_threshold": -1.0}, {"method": "memit"}, {"nullspace_energy": 1.0},
                {"nullspace_energy": 0}):
        with pytest.raises(RankoneError):
            AlphaEditHParams.from_dict(bad)


def test_lifelong_batches_on_the_testbed():
    """Two batches of testbed facts, one after the other: the second keeps the first written."""
    import random

    from rankone.models.load import load_model
    from rankone.testbed import World, builtin_model_dir
    from rankone.testbed.check import greedy_hits

    d = builtin_model_dir()
    h = load_model(d)
    model, tok = h
    world = World.load(d)
    rng = random.Random(1)
    batches = []
    for f in rng.sample(world.facts, 8):
        target = rng.choice([o for o in world.relation(f.relation).objects if o != f.object])
        batches.append((EditRequest.create(world.prompts(f, "train")[0], f.subject, target), target))
    first, second = batches[:4], batches[4:]
    # As for MEMIT, this toy model needs δ ≈ 2–4 ‖h‖ (clamp 4), and its null-space keys are short
    # (‖Û ᵀk‖² of a few units), so the authors' α = 10 would write a third of each fact: α = 1.
    ed = Editor(h, {"method": "alphaedit", "clamp_norm_factor": 4.0, "l2": 1.0, "v_steps": 60}, progress=False)
    hp, layers = ed.settings, ed.layers
    pairs = lambda b: [(r.prompt.replace("{}", r.subject), t) for r, t in b]  # noqa: E731
    p1 = ed.edit([r for r, _ in first], keep=True)  # written, and its keys kept by the context
    try:
        assert [ed.context.kept.count(l) for l in layers] == [len(first)] * len(layers)
        hit1 = greedy_hits(model, tok, pairs(first))[1]
        ups2 = ed.compute([r for r, _ in second]).updates
        assert ups2[0].diagnostics["n_preserved"] == len(first)
        # the same batch solved without the first batch's keys would move their outputs much more
        layer, d_in = ups2[-1].layer, ups2[-1].A.shape[1]
        Kp, K2 = ed.context.kept.get(layer, d_in), ups2[-1].keys
        U = cached_null_basis(ed.stats(layer), hp.nullspace_threshold)
        B2, A2 = alphaedit_update(K2, ups2[-1].B, U, Kp, hp.l2)
        assert torch.allclose(A2, ups2[-1].A, rtol=1e-9, atol=1e-12)  # solved with exactly the kept keys
        shift = (B2 @ A2 @ Kp).norm() / B2.norm()
        unguarded = torch.mm(*alphaedit_update(K2, ups2[-1].B, U, None, hp.l2)) @ Kp
        assert shift == pytest.approx(ups2[-1].diagnostics["preserved_shift"])
        assert shift < 0.5 * unguarded.norm() / B2.norm(), (shift, unguarded.norm() / B2.norm())
        with updates_applied(model, ups2):
            both1, both2 = greedy_hits(model, tok, pairs(first))[1], greedy_hits(model, tok, pairs(second))[1]
    finally:
        revert_patch(model, p1)
    assert sum(hit1) >= 3 and sum(both2) >= 3, (hit1, both2)
    # the preserved keys bound what the second batch does to the first (checked above); on this
    # 4-layer toy the bound leaves room for one of the first batch's facts to fall back at most
    assert sum(both1) >= sum(hit1) - 1, (hit1, both1)
