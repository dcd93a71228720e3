"""Small helpers every package shares: the one clock, the user's name, means that skip gaps."""

from __future__ import annotations

import getpass
import math
import statistics
from datetime import datetime, timezone
from typing import Any, Iterable


def utcnow() -> str:
    """The one timestamp format of patches, merged folders and the audit log: UTC, milliseconds,
    e.g. 2026-11-30T12:00:00.000Z (sorts as text, means the same on every machine)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def user_name() -> str:
    """Who runs this (recorded as author / actor when none is given)."""
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def _present(xs: Iterable[Any]) -> list[float]:
    return [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]


def mean(xs: Iterable[Any]) -> float | None:
    """The mean of the values that are there (None and NaN skipped); None when there are none."""
    v = _present(xs)
    return sum(v) / len(v) if v else None


def median(xs: Iterable[Any]) -> float | None:
    """The median of the values that are there (None and NaN skipped); None when there are none."""
    v = _present(xs)
    return statistics.median(v) if v else None
