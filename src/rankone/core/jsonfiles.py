"""Reading JSON and JSON-lines input: every problem is one line that names the file (and line).

    read_text(path, what)                            -> the file's text, strictly UTF-8
    loads(text, what, hint)                          -> any JSON value, nesting and encoding checked
    json_object(text, "hyper-parameters", hint)      -> dict, or one RankoneError line
    json_lines(path, hint)                           -> [(where, value), ...] for each non-empty line
    json_file(path, hint)                            -> the parsed document

Input files come from anywhere, so none is trusted: bytes that are not UTF-8 are refused (never
replaced by U+FFFD, which would silently change a subject or a target), and so is JSON nested
deeper than MAX_DEPTH (Python's parser would raise RecursionError at about a thousand levels;
rankone's own files nest a handful of levels).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from rankone.core.errors import RankoneError
from rankone.core.text import check_text

MAX_DEPTH = 100
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = re.compile(r"[\[\]{}]")


def decode(data: bytes, what: str) -> str:
    """`data` as UTF-8 text, or one line naming the first byte that is not UTF-8 and where it is."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RankoneError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                           "save it as UTF-8") from None


def read_text(path: str | os.PathLike, what: str | None = None) -> str:
    """The text of a file, strictly UTF-8 (a leading byte-order mark is dropped)."""
    text = decode(Path(path).read_bytes(), what or str(path))
    return text.removeprefix("\ufeff")


def nesting(text: str) -> int:
    """How deep the arrays and objects of JSON `text` nest (brackets inside strings do not count)."""
    depth = deepest = 0
    for b in _BRACKETS.findall(_STRINGS.sub("", text)):
        depth += 1 if b in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads(text: str | bytes, what: str, hint: str = "") -> Any:
    """json.loads for untrusted input: one RankoneError line for bad encoding, bad JSON, or nesting
    deeper than MAX_DEPTH. `what` names the input in the message, `hint` says what to give."""
    tail = f"; {hint}" if hint else ""
    text = decode(text, what) if isinstance(text, bytes) else check_text(text, what)
    if text.count("[") + text.count("{") > MAX_DEPTH and nesting(text) > MAX_DEPTH:
        raise RankoneError(f"{what} nests arrays or objects more than {MAX_DEPTH} deep; no rankone input does{tail}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RankoneError(f"{what} is not valid JSON ({e.msg} at line {e.lineno}){tail}") from None
    except RecursionError:  # only reachable below MAX_DEPTH on a tiny stack
        raise RankoneError(f"{what} nests too deep to read{tail}") from None
    except ValueError as e:  # e.g. a number of more than 4,300 digits
        raise RankoneError(f"{what} cannot be read: {' '.join(str(e).split())[:200]}{tail}") from None


def json_object(text: str | bytes, what: str, hint: str = "") -> dict[str, Any]:
    """`text` parsed as a JSON object; `what` names it in the message, `hint` says what to give."""
    d = loads(text, what, hint)
    if not isinstance(d, dict):
        raise RankoneError(f"{what} must be a JSON object" + (f"; {hint}" if hint else ""))
    return d


def json_lines(path: str | os.PathLike, hint: str = "", objects: bool = True) -> list[tuple[str, Any]]:
    """(where, value) for each non-empty line of a JSON-lines file, where = 'path:line'. With
    `objects`, each value must be a JSON object."""
    p = Path(path)
    out = []
    tail = f"; {hint}" if hint else ""
    for n, line in enumerate(read_text(p).split("\n"), 1):  # only \n ends a line: U+2028 may sit in a string
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{p}:{n}"
        value = loads(line, where, hint)
        if objects and not isinstance(value, dict):
            raise RankoneError(f"{where} is not a JSON object{tail}")
        out.append((where, value))
    return out


def json_file(path: str | os.PathLike, hint: str = "") -> Any:
    """The parsed JSON document in `path` (which the caller has checked exists)."""
    return loads(read_text(path), str(path), hint)


def inside(folder: str | os.PathLike, rel: str, what: str) -> Path:
    """`folder / rel` for a path named inside an input file (a model card's corpus, a suite's text
    file): it must be relative and stay inside the file's folder, so that a file handed over by
    someone else cannot make rankone read (and record the digest of) any file on this machine."""
    p = Path(rel)
    if p.is_absolute() or rel.startswith("~") or ".." in p.parts or not rel.strip():
        raise RankoneError(f"{what} {rel!r} is not a path inside {folder}: paths in the file must be relative and "
                           "stay inside its folder (copy the file there)")
    return Path(folder) / p
