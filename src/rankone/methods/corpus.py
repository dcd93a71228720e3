"""Text for the key statistics: a user's corpus read as token windows, or one sampled from the model.

A corpus is a .txt file, a folder of .txt files or a .jsonl file with a "text" field. When a
model comes with none, `sampled_corpus` draws one from the model itself (ancestral sampling,
seeded, to a token budget, with a KV cache) and keeps it on disk under the model's fingerprint:
C = E[k kᵀ] then averages over the text the model itself expects, and nothing is downloaded.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from rankone.core.atomic import write_cache
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import file_sha256, model_sha256
from rankone.core.jsonfiles import loads
from rankone.core.progress import Progress
from rankone.core.tokens import encode, sample_tokens
from rankone.methods.cache import cache_root, digest

log = logging.getLogger(__name__)
SCHEMA = "rankone.methods.corpus/2"
# Sampled documents open with one of these words (after the tokenizer's own BOS, if any).
SAMPLE_STARTS = ("The", "In", "A", "It", "This", "He", "She", "When", "After", "There", "I", "We")
# Documents sampled at once: one forward pass per token serves them all, so the matrix products
# are wide enough to use the CPU (tokens a second by batch size: BENCHMARKS.md, "First edit").
SAMPLE_BATCH = 128


# ---- a user's corpus ------------------------------------------------------------------------


def corpus_files(path: str | os.PathLike) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise RankoneError(f"statistics corpus {p} does not exist; give a .txt file, a folder of .txt files or a .jsonl file")
    if not (p.is_dir() or p.is_file()):  # a FIFO would block the read forever, a device never ends
        raise RankoneError(f"statistics corpus {p} is not a regular file or a folder; give a .txt or .jsonl file")
    files = sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl") and q.is_file()) if p.is_dir() else [p]
    if not files:
        raise RankoneError(f"statistics corpus folder {p} holds no .txt or .jsonl files")
    return files


def iter_texts(path: str | os.PathLike, chunk_chars: int = 1 << 16) -> Iterator[str]:
    """Documents of the corpus; long plain-text files come in newline-aligned chunks."""
    for f in corpus_files(path):
        if f.suffix == ".jsonl":
            with open(f, "rb") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    d = loads(line, f"{f}:{n}", "each line of a .jsonl corpus is an object with a 'text' field")
                    if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                        raise RankoneError(f"{f}:{n} is not a JSON object with a 'text' field")
                    yield d["text"]
        else:
            with open(f, encoding="utf-8", errors="replace") as fh:
                rest = ""
                while block := fh.read(chunk_chars):
                    block = rest + block
                    cut = block.rfind("\n")
                    rest, block = (block[cut + 1:], block[: cut + 1]) if cut > 0 else ("", block)
                    yield block
                if rest:
                    yield rest


def token_windows(tok: Any, path: str | os.PathLike, window: int, n_tokens: int) -> Iterator[list[int]]:
    """Windows of at most `window` tokens, each led by the tokenizer's own prefix (e.g. BOS)."""
    lead = leading_special(tok)
    body = window - len(lead)
    budget = n_tokens
    buf: list[int] = []
    for text in iter_texts(path):
        buf.extend(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
        while len(buf) >= body and budget > 0:
            take = min(body, budget)
            yield lead + buf[:take]
            buf, budget = buf[take:], budget - take
        if budget <= 0:
            return
    if buf and budget > 0:
        yield lead + buf[:budget]


def leading_special(tok: Any) -> list[int]:
    """The special tokens the tokenizer puts in front of every text (e.g. [BOS], or none)."""
    ids, offsets = encode(tok, "a")
    lead = []
    for i, (s, e) in zip(ids, offsets):
        if e > s:
            break
        lead.append(i)
    return lead


# ---- a corpus sampled from the model ------------------------------------------------------


@dataclass(frozen=True)
class SampleBatch:
    """Documents sampled together: their starter words (of one token length) and new tokens each."""

    index: int
    starts: tuple[str, ...]
    n_new: int

    @property
    def tokens(self) -> int:
        return len(self.starts) * self.n_new


def sampling_plan(tok: Any, n_tokens: int, length: int, batch: int, limit: int | None) -> list[SampleBatch]:
    """The batches that give ceil(n_tokens / length) documents of `length` new tokens (fewer where
    the context window is shorter), document i opening with SAMPLE_STARTS[i % 12]; documents whose
    starters encode to the same number of tokens share batches (rows of one length: no padding)."""
    docs = [SAMPLE_STARTS[i % len(SAMPLE_STARTS)] for i in range(math.ceil(n_tokens / length))]
    lead = {s: len(encode(tok, s)[0]) for s in SAMPLE_STARTS}
    plan: list[SampleBatch] = []
    for n_lead in sorted(set(lead.values())):
        mine = [s for s in docs if lead[s] == n_lead]
        n_new = max(1, min(length, limit - n_lead)) if limit else length
        for i in range(0, len(mine), batch):
            plan.append(SampleBatch(len(plan), tuple(mine[i:i + batch]), n_new))
    return plan


def _sampled_corpus_file(model: torch.nn.Module, tok: Any, n_tokens: int, seed: int, length: int, batch: int,
                         cache_dir: str | os.PathLike | None) -> tuple[Path, dict[str, Any]]:
    """Where the sampled corpus of these settings is kept, and the key it is kept under (the batch
    size is in it: rows drawn together share a forward pass, whose rounding may depend on it)."""
    key = {"schema": SCHEMA, "model": model_sha256(model), "tokenizer": _tokenizer_id(tok), "seed": seed,
           "tokens": n_tokens, "length": length, "batch": batch, "starts": list(SAMPLE_STARTS)}
    root = (Path(cache_dir) if cache_dir is not None else cache_root()) / "corpus"
    return root / f"sampled-{digest(key)}.jsonl", key


def cached_sampled_corpus(
    model: torch.nn.Module, tok: Any, n_tokens: int, seed: int = 0, length: int = 128,
    cache_dir: str | os.PathLike | None = None, batch: int = SAMPLE_BATCH,
) -> Path | None:
    """The corpus `sampled_corpus` would return, if it is on disk already and intact; else None."""
    return _intact(*_sampled_corpus_file(model, tok, n_tokens, seed, length, batch, cache_dir))


def _intact(f: Path, key: dict[str, Any]) -> Path | None:
    try:
        meta = json.loads(f.with_suffix(".json").read_text())
        if meta.get("key") == key and meta.get("sha256") == file_sha256(f):
            return f
        log.warning("ignoring sampled corpus %s: it does not match this model or fails its checksum", f)
    except FileNotFoundError:
        pass
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        log.warning("ignoring unreadable sampled corpus %s (%s); sampling again", f, e)
    return None


def sampled_corpus(
    model: torch.nn.Module, tok: Any, n_tokens: int, seed: int = 0, length: int = 128, batch: int = SAMPLE_BATCH,
    cache_dir: str | os.PathLike | None = None, progress: bool = True,
) -> Path:
    """A JSONL corpus of about `n_tokens` sampled tokens, in documents of `length` new tokens.

    Sampled `batch` documents at a time with a KV cache. Kept in <cache>/corpus/ under (model
    fingerprint, tokenizer, seed, budget, length, batch); a second call for the same model finds it
    (the file's SHA-256 is checked) and samples nothing. Each finished batch is appended to a
    .partial file beside it at once, so an interrupted run (Ctrl-C, a crash) resumes after the
    last finished batch; batch b draws from its own generator, seeded by (seed, b), so a resumed
    corpus is the one an uninterrupted run writes.
    """
    if n_tokens < 1 or length < 1 or batch < 1:
        raise RankoneError(f"a sampled corpus needs a positive token budget, length and batch, got {n_tokens}, {length} and {batch}")
    f, key = _sampled_corpus_file(model, tok, n_tokens, seed, length, batch, cache_dir)  # the model hashed once
    if (found := _intact(f, key)) is not None:
        return found
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    plan = sampling_plan(tok, n_tokens, length, batch, limit)
    partial = f.with_suffix(".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    texts = _sample_documents(model, tok, plan, seed, partial, key, progress)
    data = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for b in texts for t in b).encode()
    if write_cache(f, data, "sampled statistics corpus"):
        write_cache(f.with_suffix(".json"), {"key": key, "sha256": file_sha256(f)}, "sampled corpus's checksum")
        partial.unlink(missing_ok=True)
        return f
    return _process_file(data, ".jsonl")  # the cache is full or read-only: this run still needs the file


def _process_file(data: bytes, suffix: str) -> Path:
    """`data` in a temporary file that lives as long as this process."""
    fd, name = tempfile.mkstemp(prefix="rankone-", suffix=suffix)
    atexit.register(lambda: os.path.exists(name) and os.unlink(name))
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(name)


def _sample_documents(model: torch.nn.Module, tok: Any, plan: list[SampleBatch], seed: int, partial: Path,
                      key: dict[str, Any], progress: bool) -> list[list[str]]:
    """The texts of every batch of the plan, in order: those of the partial file, then sampled."""
    done = _read_partial(partial, key, plan)
    with Progress(sum(b.tokens for b in plan), "sampling a statistics corpus", "tokens", enabled=progress,
                  initial=sum(plan[i].tokens for i in range(len(done)))) as bar, open(partial, "a", encoding="utf-8") as fh:
        if not done:  # a new partial file opens with the key it belongs to
            fh.write(json.dumps({"key": key}) + "\n")
        for b in plan[len(done):]:
            gen = torch.Generator().manual_seed(int(digest({"seed": seed, "batch": b.index})[:15], 16))
            lead = torch.tensor([encode(tok, s)[0] for s in b.starts])  # [rows, n_lead]
            ids = sample_tokens(model, lead, b.n_new, gen, on_step=bar.update)  # [rows, n_lead + n_new]
            texts = [tok.decode(r, skip_special_tokens=True) for r in ids.tolist()]
            fh.write(json.dumps({"batch": b.index, "texts": texts}, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            done.append(texts)
    return done


def _read_partial(partial: Path, key: dict[str, Any], plan: list[SampleBatch]) -> list[list[str]]:
    """The batches an interrupted run finished (its .partial file for the same key), in order; the
    file is cut after the last whole one. Anything else is started afresh."""
    try:
        lines = partial.read_bytes().split(b"\n")
    except FileNotFoundError:
        return []
    done: list[list[str]] = []
    good = 0  # bytes of whole, valid lines
    try:
        if json.loads(lines[0]).get("key") != key:
            raise ValueError("another key")
        good = len(lines[0]) + 1
        for line in lines[1:len(plan) + 1]:
            rec = json.loads(line)
            b = plan[len(done)]
            if rec.get("batch") != b.index or len(rec.get("texts", ())) != len(b.starts):
                break
            done.append([str(t) for t in rec["texts"]])
            good += len(line) + 1
    except (ValueError, AttributeError, TypeError):  # a line cut short by the interruption ends what is kept
        pass
    if not good:
        partial.unlink()
        return []
    with open(partial, "r+b") as fh:
        fh.truncate(good)
    if done:
        log.info("resuming the sampled corpus after %d of %d batches (%s)", len(done), len(plan), partial)
    return done


def _tokenizer_id(tok: Any) -> dict[str, Any]:
    """Enough of the tokenizer to tell two apart cheaply: its size and how it spells the starters."""
    return {"size": len(tok), "starts": [encode(tok, s)[0] for s in SAMPLE_STARTS]}
