"""Heal's view of a running server, over HTTP only (heal never imports `serve`).

Every call retries a server that is down, refuses connections, times out or answers 429/5xx,
with exponential back-off (policy retry_initial_s doubling up to retry_max_s) for at most
retry_total_s; then `ServerDown`, one line naming the server and the last problem. A 4xx other
than 429 is the caller's mistake and is not retried. Reads that change nothing (status, events,
pinned greedy answers) are all heal sends: the registry is where it acts.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import httpx

from rankone.core.errors import RankoneError

log = logging.getLogger("rankone.heal")
HEAL_USER = "rankone-heal"


class ServerDown(RankoneError):
    """The server did not answer within the retry budget."""


class ServerClient:
    def __init__(self, url: str, admin_token: str, retry_initial_s: float = 0.5, retry_max_s: float = 30.0,
                 retry_total_s: float = 300.0, timeout_s: float = 60.0, sleep: Callable[[float], None] = time.sleep) -> None:
        if not url.startswith(("http://", "https://")):
            raise RankoneError(f"--server must be an http(s) URL like http://127.0.0.1:8000, not {url!r}")
        self.url = url.rstrip("/").removesuffix("/v1")
        self.retry = (retry_initial_s, retry_max_s, retry_total_s)
        self.sleep = sleep
        self.http = httpx.Client(timeout=timeout_s, headers={"Authorization": f"Bearer {admin_token}"})
        self.model: str | None = None
        self.retries = 0  # calls retried so far (reported)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        first, most, total = self.retry
        t0, wait, last = time.monotonic(), first, ""
        while True:
            try:
                r = self.http.request(method, self.url + path, **kw)
                if r.status_code < 400:
                    return r.json()
                msg = _message(r)
                if r.status_code != 429 and r.status_code < 500:
                    raise RankoneError(f"the server at {self.url} refused {method} {path}: {r.status_code} {msg}")
                last = f"{r.status_code} {msg}"
                if r.status_code == 429 and r.headers.get("retry-after", "").isdigit():
                    wait = max(wait, float(r.headers["retry-after"]))
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            spent = time.monotonic() - t0
            if spent + wait > total:
                raise ServerDown(f"the server at {self.url} did not answer {method} {path} for {spent:.0f} s "
                                 f"(last: {last}); nothing was changed: start it again and rerun `rankone heal`")
            self.retries += 1
            log.warning("server %s: %s; retrying in %.1f s", self.url, last, wait)
            self.sleep(wait)
            wait = min(most, wait * 2)

    # ---- reads -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self._call("GET", "/api/status")
        self.model = st.get("model")
        return st

    def events(self, after: int, limit: int = 5000) -> dict[str, Any]:
        return self._call("GET", "/api/events", params={"after": after, "limit": limit})

    def answer(self, prompt: str, n_tokens: int, arm: str = "stable") -> tuple[str, list[str]]:
        """The greedy continuation on one arm (a pin), and the patches that produced it."""
        if self.model is None:
            self.status()
        body = {"model": self.model, "prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "user": HEAL_USER}
        out = self._call("POST", "/v1/completions", json=body, headers={"X-Rankone-Patchset": arm})
        return out["choices"][0]["text"], list(out.get("rankone", {}).get("patches", []))


def _message(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["message"])
    except Exception:  # noqa: BLE001 - any body: its first characters
        return " ".join(r.text.split())[:200]
