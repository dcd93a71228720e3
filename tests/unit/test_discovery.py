"""Architecture discovery on tiny random models of decoder types transformers ships.

Each type is found without its table entry (the entry, where there is one, is removed for the
test), edited with r-ROME through the discovered spec, checked for the rank-one invariants, and
reverted bit-exactly from its patch. Mixture-of-experts and other non-dense MLPs are refused with
one line, in Python and through the CLI.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from rankone.artifacts.patch import Patch, apply_patch, library_versions, revert_patch
from rankone.core.util import utcnow
from rankone.cli.main import main
from rankone.core import architectures as arch
from rankone.core.discovery import dense_in_out, discover, is_dense
from rankone.core.errors import RankoneError
from rankone.core.tokens import EditRequest
from rankone.edit.editor import Editor
from rankone.methods.rome import EditHParams
from tiny import VOCAB
from conftest import handle_of  # noqa: E402

BASE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            intermediate_size=64, head_dim=16, max_position_embeddings=128, vocab_size=VOCAB,
            pad_token_id=0, bos_token_id=1, eos_token_id=0)
DOWN = "model.layers.{}.mlp.down_proj"

# model type -> (config changes, the projection a reader of the modelling code would name).
# Written by hand from transformers' modelling files, not from the table or from discovery.
TYPES: dict[str, tuple[dict, str]] = {
    **{t: ({}, DOWN) for t in (
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "olmo3",
        "granite", "stablelm", "cohere", "cohere2", "helium", "glm", "glm4", "smollm3", "nemotron", "phi3",
        "exaone4", "ministral", "seed_oss", "arcee", "ernie4_5")},
    "starcoder2": ({}, "model.layers.{}.mlp.c_proj"),
    "phi": ({}, "model.layers.{}.mlp.fc2"),
    "persimmon": ({}, "model.layers.{}.mlp.dense_4h_to_h"),
    "gpt2": ({}, "transformer.h.{}.mlp.c_proj"),
    "gpt_bigcode": ({}, "transformer.h.{}.mlp.c_proj"),
    "gptj": ({"rotary_dim": 8}, "transformer.h.{}.mlp.fc_out"),
    "codegen": ({"rotary_dim": 8}, "transformer.h.{}.mlp.fc_out"),
    "gpt_neox": ({}, "gpt_neox.layers.{}.mlp.dense_4h_to_h"),
    "falcon": ({"head_dim": None}, "transformer.h.{}.mlp.dense_4h_to_h"),
    "bloom": ({}, "transformer.h.{}.mlp.dense_4h_to_h"),
    "mpt": ({}, "transformer.blocks.{}.ffn.down_proj"),
    "opt": ({"ffn_dim": 64, "word_embed_proj_dim": 32}, "model.decoder.layers.{}.fc2"),
    "biogpt": ({}, "biogpt.layers.{}.fc2"),
    "xglm": ({"ffn_dim": 64}, "model.layers.{}.fc2"),
}
MOE = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
REQ = EditRequest.create("{} was born in", "Danielle Darrieux", "Rome")
FAST = EditHParams(method="r-rome", layer=1, v_steps=3, prefixes=["Yes. {}", "It is said that {}"], stats_tokens=3_000)


def build(model_type: str, seed: int = 0, **changes) -> nn.Module:
    kw = {k: v for k, v in dict(BASE, **changes).items() if v is not None}
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def models():
    cache: dict[str, nn.Module] = {}

    def get(model_type: str) -> nn.Module:
        if model_type not in cache:
            cache[model_type] = build(model_type, **TYPES[model_type][0])
        return cache[model_type]

    return get


@pytest.fixture
def unlisted(monkeypatch):
    """Remove a type's table entry for one test, so that only discovery can find its layout."""
    def drop(model_type: str) -> None:
        monkeypatch.delitem(arch.ARCHITECTURES, model_type, raising=False)

    return drop


def test_at_least_25_types():
    assert len(TYPES) >= 25


@pytest.mark.parametrize("model_type", sorted(TYPES))
def test_discovery_finds_the_output_projection(model_type, models):
    model = models(model_type)
    found = discover(model)
    assert found.proj == TYPES[model_type][1]
    d = model.config.get_text_config().hidden_size
    for i in range(found.n_blocks):
        proj = model.get_submodule(found.proj.format(i))
        assert is_dense(proj) and dense_in_out(proj)[1] == d
        # the MLP holds the projection; the attention does not
        assert found.proj.format(i).startswith(found.mlp.format(i))
        assert not found.proj.format(i).startswith(found.attn.format(i) + ".")
        assert any(is_dense(m) for m in model.get_submodule(found.attn.format(i)).modules())
    assert model.get_submodule(found.embed) is model.get_input_embeddings()
    assert found.n_blocks == len(model.get_submodule(found.layers)) == 2
    if model_type in arch.ARCHITECTURES:  # discovery and the table agree where both exist
        assert arch.ArchSpec(**found.paths()) == arch.ARCHITECTURES[model_type]
    # the norm some blocks put on the MLP output before the residual (then v* is written at scale)
    normed = {"gemma2", "gemma3_text", "olmo2", "olmo3", "exaone4"}  # each checked in its forward()
    assert (arch.mlp_output_norm(model, 1, arch.ArchSpec(**found.paths())) is not None) == (model_type in normed), model_type


@pytest.mark.parametrize("model_type", sorted(TYPES))
def test_discovered_edit_is_rank_one_and_reverts_exactly(model_type, models, unlisted, tok, corpus, tmp_path):
    model = models(model_type)
    unlisted(model_type)
    spec = arch.spec_for(model)
    assert spec.source == "discovered" and spec.proj == TYPES[model_type][1]
    assert arch.describe(model, spec)["report"].startswith(f"discovered 2 {type(model.get_submodule(spec.layers)[0]).__name__}")

    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = spec.proj.format(1)
    W = arch.weight_oi(model.get_submodule(path)).detach().double().clone()
    ed = Editor(handle_of(model, tok), FAST, corpus, progress=False)
    c = ed.compute([REQ])
    upd = c.detail.update
    (edit,) = ed.write(c, [REQ])
    assert edit.module == path
    W1 = arch.weight_oi(model.get_submodule(path)).detach().double().clone()
    # W′k = v* and W′ − W is rank one
    assert (W1 @ upd.key - upd.target_value).norm() / upd.target_value.norm() < 1e-4
    s = torch.linalg.svdvals(W1 - W)
    assert s[1] / s[0] < 1e-5

    patch = Patch([edit], base=dict(ed.handle.base_info(), arch=arch.describe(model, spec)), created_at=utcnow(),
                  library_versions=library_versions())
    revert_patch(model, patch)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    loaded = Patch.load(patch.save(tmp_path / "p"))  # the recorded discovery survives the file
    assert loaded.base["arch"]["source"] == "discovered" and loaded.base["arch"]["spec"]["proj"] == spec.proj
    apply_patch(model, loaded)
    assert torch.equal(arch.weight_oi(model.get_submodule(path)).detach().double(), W1)
    revert_patch(model, loaded)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_table_entries_win_and_say_so(models):
    model = models("llama")
    assert arch.spec_for(model).source == "table"
    assert arch.describe(model, arch.spec_for(model))["report"].startswith("table entry for 'llama': 2 blocks at model.layers")


def test_spec_for_config_discovers_without_weights(unlisted):
    unlisted("olmo2")
    cfg = AutoConfig.for_model("olmo2", **BASE)
    spec = arch.spec_for_config(cfg)
    assert spec.source == "discovered" and spec.proj == DOWN


def test_override_and_json_round_trip(models):
    model = models("olmo3")
    found = arch.spec_for(model)
    again = arch.ArchSpec.from_dict(json.loads(found.to_json()))
    assert again == found and again.source == "discovered"
    given = dict(found.paths(), proj="model.layers.{}.mlp.up_proj")
    spec = arch.spec_for(model, given)
    assert spec.source == "override" and spec.proj == "model.layers.{}.mlp.up_proj"
    with pytest.raises(RankoneError, match="source 'guessed'"):
        arch.ArchSpec.from_dict(dict(found.paths(), source="guessed"))


def _one_line(e: pytest.ExceptionInfo, model_type: str, *words: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and f"model type {model_type!r}" in msg and "--arch-spec" in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("model_type", sorted(MOE))
def test_mixture_of_experts_is_refused_in_one_line(model_type):
    model = build(model_type, **MOE[model_type])
    with pytest.raises(RankoneError) as e:
        arch.spec_for(model)
    _one_line(e, model_type, "mixture of experts", "block model.layers.0")
    with pytest.raises(RankoneError) as e:
        arch.spec_for_config(model.config)
    _one_line(e, model_type, "mixture of experts")


def test_moe_in_some_layers_only_is_refused_at_that_layer():
    model = build("qwen2_moe", **MOE["qwen2_moe"], mlp_only_layers=[0])
    with pytest.raises(RankoneError) as e:
        discover(model)
    _one_line(e, "qwen2_moe", "block model.layers.1", "mixture of experts")


class _FusedMLP(nn.Module):
    """A dense MLP written with raw parameters instead of nn.Linear (as fused kernels do)."""

    def __init__(self, d: int, inner: int) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(inner, d))
        self.w_out = nn.Parameter(torch.randn(d, inner))


def _mutate(how: str) -> nn.Module:
    model = build("llama")
    for block in model.model.layers:
        if how == "ambiguous":
            block.mlp.skip = nn.Linear(32, 32)
        elif how == "fused":
            block.mlp = _FusedMLP(32, 64)
        elif how == "quantised":
            w = block.mlp.down_proj.weight
            block.mlp.down_proj.weight = nn.Parameter(w.detach().to(torch.int8), requires_grad=False)
        elif how == "no attention":
            del block.self_attn
    if how == "hybrid":
        model.model.layers[1] = nn.Sequential(nn.Linear(32, 32))
    return model


@pytest.mark.parametrize("how, words", [
    ("ambiguous", ["ambiguous", "mlp.down_proj, mlp.skip"]),
    ("fused", ["outside any nn.Linear", "fused"]),
    ("quantised", ["quantised torch.int8"]),
    ("no attention", ["one attention module", "found none"]),
    ("hybrid", ["mixes LlamaDecoderLayer, Sequential"]),
])
def test_no_single_dense_projection_is_refused(how, words, unlisted):
    unlisted("llama")
    model = _mutate(how)
    with pytest.raises(RankoneError) as e:
        arch.spec_for(model)
    _one_line(e, "llama", *words)


def test_encoders_are_refused():
    cfg = AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, vocab_size=VOCAB)
    with pytest.raises(RankoneError) as e:
        arch.spec_for_config(cfg)
    _one_line(e, "bert", "encoder")


def _cli_edit(capsys, model_dir, out, corpus):
    capsys.readouterr()  # drop what saving the folder printed
    code = main(["edit", "--quiet", "--model", str(model_dir), "--prompt", "{} was born in",
                 "--subject", "Danielle Darrieux", "--target", "Rome", "--layer", "1",
                 "--stats-corpus", str(corpus), "--hparams", json.dumps(dict(v_steps=2, prefixes=["Yes. {}"], stats_tokens=2000)),
                 "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_refuses_a_moe_folder_with_exit_2_and_writes_nothing(capsys, tok, corpus, tmp_path):
    d = tmp_path / "tiny-mixtral"
    build("mixtral", **MOE["mixtral"]).save_pretrained(d)
    tok.save_pretrained(d)
    code, out, err = _cli_edit(capsys, d, tmp_path / "out", corpus)
    assert code == 2
    assert err.startswith("rankone: error:") and err.count("\n") == 1
    assert "'mixtral'" in err and "mixture of experts" in err and "--arch-spec" in err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-mixtral"]


def test_cli_edits_an_unlisted_type_without_arch_spec(capsys, tok, corpus, tmp_path):
    d = tmp_path / "tiny-olmo3"
    build("olmo3").save_pretrained(d)
    tok.save_pretrained(d)
    code, out, err = _cli_edit(capsys, d, tmp_path / "out", corpus)
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "patch.json").read_text())
    assert manifest["edits"][0]["module"] == "model.layers.1.mlp.down_proj"
