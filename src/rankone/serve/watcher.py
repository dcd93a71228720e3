"""The registry, followed: arms rebuilt within a poll of any change, without a restart.

The registry is the server's whole state (a restart after kill -9 serves the same arms). Every
`poll_s` the watcher reads the registry's audit head, which every transition moves; on a change
it reloads the released and staged patches from the store (each verified again), builds new
stable weights when the release changed (on detached copies: `StableBuilder`), checks that the
staged patches apply on top, and hands the result to the engine. Anything unreadable, tampered
or not fitting leaves the arms being served as they are: one line in the log, and the error in
/api/status until the registry reads cleanly again.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from rankone.core.errors import RankoneError
from rankone.lifecycle.registry import Registry
from rankone.serve.patchsets import Arms, Staged, StableBuilder

log = logging.getLogger("rankone.serve")

Publish = Callable[[Arms, "dict[str, torch.Tensor] | None"], None]


class RegistryWatcher:
    def __init__(self, path: str | Path, builder: StableBuilder, base_fp: str, dtype: torch.dtype,
                 device: torch.device | str, poll_s: float = 0.5, retry_s: float = 5.0, audit_n: int = 12) -> None:
        self.path = Path(path)
        self.builder, self.base_fp, self.dtype, self.device = builder, base_fp, dtype, device
        self.poll_s, self.retry_s, self.audit_n = poll_s, retry_s, audit_n
        self.current: Arms | None = None
        self.error: str | None = None
        self.head = -1
        self.audit: list[dict[str, Any]] = []
        self.checked_at: float | None = None
        self._publish: Publish | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def store(self) -> Path:
        with Registry(self.path, create=False) as reg:
            return reg.store

    def initial(self, handle: Any) -> tuple[Arms, dict[str, torch.Tensor]]:
        """The arms to start with. A model that is not the registry's base, or a released patch that
        cannot be read, refuses to start (RankoneError); a bad staged patch only leaves it out."""
        with Registry(self.path, create=False) as reg:
            reg.check_model(handle)
            arms, weights = self._read(reg, allow_bad_staged=True)
        self.current = arms
        return arms, weights  # type: ignore[return-value]

    def start(self, publish: Publish) -> None:
        self._publish = publish
        self._thread = threading.Thread(target=self._loop, name="rankone-registry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def status(self) -> dict[str, Any]:
        return {"path": str(self.path), "audit_head": self.head, "error": self.error, "checked_at": self.checked_at,
                "audit": self.audit}

    # ---- the loop -----------------------------------------------------------------------------

    def _loop(self) -> None:
        reg = None
        last_try = 0.0
        while not self._stop.wait(self.poll_s):
            try:
                if reg is None:
                    reg = Registry(self.path, create=False)
                head = reg.audit_head()
                self.checked_at = time.time()
                retry = self.error is not None and time.monotonic() - last_try > self.retry_s
                if head == self.head and not retry:
                    continue
                last_try, self.head = time.monotonic(), head
                arms, weights = self._read(reg)
                self._set_error(None)
                assert self._publish is not None
                self._publish(arms, weights)
                self.current = arms
            except Exception as e:  # noqa: BLE001 - the server keeps serving what it has
                self._set_error(" ".join(str(e).split()) or type(e).__name__)
                if reg is not None and not isinstance(e, RankoneError):
                    reg.close()
                    reg = None
        if reg is not None:
            reg.close()

    def _set_error(self, msg: str | None) -> None:
        if msg is not None and msg != self.error:
            log.error("registry %s: %s; still serving stable %s", self.path, msg,
                      self.current.stable.digest if self.current else "-")
        elif msg is None and self.error is not None:
            log.warning("registry %s reads cleanly again", self.path)
        self.error = msg

    def _read(self, reg: Registry, allow_bad_staged: bool = False) -> tuple[Arms, dict[str, torch.Tensor] | None]:
        """The arms the registry describes now; stable weights only when the release changed."""
        head = reg.audit_head()
        released = reg.released()
        staged = reg.staged()
        known = {r.id: r.state for r in reg.list()}
        audit = [{k: v for k, v in asdict(e).items() if k not in ("prev_hash", "hash")} for e in reg.log_tail(self.audit_n)]
        chain = [(r.id, reg.load_patch(r.id)) for r in released]
        same_stable = self.current is not None and self.current.stable_ids == tuple(i for i, _ in chain)
        weights = None if same_stable else self.builder.build([p for _, p in chain])
        try:
            loaded = [Staged(s.id, s.canary, s.shadow, reg.load_patch(s.id)) for s in staged]
            if loaded:
                self.builder.build([p for _, p in chain], [s.patch for s in loaded])  # each staged patch must fit
        except RankoneError as e:
            if not allow_bad_staged:
                raise RankoneError(f"a staged patch cannot be served: {e}") from None
            self._set_error(f"a staged patch cannot be served: {e}")
            loaded = []
        self.head, self.audit = max(self.head, head), audit
        return Arms(self.base_fp, tuple(chain), tuple(loaded), self.dtype, self.device, head, known), weights
