"""Does a testbed model know its world? Greedy top-1 accuracy on the object.

Greedy generation reproduces the object's tokens o_1..o_m after a prompt exactly when, with the
object teacher-forced, argmax of the logits at each object position equals the next object
token. So one forward pass of "prompt + object" per fact measures greedy accuracy; no sampling
loop is needed.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Sequence

import torch

from rankone.core.errors import RankoneError
from rankone.testbed.world import World


def _encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]
                  ) -> list[tuple[list[int], list[int]]]:
    out = []
    for prompt, obj in pairs:
        # tokenizer(prompt) adds BOS where the tokenizer does (Llama); the object follows a space
        # and the byte-level pre-tokenizer never merges across it, so ids(prompt) + ids(" obj")
        # is exactly how the model sees "prompt obj".
        p = tokenizer(prompt)["input_ids"]
        o = tokenizer(" " + obj, add_special_tokens=False)["input_ids"]
        out.append((p, o))
    return out


@torch.no_grad()
def greedy_hits(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                batch_size: int = 256) -> tuple[list[bool], list[bool]]:
    """For each (prompt, object): (greedy reproduces the whole object, first token right)."""
    enc = _encode_pairs(tokenizer, pairs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    full: list[bool] = []
    first: list[bool] = []
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    for b in range(0, len(enc), batch_size):
        chunk = enc[b:b + batch_size]
        T = max(len(p) + len(o) for p, o in chunk)
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        for i, (p, o) in enumerate(chunk):
            ids[i, :len(p) + len(o)] = torch.tensor(p + o)
        # Right padding under a causal mask: pads come after every position we read, so they
        # cannot influence the logits we compare; no attention mask needed.
        pred = model(input_ids=ids.to(dev)).logits.argmax(-1).cpu()  # [B, T]
        for i, (p, o) in enumerate(chunk):
            got = pred[i, len(p) - 1:len(p) + len(o) - 1].tolist()  # predictions of o_1..o_m
            full.append(got == o)
            first.append(got[0] == o[0])
    if was_training:
        model.train()
    return full, first


def _acc(x: Sequence[bool]) -> float:
    return float(sum(x)) / len(x) if x else float("nan")


def fact_pairs(world: World, split: str, max_n: int | None = None, seed: int = 0
               ) -> list[tuple[str, str]]:
    pairs = [(p, f.object) for f in world.facts for p in world.prompts(f, split)]
    if max_n is not None and len(pairs) > max_n:
        pairs = random.Random(seed).sample(pairs, max_n)
    return pairs


def evaluate_world(model: Any, tokenizer: Any, world: World, max_n: int | None = None
                   ) -> dict[str, Any]:
    """Accuracy on training and held-out phrasings (and CounterFact record prompts).
    Each distinct (prompt, object) pair is run once, however many figures it enters."""
    out: dict[str, Any] = {"n_facts": len(world.facts)}
    groups: dict[str, list[tuple[str, str]]] = {
        split: fact_pairs(world, split, max_n) for split in ("train", "heldout")}
    if world.records:
        recs = world.records if max_n is None else world.records[:max_n]
        for key, prompt_key, obj_key in (("records", "prompt", "ground_truth"),
                                         ("locality", "locality_prompt", "locality_ground_truth"),
                                         ("rephrase", "rephrase_prompt", "ground_truth")):
            groups[key] = [(r[prompt_key], r[obj_key]) for r in recs if r.get(prompt_key)]
        # Every prompt the model was trained on (facts' training phrasings, extra sentences,
        # record prompts): the CounterFact acceptance figure, by first token.
        trained = list(dict.fromkeys(list(world.fact_sentences()) + groups["records"]))
        groups["trained_prompts"] = trained if max_n is None else trained[:max_n]
    uniq = list(dict.fromkeys(p for g in groups.values() for p in g))
    full, first = greedy_hits(model, tokenizer, uniq)
    hit = {p: (a, b) for p, a, b in zip(uniq, full, first)}
    for key, pairs in groups.items():
        if key == "trained_prompts":
            out["trained_prompts_first_token"] = _acc([hit[p][1] for p in pairs])
            continue
        out[key] = _acc([hit[p][0] for p in pairs])
        out[f"{key}_first_token"] = _acc([hit[p][1] for p in pairs])
        if key in ("train", "heldout"):
            out[f"n_{key}_prompts"] = len(pairs)
    return out


def load_testbed(model_dir: str | os.PathLike[str]) -> tuple[Any, Any, World]:
    """(model, tokenizer, world) from a testbed directory, offline."""
    d = Path(model_dir)
    if not d.is_dir():
        raise RankoneError(f"testbed directory not found: {d}; build one with "
                           "`rankone testbed build --out DIR`")
    for f in ("config.json", "world.json"):
        if not (d / f).is_file():
            raise RankoneError(f"{d} is not a testbed model directory (no {f}); build one "
                               "with `rankone testbed build --out DIR`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world = World.load(d)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)
    model.eval()
    return model, tok, world


def check_testbed(model_dir: str | os.PathLike[str], max_n: int | None = None
                  ) -> dict[str, Any]:
    """{"train": acc, "heldout": acc, "n_facts": ..., ...} for a testbed directory."""
    model, tok, world = load_testbed(model_dir)
    out = evaluate_world(model, tok, world, max_n)
    out["world"] = world.name
    out["arch"] = world.arch
    return out
