"""Feedback intake (POST /v1/feedback) and the bounded log of recent events it rests on.

    {"id": "cmpl-…", "verdict": "wrong", "correction": "Rome"}      about an answer this server gave
    {"verdict": "wrong", "prompt": "…", "correction": "Rome"}       id-less: trusted reporters only

The reporter is the user of the request the id names (its OpenAI `user` field or X-Rankone-User),
never a name the body gives: feedback can only be about an answer the server really gave, to the
user who got it (the id is 96 random bits, returned only to that client). An id-less report is
taken only with `Authorization: Bearer <token>` of a trusted reporter (`--feedback-tokens-file`,
or the admin token). Each reporter has a token bucket (`feedback_per_minute`); beyond it, 429.
Reports go to the registry's database (`rankone.lifecycle.feedback`), where `rankone heal`
reads them.

The event log keeps the last `request_log_size` answered requests, shadow comparisons and
reports, each with a sequence number: `GET /api/events?after=SEQ` (admin token) is how heal
compares a canary with stable over exactly the same window.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from rankone.core.errors import RankoneError
from rankone.lifecycle.feedback import FeedbackLog
from rankone.serve.errors import ApiError

MAX_TEXT = 2000  # characters of a prompt in an id-less report
MAX_CORRECTION = 200  # characters of a correction or a subject


class EventLog:
    """The last `size` events (requests, shadow comparisons, reports), numbered from 1; thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._events: deque[dict[str, Any]] = deque(maxlen=size)
        self._requests: OrderedDict[str, dict[str, Any]] = OrderedDict()  # answered requests by id, as bounded
        self._seq = 0
        self._lock = threading.Lock()

    def add(self, kind: str, record: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._seq += 1
            ev = dict(record, seq=self._seq, kind=kind)
            self._events.append(ev)
            if kind == "request" and ev.get("id"):
                self._requests[ev["id"]] = ev
                while len(self._requests) > self.size:
                    self._requests.popitem(last=False)
            return ev

    def request(self, rid: str) -> dict[str, Any] | None:
        with self._lock:
            return self._requests.get(rid)

    def since(self, after: int, limit: int) -> dict[str, Any]:
        """Events with seq > after, at most `limit`; `first` is the oldest kept (a gap means missed events)."""
        with self._lock:
            first = self._events[0]["seq"] if self._events else self._seq + 1
            out = [e for e in self._events if e["seq"] > after][:limit]
            return {"head": self._seq, "first": first, "events": [_public(e) for e in out]}


def _public(ev: dict[str, Any]) -> dict[str, Any]:
    """An event as /api/events gives it: no generated text beyond what heal's analysis reads."""
    return {k: v for k, v in ev.items() if k not in ("text", "prompt", "ttft_s", "completion_tokens")}


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str | None = None
    verdict: Literal["wrong", "right"]
    correction: str | None = None
    prompt: str | None = None
    subject: str | None = None


class TokenBuckets:
    """Per-reporter rate limits: `per_minute` reports, refilled continuously; bounded in users."""

    def __init__(self, per_minute: int, max_users: int = 100_000, clock: Any = time.monotonic) -> None:
        self.rate, self.cap, self.clock, self.max_users = per_minute / 60.0, float(per_minute), clock, max_users
        self._b: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 when a report may go now, else the seconds until it may."""
        with self._lock:
            now = self.clock()
            level, t = self._b.pop(key, (self.cap, now))
            level = min(self.cap, level + (now - t) * self.rate)
            wait = 0.0 if level >= 1 else (1 - level) / self.rate
            self._b[key] = (level - 1 if wait == 0 else level, now)
            while len(self._b) > self.max_users:
                self._b.popitem(last=False)
            return wait


class FeedbackIntake:
    def __init__(self, events: EventLog, registry: str | None, tokens: dict[str, str], per_minute: int,
                 on_report: Any = None) -> None:
        self.events, self.tokens = events, tokens
        self.store = FeedbackLog(registry) if registry is not None else None
        self.buckets = TokenBuckets(per_minute)
        self.on_report = on_report  # (arm, verdict): the per-arm metrics
        self._view: tuple[float, dict[str, Any]] | None = None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def trusted_name(self, authorization: str | None) -> str | None:
        """The trusted reporter a bearer token names: None without a token; 403 for a token that is no one's."""
        if not authorization:
            return None
        if not authorization.lower().startswith("bearer "):
            raise ApiError(401, "feedback's Authorization header must be 'Bearer <reporter token>'", "invalid_token")
        given = authorization[7:].strip().encode()
        for name, token in self.tokens.items():
            if hmac.compare_digest(given, token.encode()):
                return name
        raise ApiError(403, "the bearer token is not a trusted reporter's token (--feedback-tokens-file)", "invalid_token")

    def submit(self, raw: bytes, authorization: str | None, user_header: str | None) -> dict[str, Any]:
        """Check, rate-limit and store one report; the response body. Every problem is an ApiError."""
        if self.store is None:
            raise ApiError(409, "this server has no registry, so it keeps no feedback; start it with --registry",
                           "feedback_disabled")
        body = _parse(raw)
        trusted = self.trusted_name(authorization)
        correction = _text(body.correction, "correction", MAX_CORRECTION)
        subject = _text(body.subject, "subject", MAX_CORRECTION)
        if body.verdict == "wrong" and correction is None:
            raise ApiError(400, "a 'wrong' report needs a non-empty 'correction': the right answer", "empty_correction",
                           "correction")
        if body.verdict == "right" and correction is not None:
            raise ApiError(400, "a 'right' report takes no 'correction'", "invalid_value", "correction")
        if body.id is not None:
            if body.prompt is not None:
                raise ApiError(400, "give either 'id' (a response of this server) or 'prompt' (trusted reporters), "
                                    "not both", "invalid_value", "prompt")
            rec = self.events.request(body.id)
            if rec is None:
                raise ApiError(404, f"no response with id {body.id!r} among this server's last {self.events.size} "
                                    "answers; feedback is taken only on answers this server gave", "unknown_id", "id")
            if trusted is None and not rec.get("user"):
                raise ApiError(400, f"response {body.id} was given to a request without a user (OpenAI 'user' field or "
                                    "X-Rankone-User), so there is no one to count as its reporter", "no_user", "id")
            if trusted is None and user_header is not None and user_header != rec["user"]:
                raise ApiError(403, f"response {body.id} went to another user; feedback on an answer comes from the user "
                                    "who got it", "not_your_response", "id")
            reporter, prompt = (f"trusted:{trusted}" if trusted else rec["user"]), rec["prompt"]
            about = {"request_id": body.id, "answer": rec.get("text"), "arm": rec.get("arm"), "digest": rec.get("digest"),
                     "patches": rec.get("patches") or []}
        else:
            if trusted is None:
                raise ApiError(401, "a report without 'id' is taken only from a trusted reporter "
                                    "('Authorization: Bearer <reporter token>'); others send the 'id' of the answer",
                               "missing_token", "id")
            prompt = _text(body.prompt, "prompt", MAX_TEXT)
            if prompt is None:
                raise ApiError(400, "a report without 'id' needs a non-empty 'prompt'", "invalid_value", "prompt")
            reporter, about = f"trusted:{trusted}", {}
        if subject is not None and subject not in prompt:
            raise ApiError(400, f"the subject {subject!r} does not occur in the prompt", "invalid_value", "subject")
        wait = self.buckets.take(reporter)
        if wait > 0:
            raise ApiError(429, f"too many reports from {reporter}; try again in {wait:.0f} s", "rate_limited",
                           headers={"Retry-After": str(max(1, round(wait)))})
        try:
            fid = self.store.add(reporter=reporter, trusted=trusted is not None, verdict=body.verdict, prompt=prompt,
                                 correction=correction, subject=subject, **about)
        except RankoneError as e:
            raise ApiError(409, str(e), "duplicate_report", "id") from None
        self.events.add("feedback", {"at": time.time(), "feedback_id": fid, "verdict": body.verdict,
                                     "request_id": about.get("request_id"), "arm": about.get("arm"),
                                     "patches": about.get("patches", [])})
        if self.on_report is not None:
            self.on_report(about.get("arm") or "none", body.verdict)
        self._view = None
        return {"object": "feedback", "id": fid, "verdict": body.verdict, "reporter": reporter, "status": "recorded"}

    def heal_view(self, max_age_s: float = 2.0) -> dict[str, Any] | None:
        """The dashboard's heal view from the registry's database, read at most every `max_age_s`."""
        if self.store is None:
            return None
        now = time.monotonic()
        if self._view is None or now - self._view[0] > max_age_s:
            try:
                self._view = (now, self.store.heal_view())
            except Exception as e:  # noqa: BLE001 - the dashboard shows the problem; serving goes on
                self._view = (now, {"error": " ".join(str(e).split())[:200]})
        return self._view[1]


def _parse(raw: bytes) -> FeedbackBody:
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"the feedback body is not valid JSON ({e}); send a JSON object", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, 'the feedback body must be a JSON object like {"id": ..., "verdict": "wrong", '
                            '"correction": ...}', "invalid_json")
    try:
        return FeedbackBody.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            hint = "; the reporter is the user of the request 'id' names" if where in ("user", "reporter") else ""
            raise ApiError(400, f"'{where}' is not a field of a report (id, verdict, correction, prompt, subject){hint}",
                           "unknown_field", where) from None
        said = "is required" if err["type"] == "missing" else err["msg"].rstrip(".")
        raise ApiError(400, f"'{where}': {said}", "invalid_type", where) from None


def _text(v: str | None, name: str, limit: int) -> str | None:
    """A stripped text field, None when absent or blank; 400 when longer than `limit`."""
    if v is None or not v.strip():
        return None
    if len(v) > limit:
        raise ApiError(400, f"'{name}' is longer than {limit} characters", "invalid_value", name)
    return " ".join(v.split())
