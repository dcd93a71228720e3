"""PEFT export: the adapter, loaded by the real `peft` library, gives the merged model's logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankone.core import architectures as arch
from rankone.cli.main import main
from rankone.edit.editor import Editor
from rankone.core.errors import RankoneError
from rankone.methods.rome import EditHParams
from rankone.models.load import load_model
from rankone.artifacts.patch import apply_patch
from rankone.artifacts.peft_export import layout_of, save_peft_adapter
from rankone.core.tokens import EditRequest
from tiny import make_model
from conftest import handle_of  # noqa: E402

peft = pytest.importorskip("peft")
FAST = dict(v_steps=6, prefix_spec=[[3, 5]], stats_tokens=20_000)
TEXT = "Danielle Darrieux was born in Paris, and Toko Yasuda plays the guitar in Rome."


def make_patches(model, tok, corpus):
    """Three patches: two edits on layer 1 in sequence, one more on layer 1 (stacked), one on layer 2."""
    ed1 = Editor(handle_of(model, tok), EditHParams(layer=1, **FAST), corpus, progress=False)
    ed2 = Editor(handle_of(model, tok), EditHParams(layer=2, **FAST), corpus, progress=False)
    p1 = ed1.edit([EditRequest.create("{} was born in", "Danielle Darrieux", "Rome"),
                   EditRequest.create("{} plays the", "Toko Yasuda", "violin")])
    p2 = ed1.edit([EditRequest.create("{} is in", "The Eiffel Tower", "Italy")])
    p3 = ed2.edit([EditRequest.create("{} is in", "Rome", "France")])
    return [p1, p2, p3]


@torch.no_grad()
def logits(model, tok, text=TEXT):
    return model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits.float()


def check_adapter_matches_merged(model, tok, patches, out: Path, expect_modules, fan_in_fan_out):
    base = logits(model, tok)
    save_peft_adapter(model, patches, out)
    h = apply_patch(model, patches)
    merged = logits(model, tok)
    h.revert()
    cfg = json.loads((out / "adapter_config.json").read_text())
    k = max(sum(e.module == m for p in patches for e in p.edits) for m in expect_modules)
    assert cfg["r"] == cfg["lora_alpha"] == k and cfg["peft_type"] == "LORA"
    assert cfg["target_modules"] == sorted(expect_modules) and cfg["fan_in_fan_out"] is fan_in_fan_out
    w = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(w) == sorted(f"base_model.model.{m}.lora_{ab}.weight" for m in expect_modules for ab in "AB")

    pm = peft.PeftModel.from_pretrained(model, str(out))
    wrapped = [n for n, mod in pm.named_modules() if hasattr(mod, "lora_A") and len(mod.lora_A)]
    assert sorted(n.removeprefix("base_model.model.") for n in wrapped) == sorted(expect_modules)  # nothing else
    got = logits(pm, tok)
    err = float((got - merged).abs().max()) / max(1.0, float(merged.abs().max()))  # float32 rounding, relative
    assert err < 1e-6, err
    assert float((base - merged).abs().max()) > 1e-3  # the edits do move the logits
    pm.unload()  # gives back the untouched base modules


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_peft_adapter_equals_merged_model(model_type, tok, tok_bos, corpus, tmp_path):
    model = make_model(model_type)
    t = tok_bos if model_type == "llama" else tok
    patches = make_patches(model, t, corpus)
    mods = sorted({e.module for p in patches for e in p.edits})
    assert len(mods) == 2  # layer 1 carries 3 edits, layer 2 one: the smaller one is zero-padded to r = 3
    check_adapter_matches_merged(model, t, patches, tmp_path / "adapter", mods, model_type == "gpt2")


def test_layouts_peft_cannot_express(tok):
    model = make_model("gpt2")
    with pytest.raises(RankoneError, match="mix Linear and Conv1D"):
        layout_of(model, ["transformer.h.1.mlp.c_proj", "lm_head"])
    with pytest.raises(RankoneError, match="is a LayerNorm, which LoRA does not wrap"):
        layout_of(model, ["transformer.h.1.ln_2"])
    assert layout_of(make_model("llama"), ["model.layers.1.mlp.down_proj"]) is False


def test_export_command_merged_and_peft(tmp_path, tok, corpus, capsys):
    model = make_model("gpt2")
    d = tmp_path / "base"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    model, tok2 = load_model(d)
    patches = make_patches(model, tok2, corpus)
    dirs = []
    for i, p in enumerate(patches):
        p.save(tmp_path / f"p{i}")
        dirs += ["--patch", str(tmp_path / f"p{i}")]
    assert main(["export", "--model", str(d), *dirs, "--format", "merged", "--out", str(tmp_path / "m")]) == 0
    assert main(["export", "--model", str(d), *dirs, "--format", "peft", "--out", str(tmp_path / "a")]) == 0
    assert "4 edit(s) from 3 patch(es)" in capsys.readouterr().out
    merged_model, _ = load_model(tmp_path / "m")
    rec = json.loads((tmp_path / "m" / "rankone" / "applied.json").read_text())
    assert [p["path"] for p in rec["patches"]] == [str(tmp_path / f"p{i}") for i in range(3)]
    man = json.loads((tmp_path / "a" / "rankone_export.json").read_text())
    assert man["rank"] == 3 and len(man["patches"]) == 3
    pm = peft.PeftModel.from_pretrained(model, str(tmp_path / "a"))
    assert float((logits(pm, tok2) - logits(merged_model, tok2)).abs().max()) < 1e-5


def test_export_bad_input_writes_nothing(tmp_path, tok, capsys):
    model = make_model("gpt2")
    d = tmp_path / "base"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    from test_registry import synth_patch

    synth_patch(make_model("gpt2", seed=4)).save(tmp_path / "alien")
    synth_patch(model).save(tmp_path / "ok")
    out = tmp_path / "out"
    cases = [
        (["--patch", str(tmp_path / "alien"), "--format", "peft"], "patch does not fit this model"),
        (["--patch", str(tmp_path / "alien"), "--format", "merged"], "patch does not fit this model"),
        (["--patch", str(tmp_path / "nope")], "is not a patch"),
        (["--patch", "abcd", "--registry", str(tmp_path / "none.db")], "no registry at"),
        (["--patch", str(tmp_path / "ok"), "--format", "lora"], "invalid choice"),
    ]
    for args, msg in cases:
        with pytest.raises(SystemExit) if "invalid choice" in msg else _nullctx():
            code = main(["export", "--model", str(d), "--out", str(out), *args])
            assert code == 2
        assert msg in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "none.db").exists()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", "--model", str(d), "--out", str(out), "--patch", str(tmp_path / "ok"), "--format", "peft"]) == 2
    assert "already exists" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["keep.txt"]


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _testbeds():
    """The built-in testbeds, plus RANKONE_PEFT_TESTBEDS=DIR[:DIR] (e.g. runs/ builds)."""
    extra = [pytest.param(Path(d), id=Path(d).name) for d in os.environ.get("RANKONE_PEFT_TESTBEDS", "").split(":") if d]
    try:
        from rankone.testbed import builtin_llama_dir, builtin_model_dir
    except ImportError:
        return extra
    return [pytest.param(f(), id=f.__name__) for f in (builtin_model_dir, builtin_llama_dir)] + extra


@pytest.mark.parametrize("testbed", _testbeds())
def test_peft_adapter_on_builtin_testbeds(testbed, tmp_path):
    if not (Path(testbed) / "config.json").is_file():
        pytest.skip(f"testbed {testbed} is not built")
    model, tok = load_model(testbed)
    world = json.loads((Path(testbed) / "world.json").read_text())
    facts = world["facts"][:2]
    rel = {r["id"]: r for r in world["relations"]}
    reqs = [EditRequest.create(rel[f["relation"]]["phrasings"][0], f["subject"],
                               next(o for o in rel[f["relation"]]["objects"] if o != f["object"])) for f in facts]
    patch = Editor(handle_of(model, tok), EditHParams(v_steps=10), progress=False).edit(reqs)
    mod = patch.edits[0].module
    assert arch.weight_layout(arch.get_module(model, mod)) == ("conv1d" if model.config.model_type == "gpt2" else "linear")
    check_adapter_matches_merged(model, tok, [patch], tmp_path / "adapter", [mod], model.config.model_type == "gpt2")
