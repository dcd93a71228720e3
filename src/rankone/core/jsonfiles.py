"""Reading JSON and JSON-lines input: every problem is one line that names the file (and line).

    json_object(text, "hyper-parameters", hint)      -> dict, or one RankoneError line
    json_lines(path, hint)                           -> [(where, value), ...] for each non-empty line
    json_file(path, hint)                            -> the parsed document
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rankone.core.errors import RankoneError


def json_object(text: str, what: str, hint: str = "") -> dict[str, Any]:
    """`text` parsed as a JSON object; `what` names it in the message, `hint` says what to give."""
    tail = f"; {hint}" if hint else ""
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise RankoneError(f"{what} is not valid JSON ({e.msg} at line {e.lineno}){tail}") from None
    if not isinstance(d, dict):
        raise RankoneError(f"{what} must be a JSON object{tail}")
    return d


def json_lines(path: str | os.PathLike, hint: str = "", objects: bool = True) -> list[tuple[str, Any]]:
    """(where, value) for each non-empty line of a JSON-lines file, where = 'path:line'. With
    `objects`, each value must be a JSON object."""
    p = Path(path)
    out = []
    tail = f"; {hint}" if hint else ""
    for n, line in enumerate(p.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise RankoneError(f"{where} is not valid JSON ({e.msg}){tail}") from None
        if objects and not isinstance(value, dict):
            raise RankoneError(f"{where} is not a JSON object{tail}")
        out.append((where, value))
    return out


def json_file(path: str | os.PathLike, hint: str = "") -> Any:
    """The parsed JSON document in `path` (which the caller has checked exists)."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RankoneError(f"{p} is not valid JSON ({e.msg} at line {e.lineno})" + (f"; {hint}" if hint else "")) from None
