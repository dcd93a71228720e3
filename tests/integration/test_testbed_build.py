"""The committed built-in testbeds and full `small` builds: accuracy thresholds, agreement of
`rankone testbed check` with an independent greedy loop, reproducibility of the build, and r-ROME
edits that flip the model's answer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rankone.testbed import World, build_testbed, builtin_llama_dir, builtin_model_dir, check_testbed

BUILTINS = [pytest.param(builtin_model_dir, id="gpt2"), pytest.param(builtin_llama_dir, id="llama")]


def independent_greedy(model, tok, prompt: str, obj: str) -> bool:
    """HF generate, greedy, compared as text (no code shared with rankone.testbed.check)."""
    enc = tok(prompt, return_tensors="pt")
    n = len(tok(" " + obj, add_special_tokens=False)["input_ids"])
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True) == " " + obj


@pytest.mark.parametrize("where", BUILTINS)
def test_builtin_loads_offline_and_knows_its_world(where) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = where()
    model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    w = World.load(d)
    assert w.arch == model.config.model_type
    assert (d / "corpus.txt").is_file()
    res = check_testbed(d)
    assert res["train"] >= 0.95 and res["heldout"] >= 0.90, res
    assert w.accuracy["train"] == pytest.approx(res["train"], abs=1e-4)
    # check's figures agree with an independent generate() loop on a sample of facts
    rng = random.Random(0)
    sample = rng.sample(w.facts, 60)
    for split in ("train", "heldout"):
        pairs = [(p, f.object) for f in sample for p in w.prompts(f, split)]
        mine = [independent_greedy(model, tok, p, o) for p, o in pairs]
        from rankone.testbed.check import greedy_hits

        theirs, _ = greedy_hits(model, tok, pairs)
        assert mine == theirs


@pytest.mark.parametrize("where", BUILTINS)
def test_builtin_was_trained_on_what_the_build_would_write(where) -> None:
    # world, build preset (profile style) and training text of the committed model are what
    # `rankone testbed build --world small --arch ARCH` makes today
    from rankone.testbed import build_world
    from rankone.testbed.train import TrainConfig, default_config
    from rankone.testbed.world import corpus_lines

    d = where()
    w, fresh = World.load(d), build_world("small", 0)
    assert w.facts == fresh.facts and w.subjects == fresh.subjects
    cfg = TrainConfig.from_dict(json.loads((d / "train_config.json").read_text()))
    preset = default_config(fresh, w.arch)
    assert w.profile_style == cfg.profile_style == preset.profile_style
    assert cfg.label_smoothing == preset.label_smoothing
    fresh.profile_style = preset.profile_style
    assert (d / "corpus.txt").read_text(encoding="utf-8").splitlines() == corpus_lines(fresh, cfg.filler_ratio)
    # the model card is what the build writes: its layer rule and hyper-parameters for this world
    from rankone.models.card import ModelCard
    from rankone.testbed.build import edit_hparams_for, edit_layer_for

    card = ModelCard.load(d / "rankone.json")
    assert card == w.model_card()
    assert card.layer == edit_layer_for(cfg.n_layer) and card.hparams == edit_hparams_for(fresh)
    assert card.resolve(card.stats_corpus) == d.resolve() / "corpus.txt" and card.resolve(card.cases) == d.resolve() / "world.json"


@pytest.mark.slow
def test_small_build_reaches_builtin_quality(tmp_path: Path) -> None:
    """`rankone testbed build` reproduces a model of the built-in one's quality (~3-8 min on
    2 cores; the Llama built-in is checked above, its build runs the same code)."""
    arch = "gpt2"
    from rankone.cli.testbed import register
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / f"small-{arch}"
    args = parser.parse_args(["testbed", "build", "--world", "small", "--arch", arch,
                              "--seed", "0", "--out", str(out), "--json"])
    assert args.func(args) == 0
    res = check_testbed(out)
    assert res["train"] >= 0.95 and res["heldout"] >= 0.90, res
    rep = json.loads((out / "report.json").read_text())
    assert rep["accuracy"] == World.load(out).accuracy
    # same world as the committed built-in model
    assert World.load(out).facts == World.load(builtin_model_dir()).facts


@pytest.mark.slow
@pytest.mark.parametrize("where", BUILTINS)
def test_rrome_edits_flip_builtin_answers(where) -> None:
    pytest.importorskip("rankone.edit.editor")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from testbed_build import edit_flips

    res = edit_flips(where(), 10, seed=0)
    # With the model's recommended hyper-parameters (world.json), as `rankone edit` uses them:
    # the bar of 9 flips out of 10, for both built-ins. Larger samples, and how often the
    # edited subject's other facts survive, are in BENCHMARKS.md (testbed section).
    assert res["flipped"] >= 9, res
    assert res["paraphrase"] >= 0.7, res  # held-out phrasings, never trained, follow the edit
    assert res["neighbours_kept"] >= 0.9, res
