"""Where rankone keeps what it computes once per model, and a small JSON cache for such values.

Each entry is stored under a digest of its key and holds the key itself: an entry whose stored
key differs, or that cannot be read, is a miss and is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from rankone.core.atomic import write_cache
from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import loads

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """$RANKONE_CACHE, else ~/.cache/rankone (an empty RANKONE_CACHE is unset, not the current folder)."""
    return Path(os.environ.get("RANKONE_CACHE", "").strip() or Path.home() / ".cache" / "rankone")


def digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def cached_json(
    kind: str, key: dict[str, Any], make: Callable[[], Any], root: str | os.PathLike | None = None,
) -> tuple[Any, bool]:
    """(value, found): the value stored under `key` in <root>/<kind>/, else make() stored there."""
    f = (Path(root) if root is not None else cache_root()) / kind / f"{kind}-{digest(key)}.json"
    try:
        d = loads(f.read_bytes(), str(f))
        if d.get("key") == key:
            return d["value"], True
        log.warning("ignoring cache entry %s: it was made for another key", f)
    except FileNotFoundError:
        pass
    except (OSError, RankoneError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignoring unreadable cache entry %s (%s); recomputing", f, e)
    value = make()
    write_cache(f, {"key": key, "value": value}, kind)
    return value, False
