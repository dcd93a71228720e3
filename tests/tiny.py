"""Tiny models and tokenizers built in-process from a config (no downloads, no mocks)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

# The first 200,000 characters of tinyshakespeare, shipped with the tests so that a clone with
# nothing beside it trains the same tokenizer as CI.
SHAKESPEARE = Path(__file__).resolve().parent / "data" / "tinyshakespeare_200k.txt"
VOCAB = 400


def corpus_text() -> str:
    return SHAKESPEARE.read_text()


def make_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE like GPT-2's; with bos=True it adds <s> in front like Llama's tokenizers."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<s>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([corpus_text()], trainer)
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<s>" if bos else None)


_SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=128)
_LLAMA = dict(_SMALL, num_key_value_heads=1, intermediate_size=64)
CONFIGS = {
    "gpt2": dict(n_embd=32, n_layer=3, n_head=2, n_positions=128),
    "gptj": dict(n_embd=32, n_layer=3, n_head=2, n_positions=128, rotary_dim=8),
    "gpt_neox": dict(_SMALL, intermediate_size=64),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": dict(_LLAMA, head_dim=16),
    "gemma": dict(_LLAMA, head_dim=16),
    "gemma2": dict(_LLAMA, head_dim=16),
    "phi": dict(_SMALL, intermediate_size=64),
    "phi3": dict(_SMALL, num_key_value_heads=2, intermediate_size=64, pad_token_id=0),
    "opt": dict(_SMALL, ffn_dim=64, word_embed_proj_dim=32),
    "falcon": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, new_decoder_architecture=False, multi_query=True),
}
BOS_ARCHS = {"llama", "mistral", "gemma", "gemma2", "phi3"}


def make_model(model_type: str, seed: int = 0, **overrides) -> torch.nn.Module:
    kw = dict(CONFIGS[model_type], vocab_size=VOCAB, **overrides)
    kw.setdefault("bos_token_id", 1)
    kw.setdefault("eos_token_id", 0)
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def write_gguf(model: torch.nn.Module, tok: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """A tiny llama model and its byte-level BPE tokenizer as a float32 .gguf file (llama.cpp's
    layout, q/k rows permuted as llama.cpp's converter does), written with the `gguf` package."""
    import json

    import gguf

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg.hidden_size // n_head)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])])
    w.add_token_types([1] * len(tok))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)

    def permute(t: torch.Tensor, heads: int) -> torch.Tensor:  # HF rotary halves -> llama.cpp interleaved
        return t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    for k, v in model.state_dict().items():
        base, suffix = k.rsplit(".", 1)
        t = v.detach().float()
        if base.endswith("q_proj"):
            t = permute(t, n_head)
        elif base.endswith("k_proj"):
            t = permute(t, n_kv)
        w.add_tensor(f"{names.get_name(base)}.{suffix}", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def make_testbed_requests(world, n: int, seed: int = 0) -> tuple[list, list[tuple[str, str]]]:
    """n edit requests on a testbed world's facts (seeded): each fact's first trained phrasing
    towards another object of its relation; and the (prompt, target) pairs to check them with."""
    import random

    from rankone.core.tokens import EditRequest

    rng = random.Random(seed)
    reqs, pairs = [], []
    for f in rng.sample(world.facts, n):
        target = rng.choice([o for o in world.relation(f.relation).objects if o != f.object])
        prompt = world.prompts(f, "train")[0]
        reqs.append(EditRequest.create(prompt, f.subject, target))
        pairs.append((prompt, target))
    return reqs, pairs
