"""`export --format vllm`: adapters that keep vLLM's documented LoRA rules, and add exactly the
patches (PEFT loads them with the merged model's logits).

vLLM's rules, as its code states them: `--max-lora-rank` is one of 1, 8, 16, 32, 64, 128, 256,
320, 512 (vllm/config/lora.py; 1 only in recent versions) and an adapter's r may not exceed it;
the module named by every weight key (`base_model.model.<module>.lora_A.weight`, prefix and
suffix stripped) must end in a layer the model wraps for LoRA (vllm/lora/lora_model.py,
`check_unexpected_modules`; Llama: down_proj among qkv_proj, o_proj, gate_up_proj); a config
with `modules_to_save` or `use_dora` is refused (vllm/lora/peft_helper.py); scaling is
lora_alpha / r. GPT-2, GPT-J and GPT-NeoX have no LoRA support in vLLM.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from rankone.artifacts.patch import apply_patch
from rankone.artifacts.vllm_export import VLLM_MAX_LORA_RANKS, save_vllm_adapters, vllm_rank
from rankone.cli.main import main
from rankone.core.errors import RankoneError
from rankone.lifecycle.registry import Registry
from test_registry import ready, saved, synth_patch  # noqa: E402  (tests/unit is on sys.path under pytest)
from tiny import make_model

VLLM_RANKS = {1, 8, 16, 32, 64, 128, 256, 320, 512}
VLLM_LLAMA_LORA_MODULES = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
L1, L2 = "model.layers.1.mlp.down_proj", "model.layers.2.mlp.down_proj"


def vllm_module_name(key: str) -> str:
    """vLLM's parse_fine_tuned_lora_name for a PEFT key: the module path between the prefix and lora_A/B."""
    m = re.fullmatch(r"base_model\.model\.(.+)\.lora_[AB]\.weight", key)
    assert m, key
    return m.group(1)


@pytest.fixture
def llama(tok_bos):
    return make_model("llama"), tok_bos


def test_rank_is_one_vllm_accepts():
    assert [vllm_rank(n) for n in (1, 8, 9, 300, 512)] == [8, 8, 16, 320, 512]
    assert set(VLLM_MAX_LORA_RANKS) <= VLLM_RANKS
    with pytest.raises(RankoneError, match="at most rank 512"):
        vllm_rank(513)


def test_adapters_keep_vllms_rules_and_add_exactly_the_patches(llama, tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = llama
    stable = [synth_patch(model, L1, seed=1, scale=0.05)]
    candidate = stable + [synth_patch(model, L1, seed=2, scale=0.05, rank=2), synth_patch(model, L2, seed=3, scale=0.05)]
    man = save_vllm_adapters(model, [("stable", stable, ["s"]), ("candidate", candidate, ["s", "c1", "c2"])],
                             tmp_path / "out", base_model="base")
    assert man["max_lora_rank"] in VLLM_RANKS and "--max-lora-rank 8" in man["command"]
    ids = torch.tensor([tok("Danielle Darrieux was born in Paris")["input_ids"]])
    for arm, patches in (("stable", stable), ("candidate", candidate)):
        info = man["arms"][arm]
        folder = tmp_path / "out" / info["adapter"]
        assert re.fullmatch(r"rankone-[0-9a-f]{16}", info["adapter"]) and f"{info['adapter']}={folder}" in man["command"]
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["r"] in VLLM_RANKS and cfg["r"] <= man["max_lora_rank"] and cfg["lora_alpha"] == cfg["r"]
        assert not cfg["modules_to_save"] and cfg["use_dora"] is False and cfg["use_rslora"] is False and cfg["bias"] == "none"
        weights = load_file(str(folder / "adapter_model.safetensors"))
        assert {vllm_module_name(k).rsplit(".", 1)[-1] for k in weights} <= VLLM_LLAMA_LORA_MODULES
        assert all(w.shape[0 if ".lora_A." in k else 1] == cfg["r"] for k, w in weights.items())
        applied = apply_patch(model, patches)
        with torch.no_grad():
            merged = model(input_ids=ids).logits
        applied.revert()
        pm = peft.PeftModel.from_pretrained(model, str(folder))
        with torch.no_grad():
            got = pm(input_ids=ids).logits
        model = pm.unload()
        assert torch.allclose(got, merged, atol=1e-5)


def test_vllm_cannot_serve_gpt2_with_lora(tmp_path):
    model = make_model("gpt2")
    p = synth_patch(model, seed=1)
    with pytest.raises(RankoneError, match="vLLM cannot serve GPT-2 .* with `rankone serve`"):
        save_vllm_adapters(model, [("patches", [p], ["p"])], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_exports_a_registrys_arms(llama, tmp_path, capsys):
    model, tok = llama
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    r = str(tmp_path / "r.db")
    with Registry(r) as reg:
        a = ready(reg, saved(synth_patch(model, L1, seed=1), tmp_path / "a"))
        b = ready(reg, saved(synth_patch(model, L2, seed=2), tmp_path / "b"))
        reg.release(a)
        reg.stage(b, canary=5)
    argv = ["export", "--format", "vllm", "--model", str(d), "--registry", r, "--out", str(tmp_path / "v")]
    assert main(argv) == 0
    man = json.loads((tmp_path / "v" / "vllm.json").read_text())
    assert man["arms"]["stable"]["patches"] == [a] and man["arms"]["candidate"]["patches"] == [a, b]
    assert "adapter rankone-" in capsys.readouterr().out
    assert main(argv[:-1] + [str(tmp_path / "v2")]) == 0  # the same patch sets, the same names
    assert json.loads((tmp_path / "v2" / "vllm.json").read_text())["arms"] == man["arms"]
    assert main(["export", "--format", "vllm", "--model", str(d), "--out", str(tmp_path / "v3")]) == 2
    assert not (tmp_path / "v3").exists()
