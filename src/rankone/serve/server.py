"""The server object: a model, its arms, the engine, the registry watcher and the metrics.

`Server(handle, settings, registry, admin_token)` builds stable from the registry (refusing a
model that is not its base), `start()` starts the engine and the watcher, and
`rankone.serve.app.create_app(server)` puts the HTTP API in front of it. Nothing here is
process-wide: two servers in one process (tests do this) share nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from rankone.core.errors import RankoneError
from rankone.lifecycle.registry import model_fingerprints
from rankone.models.generation import context_limit
from rankone.models.handle import ModelHandle
from rankone.serve.engine import Engine, ShadowJob
from rankone.serve.errors import ApiError
from rankone.serve.feedback import EventLog, FeedbackIntake
from rankone.serve.metrics import Metrics
from rankone.serve.patchsets import Arms, StableBuilder, swap_in
from rankone.serve.routing import Router
from rankone.serve.settings import ServeSettings
from rankone.serve.watcher import RegistryWatcher

log = logging.getLogger("rankone.serve")

ADMIN_HINT = "start the server with --admin-token-file FILE or the RANKONE_ADMIN_TOKEN environment variable"


def base_fingerprint(handle: ModelHandle) -> str:
    """The base model's identity in patch-set digests: sha256 over every layer's edited projection."""
    fps = model_fingerprints(handle.model, [], handle.spec)
    return hashlib.sha256(json.dumps(fps, sort_keys=True).encode()).hexdigest()


def model_name_of(handle: ModelHandle) -> str:
    src = Path(handle.source) if handle.source else None
    if src is None:
        return "rankone-model"
    return src.name[: -len(".gguf")] if src.name.endswith(".gguf") else src.name


def _facts(patch: Any) -> list[str]:
    return [f"{f.get('prompt', '').replace('{}', f.get('subject', ''))} -> {f.get('target', '')}" for f in patch.facts()]


class Server:
    def __init__(self, handle: ModelHandle, settings: ServeSettings | None = None, registry: str | Path | None = None,
                 admin_token: str | None = None, feedback_tokens: dict[str, str] | None = None) -> None:
        self.handle, self.settings = handle, settings or ServeSettings()
        self.model, self.tok = handle.model.eval(), handle.tokenizer
        if not getattr(self.tok, "is_fast", False):
            raise RankoneError("the model's tokenizer is a slow (Python) tokenizer; save the model with a fast "
                               "tokenizer (tokenizer.json) to serve it")
        self.name = self.settings.model_name or model_name_of(handle)
        self.admin_token = admin_token or None
        self.context = context_limit(self.model)
        self.base_fp = base_fingerprint(handle)
        self.metrics = Metrics(self.settings.bucket_s, self.settings.n_buckets)
        p = next(self.model.parameters())
        builder = StableBuilder(self.model, handle.spec)
        self.watcher: RegistryWatcher | None = None
        store = None
        if registry is not None:
            self.watcher = RegistryWatcher(registry, builder, self.base_fp, p.dtype, p.device, self.settings.registry_poll_s)
            arms, weights = self.watcher.initial(handle)
            swap_in(self.model, weights)
            store = self.watcher.store()
        else:
            arms = Arms(self.base_fp, (), (), p.dtype, p.device)
        self.router = Router(store, self.settings.seed)
        s = self.settings
        self.engine = Engine(self.model, self.tok, arms, self.router, s.max_batch, s.max_waiting, s.max_shadow, s.seed,
                             on_shadow=self._shadow_done)
        self._publish_metrics(arms)
        self.started = time.time()
        # Called with a record of every answered request (id, arm, digest, patches, user, status,
        # timings, prompt, text); the first listener is the event log that feedback and heal read.
        self.events = EventLog(self.settings.request_log_size)
        self.request_listeners: list[Callable[[dict[str, Any]], None]] = [self._log_request]
        tokens = dict(feedback_tokens or {}) | ({"admin": self.admin_token} if self.admin_token else {})
        self.feedback = FeedbackIntake(self.events, str(registry) if registry is not None else None, tokens,
                                       self.settings.feedback_per_minute, on_report=self.metrics.feedback)

    def start(self) -> "Server":
        self.engine.start()
        if self.watcher is not None:
            self.watcher.start(self._on_arms)
        return self

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.engine.stop()
        self.feedback.close()

    # ---- arms and shadows -----------------------------------------------------------------------

    def _on_arms(self, arms: Arms, stable: dict[str, torch.Tensor] | None) -> None:
        self.engine.update(arms, stable)
        self._publish_metrics(arms)

    def _publish_metrics(self, arms: Arms) -> None:
        sets = [dict(arms.stable.describe(), state="released")]
        if arms.candidate is not None:
            sets.append(dict(arms.candidate.describe(), state="staged"))
        if arms.released:
            sets.append(dict(arms.base.describe(), state="base"))
        self.metrics.arms_changed(sets, [(s.id, s.canary, s.shadow) for s in arms.staged])

    def _shadow_done(self, job: ShadowJob, agree: bool) -> None:
        text = job.prompt_text.lower()
        scope = "edited" if any(s.lower() in text for s in job.candidate.subjects) else "unrelated"
        self.metrics.shadow_result(scope, agree)
        self.events.add("shadow", {"at": time.time(), "patches": list(job.candidate.ids), "scope": scope, "agree": agree})

    # ---- requests -------------------------------------------------------------------------------

    def _log_request(self, record: dict[str, Any]) -> None:
        self.events.add("request", dict(record, id=record["id"] if record["status"] == 200 else ""))

    def request_done(self, record: dict[str, Any]) -> None:
        for listener in self.request_listeners:
            try:
                listener(record)
            except Exception as e:  # noqa: BLE001 - a listener never fails a request
                log.warning("a request listener failed (%s: %s)", type(e).__name__, " ".join(str(e).split())[:200])

    def check_admin(self, authorization: str | None, what: str) -> None:
        """A bearer admin token, or 401 (none given) / 403 (wrong, or none configured)."""
        if not self.admin_token:
            raise ApiError(403, f"{what} needs an admin token and this server has none; {ADMIN_HINT}", "admin_disabled")
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, f"{what} needs 'Authorization: Bearer <admin token>'", "missing_admin_token",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(authorization[7:].strip().encode(), self.admin_token.encode()):
            raise ApiError(403, f"{what}: the bearer token is not this server's admin token", "invalid_admin_token")

    # ---- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything the dashboard shows, as JSON (GET /api/status)."""
        arms = self.engine.arms
        facts = {i: _facts(p) for i, p in arms.released} | {s.id: _facts(s.patch) for s in arms.staged}

        def patches(ids: tuple[str, ...]) -> list[dict[str, Any]]:
            return [{"id": i, "state": arms.known.get(i, "released" if i in arms.stable_ids else "staged"),
                     "facts": facts.get(i, [])} for i in ids]

        views = [dict(arms.stable.describe(), patches=patches(arms.stable.ids))]
        if arms.candidate is not None:
            views.append(dict(arms.candidate.describe(), patches=patches(arms.candidate.ids),
                              staged=[{"id": s.id, "canary": s.canary, "shadow": s.shadow} for s in arms.staged]))
        if arms.released:
            views.append(dict(arms.base.describe(), patches=[]))
        totals = self.metrics.totals()
        return {
            "model": self.name, "source": self.handle.source, "context": self.context,
            "uptime_s": time.time() - self.started, "engine": dict(self.engine.stats(), alive=self.engine.alive),
            "arms": views, "totals": totals["arms"], "shadow": dict(totals["shadow"], dropped=self.engine.shadow_dropped),
            "registry": self.watcher.status() if self.watcher is not None else None,
            "series": self.metrics.series(),
            "feedback": totals["feedback"], "heal": self.feedback.heal_view(),
        }
