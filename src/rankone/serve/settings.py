"""The server's settings: one dataclass, round-tripping to JSON like every settings object here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rankone.core.errors import RankoneError


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    model_name: str | None = None  # the id clients send as `model` (default: the model folder's name)
    max_batch: int = 16  # rows decoded together
    max_waiting: int = 64  # requests queued beyond the batch; more are refused with 429
    max_tokens_cap: int = 512  # the largest max_tokens a request may ask for
    default_max_tokens: int = 16  # OpenAI's default for completions
    max_body_bytes: int = 1 << 20  # a larger request body is refused with 413
    registry_poll_s: float = 0.5  # registry changes are served within about twice this
    max_shadow: int = 32  # shadow re-runs waiting; more are skipped (counted)
    seed: int = 0  # routing of unkeyed requests, shadow samples, sampling without a seed
    bucket_s: float = 5.0  # the dashboard's time buckets
    n_buckets: int = 120  # how many buckets are kept (10 minutes at 5 s)
    request_log_size: int = 20_000  # recent events kept for feedback ids and /api/events
    feedback_per_minute: int = 10  # reports per reporter per minute; more are refused with 429

    def __post_init__(self) -> None:
        for name in ("port", "max_batch", "max_waiting", "max_tokens_cap", "default_max_tokens", "max_body_bytes",
                     "max_shadow", "n_buckets", "request_log_size", "feedback_per_minute"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "port" else 1):
                raise RankoneError(f"serve setting {name} must be a whole number of at least 1, not {v!r}")
        for name in ("registry_poll_s", "bucket_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 3600:
                raise RankoneError(f"serve setting {name} must be a number of seconds above 0, not {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServeSettings":
        from rankone.methods.settings import strict_from_dict

        return strict_from_dict(cls, d, "serve setting")
