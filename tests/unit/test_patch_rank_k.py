"""Rank-k patches (schema 2): exact apply/revert in every dtype, files, compose, the schema-1
fixture, conflicts, gate norms and the PEFT export of a rank-k edit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankone.artifacts.patch import Patch, apply_patch, compose, make_edit, merged, revert_patch
from rankone.core.util import utcnow
from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import tensor_sha256
from rankone.lifecycle.conflicts import key_overlap
from rankone.lifecycle.gates import delta_norms
from tiny import make_model
from conftest import handle_of  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "patch-schema1"
MODULES = {"gpt2": "transformer.h.1.mlp.c_proj", "llama": "model.layers.1.mlp.down_proj"}


def rank_k_patch(model, module, k=3, seed=0, scale=0.02, subject="Danielle Darrieux") -> Patch:
    """One edit ΔW = B A with random factors B [out, k], A [k, in] on the model's current weights."""
    w = arch.weight_oi(arch.get_module(model, module)).detach().clone()
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(w.shape[0], k, generator=g) * scale
    A = torch.randn(k, w.shape[1], generator=g)
    layer = next(i for i in range(arch.num_layers(model, arch.spec_for(model))) if arch.spec_for(model).proj.format(i) == module)
    e, _ = make_edit(w, B, A, module=module, layer=layer, method="memit", hparams={}, seed=seed,
                     request={"prompt": "{} was born in", "subject": subject, "target": "Rome"})
    base = {"model_type": model.config.model_type, "name_or_path": "", "n_layers": handle_of(model, None).n_layers}
    return Patch([e], base=base, created_at=utcnow())


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(model, st):
    return all(torch.equal(v, st[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_rank_k_apply_then_revert_is_bit_exact(model_type, dtype, tmp_path):
    model = make_model(model_type).to(dtype)
    module = MODULES[model_type]
    p = rank_k_patch(model, module)
    p.save(tmp_path / "p")
    q = Patch.load(tmp_path / "p")  # through the files: schema 2, digests checked
    e = q.edits[0]
    assert e.rank == 3 and e.B.shape[1] == 3 and e.A.shape[0] == 3
    man = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert man["schema_version"] == 2 and man["edits"][0]["rank"] == 3
    assert e.fix_idx.numel() > 0  # rounding does lose information here: the fix is what makes revert exact
    st = state(model)
    w0 = arch.weight_oi(arch.get_module(model, module)).detach().double().clone()
    h = apply_patch(model, q)
    w1 = arch.weight_oi(arch.get_module(model, module)).detach().double()
    eps = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 1e-1}[dtype]
    assert float((w1 - w0 - e.delta()).abs().max()) < eps * float(w1.abs().max())
    assert tensor_sha256(arch.weight_oi(arch.get_module(model, module))) == e.sha256_after
    h.revert()
    assert same(model, st)
    apply_patch(model, q)
    revert_patch(model, q)  # from the patch alone: B, A and the fix
    assert same(model, st)


def test_rank_k_norm_compose_and_stacking():
    model = make_model("gpt2")
    module = MODULES["gpt2"]
    a, b = rank_k_patch(model, module, k=3, seed=1), rank_k_patch(model, module, k=2, seed=2, subject="Toko Yasuda")
    assert abs(a.edits[0].delta_fro - float(a.edits[0].delta().norm())) < 1e-9 * a.edits[0].delta_fro
    st = state(model)
    h = apply_patch(model, [a, b])  # made on one base: stacked exactly as W + B₁A₁ + B₂A₂
    got = arch.weight_oi(arch.get_module(model, module)).double() - st[module + ".weight"].T.double()
    assert torch.allclose(got, a.edits[0].delta() + b.edits[0].delta(), atol=1e-5)
    h.revert()
    assert same(model, st)
    c = compose([a, b])
    want = float((a.edits[0].delta() + b.edits[0].delta()).norm())
    assert abs(delta_norms(c)[module] - want) < 1e-9 * want


def test_a_rank_k_key_overlap_uses_the_rows_of_A():
    model = make_model("gpt2")
    module = MODULES["gpt2"]
    p = rank_k_patch(model, module, k=3)
    w = arch.weight_oi(arch.get_module(model, module)).detach().clone()
    g = torch.Generator().manual_seed(9)
    rows = torch.randn(1, w.shape[1], generator=g)  # an unrelated key direction
    far, _ = make_edit(w, torch.randn(w.shape[0], 1, generator=g) * 1e-3, rows, module=module, layer=1, method="r-rome",
                       hparams={}, seed=0, request={"prompt": "{} is in", "subject": "X", "target": "Y"})
    near, _ = make_edit(w, torch.randn(w.shape[0], 1, generator=g) * 1e-3, p.edits[0].A[1:2] * -2.0, module=module,
                        layer=1, method="r-rome", hparams={}, seed=0, request={"prompt": "{} is in", "subject": "Z", "target": "Y"})
    assert key_overlap(p.edits[0], near) > 0.999  # the second row of A, reversed and scaled
    assert key_overlap(p.edits[0], far) < 0.5
    assert key_overlap(near, p.edits[0]) == key_overlap(p.edits[0], near)


def test_schema1_fixture_loads_and_applies_identically(tmp_path):
    from rankone.models.load import load_model
    from rankone.testbed import builtin_model_dir

    raw = json.loads((FIXTURE / "patch.json").read_text())
    assert raw["schema_version"] == 1
    t = load_file(str(FIXTURE / "patch.safetensors"))
    p = Patch.load(FIXTURE)
    e = p.edits[0]
    assert e.rank == 1 and torch.equal(e.B[:, 0], t["edits.0.u"]) and torch.equal(e.A[0], t["edits.0.v"])
    model, _ = load_model(builtin_model_dir())
    st = state(model)
    w = arch.weight_oi(arch.get_module(model, e.module)).detach().clone()
    # what the schema-1 code computed: round(W + u vᵀ) in float64
    old = (w.double() + torch.outer(t["edits.0.u"].double(), t["edits.0.v"].double())).to(w.dtype)
    apply_patch(model, p)  # checks the result against the recorded sha256_after
    assert torch.equal(arch.weight_oi(arch.get_module(model, e.module)), old)
    revert_patch(model, p)
    assert same(model, st)
    # written again it is schema 2, with digests, and applies to the same weights
    p.save(tmp_path / "v2")
    q = Patch.load(tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / "patch.json").read_text())["schema_version"] == 2
    h = apply_patch(model, q)
    assert torch.equal(arch.weight_oi(arch.get_module(model, e.module)), old)
    h.revert()
    assert same(model, st)


def test_make_edit_refuses_factors_that_do_not_fit():
    w = torch.zeros(4, 6)
    with pytest.raises(RankoneError, match="do not make a"):
        make_edit(w, torch.zeros(4, 2), torch.zeros(3, 6), module="m", layer=0, method="x", hparams={}, seed=0, request={})


def test_peft_export_of_a_rank_k_patch_equals_the_merged_model(tmp_path, tok):
    peft = pytest.importorskip("peft")
    from rankone.artifacts.peft_export import save_peft_adapter

    model = make_model("gpt2")
    module = MODULES["gpt2"]
    a = rank_k_patch(model, module, k=3, scale=0.2)
    b = rank_k_patch(model, MODULES["gpt2"].replace(".1.", ".2."), k=2, seed=5, scale=0.2)
    x = torch.tensor([tok("Danielle Darrieux was born in Paris, and Toko Yasuda plays the guitar.")["input_ids"]])
    with torch.no_grad():
        base = model(input_ids=x).logits
    save_peft_adapter(model, [a, b], tmp_path / "adapter")
    h = apply_patch(model, [a, b])
    with torch.no_grad():
        want = model(input_ids=x).logits
    h.revert()
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 3  # the largest total rank; layer 2's rank 2 is zero-padded
    w = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert torch.equal(w[f"base_model.model.{module}.lora_B.weight"], a.edits[0].B)
    assert torch.equal(w[f"base_model.model.{module}.lora_A.weight"], a.edits[0].A)
    pm = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter"))
    with torch.no_grad():
        got = pm(input_ids=x).logits
    assert float((got - want).abs().max()) < 1e-5
    assert float((base - want).abs().max()) > 1e-3  # the edits do move the logits
    pm.unload()


def test_merged_adds_rank_one_terms_in_a_fixed_order():
    # the same bits as adding the k outer products one at a time in float64, then rounding once
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g).half()
    B, A = torch.randn(5, 3, generator=g), torch.randn(3, 7, generator=g)
    acc = w.double()
    for j in range(3):
        acc = acc + torch.outer(B[:, j].double(), A[j].double())
    assert torch.equal(merged(w, B, A), acc.half())


def test_the_registry_stores_releases_and_checks_rank_k_patches(tmp_path):
    from rankone.lifecycle.registry import Registry

    model = make_model("gpt2")
    module = MODULES["gpt2"]
    a = rank_k_patch(model, module, k=3, seed=1)
    a.save(tmp_path / "a")
    w = arch.weight_oi(arch.get_module(model, module)).detach().clone()
    near, _ = make_edit(w, torch.randn(w.shape[0], 1) * 1e-3, a.edits[0].A[2:3].clone(), module=module, layer=1,
                        method="r-rome", hparams={}, seed=0, request={"prompt": "{} is in", "subject": "Z", "target": "Y"})
    Patch([near], base=a.base, created_at=utcnow()).save(tmp_path / "b")
    with Registry(tmp_path / "reg.db") as reg:
        ids = []
        for d in ("a", "b"):
            rec, _ = reg.add(tmp_path / d, "alice", "r")
            reg.record_validation(rec.id, {"results": [{"passed": True}], "suite": {"sha256": "x"}}, True, "alice")
            ids.append(rec.id)
        assert reg.release(ids[0])[0].release_seq == 1
        with pytest.raises(RankoneError, match="keys of cosine 1.000"):
            reg.release(ids[1])  # its key is the third row of the released rank-3 edit's A
        assert reg.check().ok
        st = state(model)
        h = apply_patch(model, reg.load_patch(ids[0]))
        assert tensor_sha256(arch.weight_oi(arch.get_module(model, module))) == a.edits[0].sha256_after
        h.revert()
        assert same(model, st)
