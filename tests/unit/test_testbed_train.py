"""Tokenizer, model and a tiny end-to-end build: offline loading, check vs an independent loop,
atomic output, bad input."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
from rankone.core.errors import RankoneError
from rankone.testbed import build_testbed, build_world, check_testbed
from rankone.testbed.train import TrainConfig, build_tokenizer, default_config
from rankone.testbed.world import SyntheticSpec, World, corpus_lines, synthetic_world

TINY_CFG = TrainConfig(n_layer=2, n_embd=64, n_head=4, vocab_size=700, batch_size=32, lr=3e-3,
                       time_budget_s=25, eval_every_steps=50, target_train=0.999,
                       target_heldout=0.999, max_epochs=60)


def tiny_world(seed: int = 0) -> World:
    return synthetic_world("tiny", SyntheticSpec(n_subjects=12, n_relations=2), seed)


def independent_greedy(model, tok, prompt: str, obj: str) -> bool:
    """Greedy generation with HF generate, compared as text: independent of check.py."""
    enc = tok(prompt, return_tensors="pt")
    n = len(tok(" " + obj, add_special_tokens=False)["input_ids"])
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return text == " " + obj


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tokenizer_objects_single_tokens_and_bos(tmp_path: Path, arch: str) -> None:
    from transformers import AutoTokenizer

    w = build_world("small", 0)
    objs = sorted({o for r in w.relations for o in r.objects})
    tok = build_tokenizer(corpus_lines(w), objs, dataclasses.replace(default_config(w, arch)))
    assert all(len(tok(" " + o, add_special_tokens=False)["input_ids"]) == 1 for o in objs)
    tok.save_pretrained(str(tmp_path))
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    ids = tok2("Paris was born in Paris")["input_ids"]
    assert ids == tok("Paris was born in Paris")["input_ids"]
    if arch == "llama":
        assert ids[0] == tok2.bos_token_id  # BOS added by the post-processor, like real Llama
    else:
        assert tok2.bos_token_id not in ids  # GPT-2 adds nothing
    assert tok2.decode(tok2(" Paris", add_special_tokens=False)["input_ids"]) == " Paris"


def test_train_config_json_roundtrip() -> None:
    cfg = dataclasses.replace(TINY_CFG, arch="llama", label_smoothing=0.1)
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tb") / "tiny"
    rep = build_testbed(tiny_world(), "gpt2", out, seed=0, config=TINY_CFG, verbose=False)
    return out, rep


def test_build_writes_an_ordinary_hf_directory(tiny_build: tuple[Path, dict]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, rep = tiny_build
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "world.json", "corpus.txt",
            "train_config.json", "report.json", "rankone.json"} <= names
    assert not any(p.name.startswith(".") for p in out.parent.iterdir())  # no temp dirs left
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert model.config.model_type == "gpt2"
    assert len(tok) == model.config.vocab_size
    w = World.load(out)
    assert w.arch == "gpt2" and w.edit_layer == 0 and set(w.accuracy) >= {"train", "heldout"}
    from rankone.models.card import ModelCard

    card = ModelCard.load(out / "rankone.json")  # what the engine reads: the build's recommendations
    assert (card.layer, card.hparams, card.stats_corpus, card.cases) == (0, w.edit_hparams, "corpus.txt", "world.json")
    assert rep["train"]["params"] == sum(p.numel() for p in model.parameters())
    assert (out / "corpus.txt").read_text().count("\n") > len(w.facts)


def test_check_agrees_with_independent_greedy_loop(tiny_build: tuple[Path, dict]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = tiny_build
    res = check_testbed(out)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    w = World.load(out)
    for split in ("train", "heldout"):
        hits = [independent_greedy(model, tok, p, f.object) for f in w.facts for p in w.prompts(f, split)]
        assert res[f"n_{split}_prompts"] == len(hits)
        assert res[split] == pytest.approx(sum(hits) / len(hits))
    assert w.accuracy["train"] == pytest.approx(res["train"], abs=1e-4)


def test_bad_input_raises_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for kw in ({"world": "nope"}, {"world": "small", "arch": "bert"},
               {"world": "counterfact:/no/such.json"}, {"world": "small", "time_budget_s": -1}):
        kw = {"arch": "gpt2", **kw}
        with pytest.raises(RankoneError) as e:
            build_testbed(kw.pop("world"), out_dir=out, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(RankoneError, match="profile_style 'sonnets' is not one of objects, pairs"):
        build_testbed("small", "gpt2", out, config=TrainConfig(profile_style="sonnets"))
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    with pytest.raises(RankoneError, match="not a testbed"):
        build_testbed("small", out_dir=tmp_path / "notes")
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["a.txt"]
    with pytest.raises(RankoneError, match="not found"):
        check_testbed(tmp_path / "missing")
    with pytest.raises(RankoneError, match="not a testbed"):
        check_testbed(tmp_path / "notes")


def _cli(argv: list[str]) -> int:
    from rankone.cli.testbed import register

    parser = argparse.ArgumentParser(prog="rankone")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RankoneError:
        return 2


def test_cli_check_json_and_errors(tiny_build: tuple[Path, dict], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = tiny_build
    assert _cli(["testbed", "check", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n_facts"] == 24 and res["train"] == pytest.approx(check_testbed(out)["train"])
    assert _cli(["testbed", "check", str(tmp_path / "missing")]) == 2
    assert _cli(["testbed", "build", "--world", "nope", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
