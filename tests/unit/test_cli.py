"""The CLI on a real (tiny) model folder: the happy path, and every bad input with its one line."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rankone.cli.main import main
from rankone.core.fingerprint import path_sha256
from tiny import make_model
from conftest import run_cli  # noqa: E402

FAST = json.dumps(dict(v_steps=4, prefix_spec=[[3, 5]], stats_tokens=20_000))



def edit_args(model_dir, out, **kw):
    a = {"--model": str(model_dir), "--prompt": "{} was born in", "--subject": "Danielle Darrieux",
         "--target": "Rome", "--layer": "1", "--hparams": FAST, "--out": str(out)}
    a.update(kw)
    return ["edit", "--quiet"] + [x for k, v in a.items() if v is not None for x in (k, v)]


def test_edit_show_apply_generate_revert(capsys, model_dir, tmp_path):
    code, out, err = run_cli(capsys, *edit_args(model_dir, tmp_path / "p", **{"--author": "ana", "--reason": "fix"}))
    assert code == 0, err
    assert "wrote" in out and (tmp_path / "p" / "patch.json").exists()
    code, out, _ = run_cli(capsys, "show", str(tmp_path / "p"))
    assert code == 0 and "transformer.h.1.mlp.c_proj" in out and "by ana: fix" in out
    code, out, _ = run_cli(capsys, "apply", "--model", str(model_dir), "--patch", str(tmp_path / "p"), "--out", str(tmp_path / "m2"))
    assert code == 0
    assert (tmp_path / "m2" / "rankone" / "applied.json").exists()
    code, out, _ = run_cli(capsys, "generate", "--model", str(model_dir), "--patch", str(tmp_path / "p"),
                       "--prompt", "Danielle Darrieux was born in", "--max-new-tokens", "3")
    assert code == 0 and out.startswith("before:") and "after:" in out
    for how in ([], ["--patch", str(tmp_path / "p")]):
        out_dir = tmp_path / f"m3{len(how)}"
        code, _, err = run_cli(capsys, "revert", "--model", str(tmp_path / "m2"), *how, "--out", str(out_dir))
        assert code == 0, err
        a, b = load_file(str(model_dir / "model.safetensors")), load_file(str(out_dir / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_requests_file_makes_one_patch_of_many_edits(capsys, model_dir, tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"prompt": "{} was born in", "subject": "Danielle Darrieux", "target": "Rome"}\n\n'
                 '{"prompt": "Toko Yasuda plays the", "subject": "Toko Yasuda", "target": "violin"}\n')
    code, out, err = run_cli(capsys, "edit", "--quiet", "--model", str(model_dir), "--requests", str(f), "--layer", "1",
                         "--hparams", FAST, "--out", str(tmp_path / "p"))
    assert code == 0, err
    man = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert len(man["edits"]) == 2 and man["edits"][1]["sha256_before"] == man["edits"][0]["sha256_after"]


def bad_model(tmp_path, kind):
    d = tmp_path / kind
    d.mkdir()
    if kind == "unknown-type":
        (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    elif kind == "corrupt-config":
        (d / "config.json").write_text("{not json")
    return d


CASES = {
    "subject not in prompt": (dict(**{"--prompt": "The capital is"}), "contains neither"),
    "subject off token boundaries": (dict(**{"--prompt": "{}d the king was", "--subject": "An"}), "token boundaries"),
    "empty target": (dict(**{"--target": " "}), "target is empty"),
    "layer out of range": (dict(**{"--layer": "7"}), "out of range"),
    "bad method hparams": (dict(**{"--hparams": '{"method": "mend"}'}), "unknown method"),
    "missing corpus": (dict(**{"--stats-corpus": "/nonexistent/corpus.txt"}), "does not exist"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_edit_input(case, capsys, model_dir, tmp_path):
    kw, msg = CASES[case]
    before = path_sha256(model_dir)
    code, out, err = run_cli(capsys, *edit_args(model_dir, tmp_path / "out", **kw))
    assert code == 2
    assert err.startswith("rankone: error:") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no temp folder left either
    assert path_sha256(model_dir) == before


@pytest.mark.parametrize("kind,msg", [("unknown-type", "model type 'bert': it is an encoder"),
                                      ("corrupt-config", "cannot read"), ("missing", "does not exist")])
def test_bad_model_dir(kind, msg, capsys, tmp_path):
    d = bad_model(tmp_path, kind) if kind != "missing" else tmp_path / "missing"
    code, _, err = run_cli(capsys, *edit_args(d, tmp_path / "out"))
    assert code == 2 and msg in err and "\n" not in err.rstrip("\n")
    if kind == "unknown-type":
        assert "--arch-spec" in err
    assert not (tmp_path / "out").exists()


def test_bad_requests_file(capsys, model_dir, tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"prompt": "{} was born in", "subject": "A", "target": "Rome"}\n{"prompt": "x"}\n')
    code, _, err = run_cli(capsys, "edit", "--model", str(model_dir), "--requests", str(f), "--out", str(tmp_path / "out"))
    assert code == 2 and "r.jsonl:2" in err and "lacks the field" in err
    assert not (tmp_path / "out").exists()


def test_model_without_corpus_samples_one_from_the_model(capsys, model_dir, tmp_path, caplog):
    d = tmp_path / "nocorpus"
    shutil.copytree(model_dir, d)
    (d / "corpus.txt").unlink()
    hp = json.dumps(dict(json.loads(FAST), sampled_corpus_tokens=1500))
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(capsys, *edit_args(d, tmp_path / "out", **{"--hparams": hp}))
    assert code == 0, err
    said = [r.getMessage() for r in caplog.records if "statistics corpus" in r.getMessage()]
    assert len(said) == 1 and "sampling 1,500 tokens from the model itself" in said[0] and "--stats-corpus" in said[0]
    man = json.loads((tmp_path / "out" / "patch.json").read_text())
    assert man["edits"][0]["diagnostics"]["stats"]["corpus"].startswith("sampled from the model: 1500 tokens")
    caplog.clear()  # a second edit finds the sampled corpus and says so
    with caplog.at_level("WARNING"):
        code, _, err = run_cli(capsys, *edit_args(d, tmp_path / "out2", **{"--hparams": hp}))
    assert code == 0, err
    said = [r.getMessage() for r in caplog.records if "statistics corpus" in r.getMessage()]
    assert len(said) == 1 and "using the 1,500 tokens sampled from the model itself" in said[0] and "cached earlier" in said[0]


def test_existing_output_is_not_clobbered(capsys, model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, *edit_args(model_dir, tmp_path / "out"))
    assert code == 2 and "already exists" in err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_patch_for_another_model_is_refused(capsys, model_dir, tmp_path, tok):
    code, _, err = run_cli(capsys, *edit_args(model_dir, tmp_path / "p"))
    assert code == 0, err
    other = tmp_path / "other"
    make_model("gpt2", seed=5).save_pretrained(other)
    tok.save_pretrained(other)
    before = path_sha256(other)
    code, _, err = run_cli(capsys, "apply", "--model", str(other), "--patch", str(tmp_path / "p"), "--out", str(tmp_path / "m2"))
    assert code == 2 and "does not fit this model" in err
    assert not (tmp_path / "m2").exists() and path_sha256(other) == before


def test_corrupt_patch_is_refused(capsys, model_dir, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "patch.json").write_text("{")
    (tmp_path / "p" / "patch.safetensors").write_bytes(b"")
    code, _, err = run_cli(capsys, "apply", "--model", str(model_dir), "--patch", str(tmp_path / "p"), "--out", str(tmp_path / "m2"))
    assert code == 2 and "corrupt" in err and not (tmp_path / "m2").exists()
    code, _, err = run_cli(capsys, "show", str(tmp_path / "nope"))
    assert code == 2 and "is not a patch" in err


def test_revert_without_record_or_patch(capsys, model_dir, tmp_path):
    code, _, err = run_cli(capsys, "revert", "--model", str(model_dir), "--out", str(tmp_path / "out"))
    assert code == 2 and "--patch" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra", [["--dtype", "bfloat16"], ["--dtype", "float16"], ["--device-map", "auto"]])
def test_dtypes_and_device_map(extra, capsys, model_dir, tmp_path):
    code, _, err = run_cli(capsys, *edit_args(model_dir, tmp_path / "p"), *extra)
    assert code == 0, err
    man = json.loads((tmp_path / "p" / "patch.json").read_text())
    want = {"bfloat16": "bfloat16", "float16": "float16"}.get(extra[1], "float32")
    assert man["edits"][0]["weight_dtype"] == want
    # the patch applies to a model loaded the same way, and reverts to the exact base
    code, _, err = run_cli(capsys, "apply", "--model", str(model_dir), "--patch", str(tmp_path / "p"), *extra,
                       "--out", str(tmp_path / "m"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "revert", "--model", str(tmp_path / "m"), *extra, "--out", str(tmp_path / "r"))
    assert code == 0, err
    from safetensors.torch import load_file

    from rankone.models.load import load_model

    base = load_model(model_dir, dtype=extra[1] if extra[0] == "--dtype" else None).model.state_dict()
    merged, restored = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("m", "r"))
    edited = json.loads((tmp_path / "p" / "patch.json").read_text())["edits"][0]["module"] + ".weight"
    assert not torch.equal(merged[edited], base[edited].to(merged[edited].dtype))  # the merged folder is edited
    assert restored.keys() <= base.keys() and all(torch.equal(v, base[k]) for k, v in restored.items())


def test_model_recommended_hparams_are_defaults_and_user_wins(capsys, model_dir, tmp_path):
    d = tmp_path / "rec"
    shutil.copytree(model_dir, d)
    (d / "rankone.json").write_text(json.dumps({"layer": 2, "hparams": {"v_steps": 3, "kl_factor": 0.5}}))
    code, _, err = run_cli(capsys, "edit", "--quiet", "--model", str(d), "--prompt", "{} was born in", "--subject", "Danielle Darrieux",
                       "--target", "Rome", "--hparams", '{"kl_factor": 0.25, "stats_tokens": 20000, "prefix_spec": [[3, 5]]}',
                       "--out", str(tmp_path / "p"))
    assert code == 0, err
    hp = json.loads((tmp_path / "p" / "patch.json").read_text())["edits"][0]["hparams"]
    assert (hp["layer"], hp["v_steps"], hp["kl_factor"], hp["v_lr"]) == (2, 3, 0.25, 0.5)
