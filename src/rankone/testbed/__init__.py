"""The built-in knowledge testbed: small models trained by rankone that really know facts.

    from rankone.testbed import builtin_model_dir, World, build_world, build_testbed, check_testbed

    d = builtin_model_dir()                  # committed GPT-2 model of the `small` world
    world = World.load(d)                    # its facts, phrasings and held-out split
    check_testbed(d)                         # {"train": 0.99.., "heldout": 0.9.., "n_facts": ...}
    build_testbed("small", "llama", "runs/small-llama", seed=0, time_budget_s=300)

Each directory is an ordinary Hugging Face model directory (config.json, model.safetensors,
tokenizer.json, ...) plus world.json (the facts) and corpus.txt (the training text).
"""

from __future__ import annotations

from pathlib import Path

from rankone.testbed.build import build_testbed, build_world
from rankone.testbed.check import check_testbed, load_testbed
from rankone.testbed.world import Fact, Relation, World

__all__ = ["builtin_model_dir", "builtin_llama_dir", "World", "Fact", "Relation",
           "build_world", "build_testbed", "check_testbed", "load_testbed"]


def builtin_model_dir() -> Path:
    """The committed `small`-world GPT-2 testbed (package data; loads in well under a second)."""
    return Path(__file__).resolve().parent / "builtin"


def builtin_llama_dir() -> Path:
    """The committed `small`-world Llama testbed (BOS-adding tokenizer)."""
    return Path(__file__).resolve().parent / "builtin" / "llama"
