"""Flags and steps every command shares: the model flags, loading, request files, hyper-parameters."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable

from rankone.core.errors import RankoneError
from rankone.methods.base import METHODS, method, user_settings
from rankone.methods.settings import describe_fields


def methods_help() -> str:
    """--method's help: each method of the table in one line."""
    return "; ".join(f"{name}: {method(name).summary}" for name in METHODS) + " (see the README's Methods)"


def hparams_help() -> str:
    """--hparams' help: the settings of each method of the table (one entry per settings class)."""
    by_class: dict[Any, list[str]] = {}
    for name in METHODS:
        by_class.setdefault(method(name).settings, []).append(name)
    parts = [f"for {', '.join(names)} any of: {describe_fields(cls, frozenset({'method'}))}" for cls, names in by_class.items()]
    return ("JSON object (or a JSON file) of the method's settings; " + ". ".join(parts)
            + ". What is not given comes from the model card (rankone.json), then the paper's defaults")


def model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="local Hugging Face model folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    p.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16 or auto")
    p.add_argument("--device-map", default=None, help="'auto' spreads a large model over devices (accelerate)")
    p.add_argument("--arch-spec", default=None, help="JSON (or a JSON file) of module path templates for an unlisted architecture")


def load(args: argparse.Namespace, path: str | None = None) -> Any:
    """The ModelHandle of --model (a folder, a .gguf file or a hub id); unpacks to (model, tok)."""
    from rankone.models.load import load_model, read_arch_override

    return load_model(path or args.model, args.device, args.dtype, args.device_map, read_arch_override(args.arch_spec))


def load_requests(path: str) -> list[Any]:
    from rankone.core.tokens import EditRequest

    if not os.path.isfile(path):
        raise RankoneError(f"requests file {path} does not exist")
    from rankone.core.jsonfiles import json_lines

    reqs = []
    seen: dict[tuple[str, str], tuple[str, str]] = {}  # (prompt, subject) -> (where, target)
    for where, d in json_lines(path, "one object per line with prompt, subject, target"):
        try:
            r = EditRequest.from_dict(d)
        except RankoneError as e:
            raise RankoneError(f"{where}: {e}") from None
        fact = (" ".join(r.prompt.split()), " ".join(r.subject.split()))
        if fact in seen:  # one fact twice is no more edit, and two targets for one fact contradict each other
            line, target = seen[fact]
            again = "repeats" if target == r.target else f"gives another target ({r.target!r}, not {target!r}) for the fact of"
            raise RankoneError(f"{where} {again} {line}; give each fact once")
        seen[fact] = (where, r.target)
        reqs.append(r)
    if not reqs:
        raise RankoneError(f"requests file {path} holds no requests")
    return reqs


def hparams_from(args: argparse.Namespace) -> dict[str, Any]:
    """The user's settings (--hparams, then flags), checked now against their method's settings
    class (names, types, ranges), before any model loads; merged with the model card's later."""
    from rankone.core.jsonfiles import json_object, read_text

    given: dict[str, Any] = {}
    if args.hparams:
        if os.path.isfile(args.hparams):
            given = json_object(read_text(args.hparams), f"hyper-parameters file {args.hparams}")
        else:
            given = json_object(args.hparams, "--hparams", "give a JSON object or the path of a JSON file")
    for name in ("method", "seed", "stats_tokens"):
        if getattr(args, name, None) is not None:
            given[name] = getattr(args, name)
    if isinstance(getattr(args, "layer", None), int):
        given["layer"] = args.layer
    user_settings(method(given.get("method")), given)  # known names, types and ranges of that method's settings
    corpus = getattr(args, "stats_corpus", None)
    if corpus and not os.path.exists(corpus):
        raise RankoneError(f"statistics corpus {corpus} does not exist; give a .txt file, a folder of .txt files "
                           "or a .jsonl file with a 'text' field")
    if corpus:
        from rankone.methods.corpus import corpus_files

        corpus_files(corpus)  # a FIFO or a device: refused now, before the model loads
    return given


def _number_arg(name: str, cast: Callable[[str], Any], noun: str, ok: Callable[[Any], bool], rule: str) -> Any:
    """An argparse type that casts, checks and otherwise gives argparse's one-line error naming the option."""
    def parse(v: str) -> Any:
        try:
            x = cast(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes {noun}, not {v!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"{name} must be {rule}, not {v}")
        return x
    return parse


def positive_int(name: str) -> Any:
    """A whole number ≥ 1."""
    return _number_arg(name, int, "a whole number", lambda x: x >= 1, "at least 1")


def non_negative_float(name: str) -> Any:
    """A finite number ≥ 0."""
    return _number_arg(name, float, "a number", lambda x: math.isfinite(x) and x >= 0, "a finite number ≥ 0")


def text_arg(name: str) -> Any:
    """An argparse type for free text (a prompt, a reason): refuses bytes that are not UTF-8."""
    from rankone.core.text import check_text

    def parse(v: str) -> str:
        try:
            return check_text(v, name)
        except RankoneError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def layer_arg(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layer takes a layer number or 'auto', not {value!r}") from None
