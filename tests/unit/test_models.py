"""Models as users have them: the model card (rankone.json), the model handle, GGUF files and hub
ids in `load_model`, the card's recommendations under the user's hyper-parameters, and the
registry's own fit check on a real base model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankone.cli.main import main
from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import path_sha256
from rankone.core.tokens import EditRequest
from rankone.edit.editor import Editor
from rankone.methods.base import resolve_settings
from rankone.methods.rome import EditHParams
from rankone.models.card import ModelCard, card_path, default_layer, find_card
from rankone.models.handle import ModelHandle
from rankone.models.load import load_model
from tiny import corpus_text, make_model, make_tokenizer, write_gguf
from conftest import handle_of, run_cli  # noqa: E402

FAST = dict(v_steps=4, prefix_spec=[[3, 5]], stats_tokens=20_000)
REQ = EditRequest.create("{} was born in", "Danielle Darrieux", "Rome")



# ---- the model card ---------------------------------------------------------------------------


def test_card_round_trips_and_resolves_paths_beside_the_model(tmp_path):
    card = ModelCard(layer=2, hparams={"v_steps": 7}, stats_corpus="text/corpus.txt", cases="facts.jsonl",
                     notes="mine")
    p = card.save(tmp_path / "rankone.json")
    assert [x.name for x in tmp_path.iterdir()] == ["rankone.json"]  # written atomically: no temp file left
    again = ModelCard.load(p)
    assert again == card and again.folder == tmp_path.resolve()
    assert json.loads(p.read_text()) == {"schema_version": 1, "layer": 2, "hparams": {"v_steps": 7},
                                         "stats_corpus": "text/corpus.txt", "cases": "facts.jsonl", "notes": "mine"}
    assert again.resolve(again.stats_corpus) == tmp_path.resolve() / "text" / "corpus.txt"
    assert ModelCard(cases="/abs/facts.jsonl").resolve("/abs/facts.jsonl") == Path("/abs/facts.jsonl")  # made in memory
    for outside in ("/abs/facts.jsonl", "../facts.jsonl", "~/facts.jsonl"):  # a card names files beside it, no others
        (tmp_path / "rankone.json").write_text(json.dumps({"cases": outside}))
        with pytest.raises(RankoneError, match="is not a path inside"):
            ModelCard.load(tmp_path / "rankone.json")
    assert again.recommended() == {"v_steps": 7, "layer": 2}
    assert ModelCard.from_dict({}) == ModelCard()  # every key is optional
    # a folder's card is FOLDER/rankone.json, a .gguf file's NAME.rankone.json beside it
    assert card_path(tmp_path) == tmp_path / "rankone.json"
    assert card_path(tmp_path / "m.Q4.gguf") == tmp_path / "m.Q4.rankone.json"
    assert find_card(tmp_path / "other") is None


@pytest.mark.parametrize("content, message", [
    ('{"layer": 2, "hparam": {}}', "unknown key(s) ['hparam']"),
    ('{"layer": "4"}', "'layer' must be a layer number"),
    ('{"layer": true}', "'layer' must be a layer number"),
    ('{"layer": -1}', "'layer' must be 0 or more"),
    ('{"hparams": [1, 2]}', "'hparams' must be an object"),
    ('{"stats_corpus": 3}', "'stats_corpus' must be a path"),
    ('{"schema_version": 2}', "schema_version 2 is not supported"),
    ('["layer"]', "must hold a JSON object"),
    ('{"layer": 2,', "is not valid JSON"),
])
def test_a_bad_card_is_one_line(tmp_path, content, message):
    (tmp_path / "rankone.json").write_text(content)
    with pytest.raises(RankoneError) as e:
        ModelCard.load(tmp_path / "rankone.json")
    assert message in str(e.value) and "rankone.json" in str(e.value) and "\n" not in str(e.value)


def test_a_bad_card_stops_the_cli_before_anything_is_written(capsys, model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / "rankone.json").write_text('{"layer": 1, "hparams": {"v_step": 3}}')  # a typo in a hyper-parameter
    before = path_sha256(d)
    code, _, err = run_cli(capsys, "edit", "--model", d, "--prompt", "{} was born in", "--subject", "Danielle Darrieux",
                       "--target", "Rome", "--out", tmp_path / "p")
    assert code == 2 and "unknown hyper-parameter(s) ['v_step']" in err and "rankone.json" in err
    assert err.count("\n") == 1 and not (tmp_path / "p").exists() and path_sha256(d) == before


def test_one_default_layer_rule():
    assert default_layer(None, 30) == 3 and default_layer(ModelCard(), 18) == 2
    assert default_layer(ModelCard(layer=0), 30) == 0


# ---- the handle and the card's recommendations ----------------------------------------------------


@pytest.fixture
def carded(model_dir, tmp_path):
    """The tiny model folder with a card recommending layer 2, 3 value steps and its corpus elsewhere."""
    d = tmp_path / "carded"
    shutil.copytree(model_dir, d)
    (d / "corpus.txt").rename(d / "text.txt")
    ModelCard(layer=2, hparams={"v_steps": 3, "kl_factor": 0.5}, stats_corpus="text.txt").save(d / "rankone.json")
    return d


def test_handle_unpacks_and_carries_spec_source_and_card(carded):
    h = load_model(carded)
    model, tok = h
    assert model is h.model and tok is h.tokenizer and isinstance(model, torch.nn.Module)
    assert h.source == str(carded) and h.folder == carded and h.source_sha256 is None
    assert h.spec == arch.ARCHITECTURES["gpt2"] and h.card.layer == 2 and h.default_layer() == 2
    assert h.stats_corpus() == carded.resolve() / "text.txt"
    assert not [k for k in vars(model) if k.startswith("_rankone")]  # nothing rides on the module
    info = h.base_info()
    assert (info["model_type"], info["n_layers"], info["arch"]["source"]) == ("gpt2", 3, "table")


def test_api_merges_the_users_hparams_over_the_card_as_the_cli_does(carded, capsys, tmp_path):
    h = load_model(carded)
    given = {"method": "rome", "kl_factor": 0.25, "stats_tokens": 20_000, "prefix_spec": [[3, 5]]}
    ed = Editor(h, given, progress=False)
    # what the user set wins, what they left out comes from the card, then the paper's defaults
    assert (ed.settings.method, ed.settings.kl_factor, ed.settings.v_steps, ed.settings.layer, ed.settings.v_lr) == ("rome", 0.25, 3, 2, 0.5)
    assert ed.context.corpus() == carded.resolve() / "text.txt"
    patch = ed.edit([REQ])
    code, _, err = run_cli(capsys, "edit", "--quiet", "--model", carded, "--prompt", REQ.prompt, "--subject", REQ.subject,
                       "--target", REQ.target, "--method", "rome", "--hparams",
                       json.dumps({"kl_factor": 0.25, "stats_tokens": 20_000, "prefix_spec": [[3, 5]]}),
                       "--out", tmp_path / "p")
    assert code == 0, err
    cli = json.loads((tmp_path / "p" / "patch.json").read_text())["edits"][0]
    assert cli["hparams"] == patch.edits[0].hparams and cli["layer"] == patch.edits[0].layer == 2
    # the same model given as (model, tok): the card is found through the folder transformers recorded
    model, tok = h
    assert Editor(handle_of(model, tok), given, progress=False).settings == ed.settings
    # a settings object is complete: the card's v_steps does not replace it; only an open layer is the card's
    whole = Editor(h, EditHParams(method="rome"), progress=False).settings
    assert whole.v_steps == EditHParams().v_steps and whole.kl_factor == EditHParams().kl_factor and whole.layer == 2
    assert Editor(h, ed.settings, progress=False).settings == ed.settings  # a patch's settings replay exactly


def test_the_engine_does_not_read_a_testbed_world(model_dir, tmp_path):
    d = tmp_path / "w"
    shutil.copytree(model_dir, d)
    (d / "world.json").write_text(json.dumps({"edit_layer": 2, "edit_hparams": {"v_steps": 3}}))
    h = load_model(d)
    assert h.card is None and h.default_layer() == 3 // 8
    assert resolve_settings(h, {}) == EditHParams().resolve(h)


def test_handle_of_a_model_built_in_memory(tok, corpus):
    model = make_model("llama")
    h = ModelHandle.of(model, tok)
    assert h.source == "" and h.card is None and h.folder is None and h.default_layer() == 0
    with pytest.raises(RankoneError, match="--stats-corpus"):
        h.stats_corpus()
    assert h.stats_corpus(corpus) == corpus
    with pytest.raises(TypeError, match="ModelHandle"):
        Editor(model)


def test_arch_spec_override_is_carried_by_the_handle_not_the_module(model_dir, tmp_path, capsys):
    # a hand-given spec that edits the MLP's input projection instead: every step (key, value,
    # statistics, the write) must use it, although the module itself carries nothing
    spec = {"layers": "transformer.h", "mlp": "transformer.h.{}.mlp", "proj": "transformer.h.{}.mlp.c_fc",
            "attn": "transformer.h.{}.attn", "embed": "transformer.wte"}
    h = load_model(model_dir, arch_spec=spec)
    assert h.spec.proj == spec["proj"] and h.spec.source == "override"
    assert arch.spec_for(h.model).proj.endswith("c_proj")  # outside the handle's scope: the table
    patch = Editor(h, EditHParams(layer=1, **FAST), progress=False).edit([REQ])
    assert patch.edits[0].module == "transformer.h.1.mlp.c_fc"
    assert patch.base["arch"]["source"] == "override"


# ---- GGUF files and hub ids -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    pytest.importorskip("gguf")
    d = tmp_path_factory.mktemp("gguf")
    model = make_model("llama", seed=3)
    write_gguf(model, make_tokenizer(bos=True), d / "tiny-llama.F32.gguf")
    (d / "corpus.txt").write_text(corpus_text()[:50_000])
    return d / "tiny-llama.F32.gguf", {k: v.clone() for k, v in model.state_dict().items()}


def test_gguf_file_loads_as_a_handle_with_its_sha256(gguf_file):
    from rankone.core.fingerprint import file_sha256

    path, weights = gguf_file
    h = load_model(path)
    model, tok = h
    assert h.source == str(path.resolve()) and h.source_sha256 == file_sha256(path) and h.folder is None
    assert model.config.model_type == "llama" and h.spec == arch.ARCHITECTURES["llama"]
    sd = model.state_dict()
    assert sd.keys() == weights.keys() and all(torch.equal(sd[k], weights[k]) for k in weights)  # F32: exact
    assert h.base_info()["gguf_sha256"] == h.source_sha256


def test_gguf_edit_records_its_base_and_apply_writes_an_ordinary_folder(gguf_file, capsys, tmp_path):
    from transformers import AutoModelForCausalLM

    path, weights = gguf_file
    ModelCard(layer=1, stats_corpus="corpus.txt").save(path.with_name("tiny-llama.F32.rankone.json"))
    try:
        code, _, err = run_cli(capsys, "edit", "--quiet", "--model", path, "--prompt", REQ.prompt, "--subject", REQ.subject,
                           "--target", REQ.target, "--hparams", json.dumps(FAST), "--out", tmp_path / "p")
        assert code == 0, err
        man = json.loads((tmp_path / "p" / "patch.json").read_text())
        assert man["base"]["gguf_sha256"] == load_model(path).source_sha256 and man["edits"][0]["layer"] == 1
        code, _, err = run_cli(capsys, "apply", "--model", path, "--patch", tmp_path / "p", "--out", tmp_path / "m")
        assert code == 0, err
    finally:
        path.with_name("tiny-llama.F32.rankone.json").unlink()
    out = tmp_path / "m"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    card = json.loads((out / "rankone.json").read_text())  # the card travels, its corpus with it
    assert card["layer"] == 1 and card["stats_corpus"] == "corpus.txt" and (out / "corpus.txt").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    down = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(merged.state_dict()[down], weights[down])
    assert all(torch.equal(merged.state_dict()[k], weights[k]) for k in weights if k != down)
    code, _, err = run_cli(capsys, "revert", "--model", out, "--out", tmp_path / "r")
    assert code == 0, err
    back = load_file(str(tmp_path / "r" / "model.safetensors"))
    assert torch.equal(back[down], weights[down])  # bit-exact


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2-nonexistent-rankone-test"])
def test_a_hub_id_offline_is_one_line(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    with pytest.raises(RankoneError) as e:
        load_model(name)
    msg = str(e.value)
    assert "not reachable" in msg and "pass a local Hugging Face model folder or a .gguf file" in msg and "\n" not in msg
    code, _, err = run_cli(capsys, "generate", "--model", name, "--prompt", "Paris is")
    assert code == 2 and err.startswith("rankone: error: model ") and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir() if p.name != "hf"] == []  # nothing written


def test_a_missing_gguf_file_or_a_file_that_is_not_one(tmp_path):
    with pytest.raises(RankoneError, match="does not exist"):
        load_model(tmp_path / "nope.gguf")
    (tmp_path / "x.bin").write_bytes(b"not a gguf")
    with pytest.raises(RankoneError, match="is not a GGUF file"):
        load_model(tmp_path / "x.bin")


# ---- the registry checks the real base model itself ---------------------------------------------------


def test_registry_release_with_a_model_refuses_a_patch_that_does_not_fit(model_dir, tmp_path):
    from rankone.lifecycle.registry import Registry

    other = make_model("gpt2", seed=9)  # same type and shape, other weights
    patch = Editor(ModelHandle.of(other, make_tokenizer()), EditHParams(layer=1, **FAST), model_dir / "corpus.txt",
                   progress=False).edit([REQ])
    patch.save(tmp_path / "p")
    h = load_model(model_dir)
    w_before = path_sha256(model_dir)
    with Registry(tmp_path / "reg.db") as reg:
        rec, _ = reg.add(tmp_path / "p", "alice", "r")
        reg.record_validation(rec.id, {"results": [{"passed": True}], "suite": {"sha256": "x"}}, True, "alice")
        with pytest.raises(RankoneError, match="does not fit this model"):
            reg.release(rec.id, "alice", "ship", model=h)
        assert reg.get(rec.id).state == "validated" and reg.base() == {}  # nothing recorded
        sd = h.model.state_dict()
        fresh = load_model(model_dir).model.state_dict()
        assert all(torch.equal(sd[k], fresh[k]) for k in fresh)  # the model is given back untouched
        # without the model the fingerprint walk alone cannot tell: the patch would be released
        rec2, _ = reg.release(rec.id, "alice", "ship")
        assert rec2.state == "released"
    assert path_sha256(model_dir) == w_before


def test_registry_release_with_a_model_records_its_evidence(model_dir, tmp_path):
    from rankone.lifecycle.registry import Registry

    h = load_model(model_dir)
    Editor(h, EditHParams(layer=1, **FAST), progress=False).edit([REQ]).save(tmp_path / "p")
    with Registry(tmp_path / "reg.db") as reg:
        rec, _ = reg.add(tmp_path / "p", "alice", "r")
        reg.record_validation(rec.id, {"results": [{"passed": True}], "suite": {"sha256": "x"}}, True, "alice")
        rec, _ = reg.release(rec.id, "alice", "ship", model=h)
        base = reg.base()
    assert rec.state == "released" and base["name_or_path"] == str(Path(model_dir).resolve())
    assert sorted(base["modules"]) == [f"transformer.h.{i}.mlp.c_proj" for i in range(3)]
