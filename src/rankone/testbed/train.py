"""Tokenizer, model and training loop of a testbed model (CPU, seeded, time-budgeted).

Measured on a 2-core CPU: a 4-layer 128-wide GPT-2 trains at ~15k tokens/s. Weighting the
object token's loss x4 is what lets ~1M parameters hold thousands of facts within minutes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from rankone.core.errors import RankoneError
from rankone.core.progress import Progress
from rankone.testbed.check import evaluate_world
from rankone.testbed.world import World, corpus_lines

ARCHS = ("gpt2", "llama")


@dataclass
class TrainConfig:
    """Everything a build depends on besides the world. Round-trips to JSON."""
    arch: str = "gpt2"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    vocab_size: int = 2048
    n_positions: int = 128
    batch_size: int = 64  # rows per step
    max_row_sentences: int = 3  # rows concatenate 1..3 sentences: facts at and after position 0
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    object_weight: float = 4.0  # loss weight of the object's tokens
    label_smoothing: float = 0.0  # >0 keeps answers from being drilled to certainty
    filler_ratio: float = 0.3
    profile_style: str = "objects"  # how profile lines teach the world, see World.profile_sentences
    target_train: float = 0.99  # stop once training phrasings reach this (greedy) ...
    target_heldout: float = 0.95  # ... and held-out phrasings reach this
    time_budget_s: float = 600.0
    eval_every_steps: int = 200
    eval_max_prompts: int = 1000  # periodic checks use a fixed sample
    max_epochs: int = 1000
    seed: int = 0
    threads: int = 0  # 0: torch's default (the machine's cores); 1 is fastest on a busy shared machine

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def default_config(world: World, arch: str = "gpt2") -> TrainConfig:
    """Presets measured on this 2-core machine (see BENCHMARKS.md)."""
    if arch not in ARCHS:
        raise RankoneError(f"unknown arch {arch!r}; use one of {', '.join(ARCHS)}")
    if world.kind == "counterfact":
        # Label smoothing and an early stop at 95 %: CounterFact answers drilled to p≈0.99
        # made ROME edits fail (value vector at the norm clamp).
        return TrainConfig(arch=arch, n_embd=192, n_head=6, vocab_size=4096,
                           label_smoothing=0.1, target_train=0.95, target_heldout=0.0,
                           time_budget_s=1200.0, eval_every_steps=300)
    if world.name == "bench":
        # 400 subjects at 4x256 reached only 13 % in 22 minutes here (pooled names are slow to
        # learn, the machine was shared); 200 subjects (1,200 facts) at 4x192 is what fits.
        return TrainConfig(arch=arch, n_embd=192, n_head=6, label_smoothing=0.1,
                           time_budget_s=1800.0)
    # Label smoothing helps GPT-2 edits take but not Llama's; one object per profile line helps
    # Llama's and ruins GPT-2's (BENCHMARKS.md, testbed section).
    if arch == "llama":
        return TrainConfig(arch=arch, label_smoothing=0.0, profile_style="pairs", time_budget_s=600.0)
    return TrainConfig(arch=arch, label_smoothing=0.1, time_budget_s=600.0)


# ====================================================================== tokenizer

def build_tokenizer(lines: list[str], objects: list[str], cfg: TrainConfig) -> Any:
    """Byte-level BPE trained on the corpus, wrapped as a PreTrainedTokenizerFast.

    Objects are fed to the BPE trainer with a high count so that " Paris" becomes one token
    where the vocabulary allows (the object then has its own token, first-token accuracy is
    unambiguous). The Llama flavour adds a BOS token in a post-processor, as real Llama
    tokenizers do, so the engine is exercised with both conventions.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    llama = cfg.arch == "llama"
    specials = ["<s>", "</s>"] if llama else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=2,
                                  special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    boost = [" " + " ".join(objects)] * 200
    tok.train_from_iterator(lines + boost, trainer=trainer)
    if llama:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                          special_tokens=[("<s>", bos)])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       pad_token="</s>", add_bos_token=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>")


# ====================================================================== model

def build_model(cfg: TrainConfig, tokenizer: Any) -> Any:
    torch.manual_seed(cfg.seed)
    V = len(tokenizer)
    if cfg.arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        conf = GPT2Config(vocab_size=V, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                          n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        return GPT2LMHeadModel(conf)
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(vocab_size=V, hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.n_head, max_position_embeddings=cfg.n_positions,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(conf)


# ====================================================================== data

Sentence = tuple[list[int], list[float]]  # token ids, per-token loss weight (as a target)


def encode_sentences(world: World, tokenizer: Any, cfg: TrainConfig,
                     lines_filler: list[str]) -> list[tuple[Sentence, Sentence]]:
    """Each sentence encoded twice: at a row start and after a previous sentence (" ...")."""
    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out = []
    items: list[tuple[str, str | None]] = [(p, o) for p, o in world.fact_sentences()]
    items += [(s, None) for s in lines_filler]
    for prompt, obj in items:
        pair = []
        for lead in ("", " "):
            if obj is None:
                ids = enc(lead + prompt)
                w = [1.0] * len(ids)
            else:
                p, o, dot = enc(lead + prompt), enc(" " + obj), enc(".")
                ids = p + o + dot
                w = [1.0] * len(p) + [cfg.object_weight] * len(o) + [1.0] * len(dot)
            pair.append((ids, w))
        out.append((pair[0], pair[1]))
    return out


def make_batches(sents: list[tuple[Sentence, Sentence]], cfg: TrainConfig, rng: random.Random,
                 bos: int | None, pad: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch: rows of 1..k shuffled sentences, length-sorted within chunks to cut padding.
    Returns [(ids [B, T], weights [B, T])] where weights[b, t] weighs predicting ids[b, t]."""
    order = list(range(len(sents)))
    rng.shuffle(order)
    rows: list[tuple[list[int], list[float]]] = []
    i = 0
    while i < len(order):
        k = rng.randint(1, cfg.max_row_sentences)
        ids: list[int] = [bos] if bos is not None else []
        w: list[float] = [0.0] * len(ids)
        for j, si in enumerate(order[i:i + k]):
            s_ids, s_w = sents[si][0 if j == 0 else 1]
            if len(ids) + len(s_ids) > cfg.n_positions and j > 0:
                k = j
                break
            ids += s_ids
            w += s_w
        i += k
        rows.append((ids[:cfg.n_positions], w[:cfg.n_positions]))
    B = cfg.batch_size
    chunk = B * 50
    batches = []
    for c in range(0, len(rows), chunk):
        part = sorted(rows[c:c + chunk], key=lambda r: len(r[0]))
        for b in range(0, len(part), B):
            group = part[b:b + B]
            T = max(len(r[0]) for r in group)
            ids_t = torch.full((len(group), T), pad, dtype=torch.long)
            w_t = torch.zeros((len(group), T))
            for r, (ids, w) in enumerate(group):
                ids_t[r, :len(ids)] = torch.tensor(ids)
                w_t[r, :len(w)] = torch.tensor(w)
            batches.append((ids_t, w_t))
    rng.shuffle(batches)
    return batches


# ====================================================================== training

@dataclass
class TrainReport:
    reached: bool
    stop_reason: str
    steps: int
    epochs: float
    train_seconds: float
    tokens: int
    tokens_per_s: float
    params: int
    accuracy: dict[str, float]  # the last periodic check (sampled)


def train(model: Any, tokenizer: Any, world: World, cfg: TrainConfig,
          log: Callable[[str], None] | None = None, progress: bool = True) -> TrainReport:
    """Train until the sampled fact accuracy reaches the targets or the time budget runs out."""
    # No cap: the machine's cores by default. On a busy shared machine ask for 1: measured on 2
    # cores while another process held one, 1 thread 8.1k tokens/s, 2 threads 1.3k tokens/s.
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(f"rankone-train-{cfg.seed}")
    filler_rng = random.Random(f"rankone-filler-{cfg.seed}")
    from rankone.testbed.world import filler_sentences

    n_fact = sum(1 for _ in world.fact_sentences())
    filler = filler_sentences(int(n_fact * cfg.filler_ratio), world.subjects, filler_rng)
    filler += world.profile_sentences()  # plain text: every token weighs 1
    sents = encode_sentences(world, tokenizer, cfg, filler)
    bos = tokenizer.bos_token_id if cfg.arch == "llama" else None
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    params = sum(p.numel() for p in model.parameters())
    model.train()
    steps, tokens, epoch = 0, 0, 0
    t0 = time.monotonic()
    acc: dict[str, float] = {}
    reason = "time budget"
    bar = Progress(int(cfg.time_budget_s), f"training {world.name}/{cfg.arch}", "s of the time budget",
                   enabled=progress, min_interval=10.0)
    done = False
    while not done and epoch < cfg.max_epochs:
        batches = make_batches(sents, cfg, rng, bos, pad)
        for ids, w in batches:
            # ids, w: [B, T]; predict ids[:, 1:] from logits[:, :-1]
            logits = model(input_ids=ids).logits[:, :-1]  # [B, T-1, V]
            tgt, tw = ids[:, 1:], w[:, 1:]
            loss_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                       reduction="none", label_smoothing=cfg.label_smoothing)
            loss = (loss_tok * tw.reshape(-1)).sum() / tw.sum().clamp_min(1.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            steps += 1
            tokens += int((tw > 0).sum())
            elapsed = time.monotonic() - t0
            bar.update(max(0, int(elapsed) - bar.n))
            if steps % cfg.eval_every_steps == 0 or elapsed > cfg.time_budget_s:
                acc = {k: v for k, v in evaluate_world(model, tokenizer, world,
                                                       cfg.eval_max_prompts).items()
                       if k in ("train", "heldout", "trained_prompts_first_token")}
                bar.note(f"loss {loss.item():.3f}, " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
                if log:
                    log(f"step {steps} epoch {epoch} {elapsed:.0f}s loss {loss.item():.3f} {acc}")
                model.train()
                if _reached(acc, cfg):
                    reason, done = "accuracy reached", True
                    break
                if elapsed > cfg.time_budget_s:
                    done = True
                    break
        epoch += 1
    bar.close()
    if not done and epoch >= cfg.max_epochs:
        reason = "max epochs"
    train_s = time.monotonic() - t0
    model.eval()
    return TrainReport(reached=_reached(acc, cfg), stop_reason=reason, steps=steps,
                       epochs=round(steps / max(1, len(batches)), 2), train_seconds=round(train_s, 1),
                       tokens=tokens, tokens_per_s=round(tokens / max(train_s, 1e-9)),
                       params=params, accuracy=acc)


def _reached(acc: dict[str, float], cfg: TrainConfig) -> bool:
    if not acc:
        return False
    train_key = "trained_prompts_first_token" if "trained_prompts_first_token" in acc else "train"
    h = acc.get("heldout", 0.0)
    return acc[train_key] >= cfg.target_train and (math.isnan(h) or h >= cfg.target_heldout)


def save_testbed(out: Path, model: Any, tokenizer: Any, world: World, cfg: TrainConfig,
                 lines: list[str]) -> None:
    """Write an ordinary Hugging Face model directory plus world.json (the facts), corpus.txt and
    rankone.json (the model card: what the engine should use to edit it)."""
    from rankone.models.card import CARD_FILE

    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "train_config.json").write_text(cfg.to_json() + "\n", encoding="utf-8")
    world.save(out)
    world.model_card().save(out / CARD_FILE)
    for f in out.iterdir():  # save_pretrained writes some files 0600; package data must be readable
        f.chmod(0o644)
