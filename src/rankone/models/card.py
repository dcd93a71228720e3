"""The model card: what a model recommends for editing it, in `rankone.json` beside the model.

Like ROME's per-model hyper-parameter files, but kept with the model. For a model folder the card
is `FOLDER/rankone.json`; for a GGUF file `NAME.gguf` it is `NAME.rankone.json` in the same folder.
The testbed build writes one; anyone may write one for their own model. Every key is optional:

    {
      "schema_version": 1,
      "layer": 4,                        # the layer to edit (else n_layers // 8, `default_layer`)
      "hparams": {"v_steps": 100},       # settings fields (any method's); the user's own settings win
      "stats_corpus": "corpus.txt",      # text for the key statistics C (relative to the card)
      "cases": "world.json",             # facts the model knows (for tracing and --layer auto)
      "notes": "free text"
    }

Paths are relative to the folder that holds the card and must stay inside it (a card travels with
a model from anywhere: an absolute path or one with '..' is refused when the card is read, so that
a card cannot make rankone read, and record the digest of, any file on the machine). An unknown key or a value of the wrong type is
refused with one line naming the file and the key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankone.core.atomic import write_json
from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import inside, loads, read_text

CARD_FILE = "rankone.json"
SCHEMA_VERSION = 1

# key -> (accepted JSON types, what to write); None is always accepted for an optional key
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "schema_version": ((int,), "the number 1"),
    "layer": ((int,), "a layer number (0 or more)"),
    "hparams": ((dict,), "an object of method settings"),
    "stats_corpus": ((str,), "a path (text file, folder of .txt or .jsonl)"),
    "cases": ((str,), "a path to a case file"),
    "notes": ((str,), "text"),
}


@dataclass
class ModelCard:
    layer: int | None = None  # recommended edit layer
    hparams: dict[str, Any] = field(default_factory=dict)  # recommended method settings (rankone.methods)
    stats_corpus: str | None = None  # relative to `folder`
    cases: str | None = None  # relative to `folder`: facts this model knows
    notes: str | None = None
    folder: Path | None = field(default=None, compare=False, repr=False)  # where the card lives; not saved
    file: Path | None = field(default=None, compare=False, repr=False)  # the file it was read from; not saved

    # -- reading and writing --

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for k in ("layer", "hparams", "stats_corpus", "cases", "notes"):
            v = getattr(self, k)
            if v is not None and v != {}:
                d[k] = v
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = CARD_FILE, folder: Path | None = None) -> "ModelCard":
        if not isinstance(d, dict):
            raise RankoneError(f"{where} must hold a JSON object (keys: {', '.join(_TYPES)})")
        unknown = sorted(set(d) - set(_TYPES))
        if unknown:
            raise RankoneError(f"{where}: unknown key(s) {unknown}; a model card knows {', '.join(_TYPES)}")
        for k, v in d.items():
            types, what = _TYPES[k]
            if v is not None and (not isinstance(v, types) or isinstance(v, bool)):
                raise RankoneError(f"{where}: {k!r} must be {what}, not {json.dumps(v)[:40]}")
        if d.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise RankoneError(f"{where}: schema_version {d['schema_version']} is not supported (this rankone reads 1)")
        if d.get("layer") is not None and d["layer"] < 0:
            raise RankoneError(f"{where}: 'layer' must be 0 or more, not {d['layer']}")
        for k in ("stats_corpus", "cases"):  # a card read from a folder names files in that folder only
            if folder is not None and d.get(k) is not None:
                inside(folder, d[k], f"{where}: {k}")
        return cls(layer=d.get("layer"), hparams=dict(d.get("hparams") or {}), stats_corpus=d.get("stats_corpus"),
                   cases=d.get("cases"), notes=d.get("notes"), folder=folder)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelCard":
        p = Path(path)
        try:
            text = read_text(p, f"model card {p}")
        except OSError as e:
            raise RankoneError(f"cannot read the model card {p}: {e.strerror}") from None
        d = loads(text, f"model card {p}", "fix or remove it")
        card = cls.from_dict(d, str(p), p.parent.resolve())
        card.file = p
        return card

    def save(self, path: str | os.PathLike) -> Path:
        """Write the card atomically (a reader sees the old card or the new one)."""
        p = Path(path)
        write_json(p, self.to_dict())
        return p

    # -- what it recommends --

    def recommended(self) -> dict[str, Any]:
        """Hyper-parameters the model recommends: `hparams`, with `layer` in it when given."""
        rec = dict(self.hparams)
        if self.layer is not None:
            rec.setdefault("layer", self.layer)
        return rec

    def resolve(self, rel: str | None, what: str = "a path") -> Path | None:
        """A path of the card (stats_corpus, cases) as a real path inside the card's folder; one
        line refusing a path that leaves it. A card made in memory (no folder) keeps paths as given."""
        if rel is None:
            return None
        if self.folder is None:
            return Path(rel)
        return inside(self.folder, rel, f"{self.folder / CARD_FILE}: {what}")


def card_path(source: str | os.PathLike) -> Path:
    """Where the card of a model folder or a .gguf file lives."""
    p = Path(source)
    return p / CARD_FILE if p.is_dir() else p.with_name(f"{p.stem}.{CARD_FILE}")


def find_card(source: str | os.PathLike) -> ModelCard | None:
    """The card beside a model folder or .gguf file, or None when there is none."""
    p = card_path(source)
    return ModelCard.load(p) if p.is_file() else None


def default_layer(card: ModelCard | None, n_layers: int) -> int:
    """The one default-layer rule: the card's layer, else an eighth of the way up (n_layers // 8).

    Why an eighth: r-ROME swept over layers on 30 known CounterFact cases (BENCHMARKS.md, "Layer
    choice on a real model") edits best early on both real models, layers 1-3 of SmolLM2-135M's 30
    and layers 1-2 of Gemma 3 270M's 18, where the neighbours of the edited fact suffer least; the old
    rule, n_layers // 4 (layers 7 and 4), fell short of the best layer's S on both."""
    if card is not None and card.layer is not None:
        return card.layer
    return n_layers // 8
