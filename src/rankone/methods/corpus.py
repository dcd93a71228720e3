"""Text for the key statistics: a user's corpus read as token windows, or one sampled from the model.

A corpus is a .txt file, a folder of .txt files or a .jsonl file with a "text" field. When a
model comes with none, `sampled_corpus` draws one from the model itself (ancestral sampling,
seeded, to a token budget, with a KV cache) and keeps it on disk under the model's fingerprint:
C = E[k kᵀ] then averages over the text the model itself expects, and nothing is downloaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm.auto import tqdm

from rankone.core.atomic import write_bytes, write_json
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import file_sha256, model_sha256
from rankone.core.tokens import encode, sample_tokens
from rankone.methods.cache import cache_root, digest

log = logging.getLogger(__name__)
SCHEMA = "rankone.methods.corpus/1"
# Sampled documents open with one of these words (after the tokenizer's own BOS, if any).
SAMPLE_STARTS = ("The", "In", "A", "It", "This", "He", "She", "When", "After", "There", "I", "We")


# ---- a user's corpus ------------------------------------------------------------------------


def corpus_files(path: str | os.PathLike) -> list[Path]:
    p = Path(path)
    if not p.exists():
        raise RankoneError(f"statistics corpus {p} does not exist; give a .txt file, a folder of .txt files or a .jsonl file")
    files = sorted(q for q in p.rglob("*") if q.suffix in (".txt", ".jsonl")) if p.is_dir() else [p]
    if not files:
        raise RankoneError(f"statistics corpus folder {p} holds no .txt or .jsonl files")
    return files


def iter_texts(path: str | os.PathLike, chunk_chars: int = 1 << 16) -> Iterator[str]:
    """Documents of the corpus; long plain-text files come in newline-aligned chunks."""
    for f in corpus_files(path):
        if f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise RankoneError(f"{f}:{n} is not a JSON object with a 'text' field") from None
                    yield str(text)
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


def _sampled_corpus_file(model: torch.nn.Module, tok: Any, n_tokens: int, seed: int, length: int,
                         cache_dir: str | os.PathLike | None) -> tuple[Path, dict[str, Any]]:
    """Where the sampled corpus of these settings is kept, and the key it is kept under."""
    key = {"schema": SCHEMA, "model": model_sha256(model), "tokenizer": _tokenizer_id(tok), "seed": seed,
           "tokens": n_tokens, "length": length, "starts": list(SAMPLE_STARTS)}
    root = (Path(cache_dir) if cache_dir is not None else cache_root()) / "corpus"
    return root / f"sampled-{digest(key)}.jsonl", key


def cached_sampled_corpus(
    model: torch.nn.Module, tok: Any, n_tokens: int, seed: int = 0, length: int = 128,
    cache_dir: str | os.PathLike | None = None,
) -> Path | None:
    """The corpus `sampled_corpus` would return, if it is on disk already and intact; else None."""
    f, key = _sampled_corpus_file(model, tok, n_tokens, seed, length, cache_dir)
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
    model: torch.nn.Module, tok: Any, n_tokens: int, seed: int = 0, length: int = 128, batch: int = 32,
    cache_dir: str | os.PathLike | None = None, progress: bool = True,
) -> Path:
    """A JSONL corpus of about `n_tokens` sampled tokens, in documents of `length` new tokens.

    Kept in <cache>/corpus/ under (model fingerprint, tokenizer, seed, budget, length); a second
    call for the same model finds it (the file's SHA-256 is checked) and samples nothing. Sampling
    a large budget is long on a CPU, so it is resumable: each batch of documents is appended to a
    partial file whose checkpoint (its length, digest and the generator's state) is written after
    it, and an interrupted call's successor goes on from the last checkpoint to the same text.
    """
    if n_tokens < 1 or length < 1:
        raise RankoneError(f"a sampled corpus needs a positive token budget and length, got {n_tokens} and {length}")
    found = cached_sampled_corpus(model, tok, n_tokens, seed, length, cache_dir)
    if found is not None:
        return found
    f, key = _sampled_corpus_file(model, tok, n_tokens, seed, length, cache_dir)
    part = _Partial(f, {**key, "batch": batch})
    _sample_documents(model, tok, n_tokens, seed, length, batch, progress, part)
    write_bytes(f, part.file.read_bytes())
    write_json(f.with_suffix(".json"), {"key": key, "sha256": file_sha256(f)})
    part.remove()
    return f


class _Partial:
    """A sampled corpus being written: the documents so far (JSONL) and its checkpoint."""

    def __init__(self, final: Path, key: dict[str, Any]) -> None:
        self.file = final.with_name(final.stem + ".partial.jsonl")
        self.meta = final.with_name(final.stem + ".partial.json")
        self.key = key

    def resume(self, gen: torch.Generator) -> int:
        """The number of batches already sampled (0 to start afresh); restores the generator to
        its state after them and cuts the file to what the checkpoint covers."""
        try:
            meta = json.loads(self.meta.read_text())
            with open(self.file, "rb") as fh:
                done = fh.read(int(meta["bytes"]))
            if meta.get("key") != self.key or len(done) != meta["bytes"] or hashlib.sha256(done).hexdigest() != meta["sha256"]:
                raise ValueError("it does not match these settings or its checkpoint")
            gen.set_state(torch.tensor(list(base64.b64decode(meta["generator"])), dtype=torch.uint8))
        except FileNotFoundError:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            self.file.write_bytes(b"")
            return 0
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            log.warning("starting the sampled corpus %s over: its partial file is unusable (%s)", self.file, e)
            self.file.write_bytes(b"")
            return 0
        with open(self.file, "r+b") as fh:
            fh.truncate(len(done))
        log.info("resuming the sampled corpus %s after %d batch(es)", self.file, meta["batches"])
        return int(meta["batches"])

    def append(self, texts: list[str], batches: int, gen: torch.Generator) -> None:
        with open(self.file, "ab") as fh:
            fh.write("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode())
            fh.flush()
            os.fsync(fh.fileno())
        done = self.file.read_bytes()
        write_json(self.meta, {"key": self.key, "batches": batches, "bytes": len(done),
                               "sha256": hashlib.sha256(done).hexdigest(),
                               "generator": base64.b64encode(bytes(gen.get_state().tolist())).decode()})

    def remove(self) -> None:
        self.meta.unlink(missing_ok=True)
        self.file.unlink(missing_ok=True)


def _sample_documents(
    model: torch.nn.Module, tok: Any, n_tokens: int, seed: int, length: int, batch: int, progress: bool,
    part: _Partial,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    n_docs = math.ceil(n_tokens / length)
    start = part.resume(gen)
    bar = tqdm(total=n_docs * length, unit="tok", desc="sampling a statistics corpus", disable=not progress, leave=False,
               initial=min(n_docs, start * batch) * length)
    for b in range(start, math.ceil(n_docs / batch)):
        lead = encode(tok, SAMPLE_STARTS[b % len(SAMPLE_STARTS)])[0]
        n_new = min(length, limit - len(lead)) if limit else length
        rows = min(batch, n_docs - b * batch)
        ids = sample_tokens(model, torch.tensor([lead] * rows), n_new, gen)  # [rows, lead + n_new]
        part.append([tok.decode(r, skip_special_tokens=True) for r in ids.tolist()], b + 1, gen)
        bar.update(rows * n_new)
    bar.close()


def _tokenizer_id(tok: Any) -> dict[str, Any]:
    """Enough of the tokenizer to tell two apart cheaply: its size and how it spells the starters."""
    return {"size": len(tok), "starts": [encode(tok, s)[0] for s in SAMPLE_STARTS]}
