"""The HTTP API in front of a Server: OpenAI's endpoints, health, metrics, status and the dashboard.

Every answer names the patch set that produced it: `system_fingerprint` is its digest, the
headers X-Rankone-Arm, X-Rankone-Patchset-Digest and X-Rankone-Patches say which arm and which
patches, and the body carries the same under "rankone". Every failure is an OpenAI error object
with its status and one line in the log; a traceback never reaches a client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rankone.core.tokens import encode
from rankone.serve.dashboard import dashboard_html
from rankone.serve.engine import GenRequest
from rankone.serve.errors import ApiError
from rankone.serve.patchsets import PatchSet
from rankone.serve.routing import Route
from rankone.serve.schema import ChatBody, CompletionBody, chat_prompt, completion_prompt, parse, stops_of
from rankone.serve.server import Server

log = logging.getLogger("rankone.serve")


def _headers(ps: PatchSet) -> dict[str, str]:
    return {"X-Rankone-Arm": ps.arm, "X-Rankone-Patchset-Digest": ps.digest, "X-Rankone-Patches": ",".join(ps.ids)}


def _error(e: ApiError, request: Request) -> JSONResponse:
    log.warning("%d %s %s: %s", e.status, request.method, request.url.path, e.message)
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body is larger than {limit} bytes", "body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class _Call:
    """One generation request through the engine: its events arrive on an asyncio queue."""

    def __init__(self, server: Server, req: GenRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.server, self.req = server, req
        self.events: asyncio.Queue = asyncio.Queue()
        req.sink = lambda ev: loop.call_soon_threadsafe(self.events.put_nowait, ev)
        self.t0 = time.perf_counter()
        self.ttft: float | None = None
        self.patchset: PatchSet | None = None
        self.tokens = 0
        self.rid = ""
        self.text = ""

    async def start(self) -> PatchSet:
        self.server.engine.submit(self.req)
        kind, value = await self.events.get()
        if kind == "error":
            raise value
        self.patchset = value
        return value

    async def pieces(self) -> AsyncIterator[tuple[str, Any]]:
        """("text", piece) ... then ("done", info); an ("error", ApiError) is raised."""
        while True:
            kind, value = await self.events.get()
            if kind == "error":
                raise value
            if self.ttft is None:
                self.ttft = time.perf_counter() - self.t0
            if kind == "done":
                self.tokens = value["completion_tokens"]
            yield kind, value
            if kind == "done":
                return

    def record(self, status: int) -> None:
        ps = self.patchset
        latency = time.perf_counter() - self.t0
        self.server.metrics.request(ps.arm if ps is not None else "none", status, latency, self.ttft, self.tokens,
                                    self.req.route.pin is not None or self.req.route.user is not None)
        self.server.request_done({
            "id": self.rid, "at": time.time(), "status": status, "user": self.req.route.user, "pin": self.req.route.pin,
            **(ps.describe() if ps is not None else {"arm": "none", "digest": None, "patches": []}),
            "latency_s": latency, "ttft_s": self.ttft, "completion_tokens": self.tokens,
            "prompt": self.req.prompt_text, "text": self.text})


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="rankone serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        msg = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return _error(ApiError(exc.status_code, f"{msg}: {request.method} {request.url.path}", "not_found"), request)

    @app.exception_handler(Exception)
    async def any_error(request: Request, exc: Exception) -> JSONResponse:  # a safety net: handlers catch their own
        return _error(ApiError(500, f"internal error ({type(exc).__name__})", "internal_error"), request)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = server.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped", "model": server.name,
                             "stable": server.engine.arms.stable.digest}, status_code=200 if ok else 503)

    def _model_card() -> dict[str, Any]:
        return {"id": server.name, "object": "model", "created": int(server.started), "owned_by": "rankone"}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [_model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> JSONResponse:
        if name != server.name:
            return _error(ApiError(404, f"the model '{name}' does not exist; this server serves '{server.name}'",
                                   "model_not_found", "model"), request)
        return JSONResponse(_model_card())

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.prometheus(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/status")
    async def status() -> JSONResponse:
        return JSONResponse(server.status())

    @app.get("/dashboard")
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(dashboard_html(server.status()))

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        """A report on an answer (see rankone.serve.feedback); stored in the registry's database."""
        try:
            raw = await _read_body(request, server.settings.max_body_bytes)
            out = await asyncio.to_thread(server.feedback.submit, raw, request.headers.get("authorization"),
                                          request.headers.get("x-rankone-user"))
        except ApiError as e:
            return _error(e, request)
        return JSONResponse(out)

    @app.get("/api/events")
    async def events(request: Request) -> JSONResponse:
        """Recent requests, shadow comparisons and reports with seq > after (admin token): heal's window."""
        try:
            server.check_admin(request.headers.get("authorization"), "GET /api/events")
            q = request.query_params
            after, limit = q.get("after", "0"), q.get("limit", "1000")
            if not (after.isdigit() and limit.isdigit() and 1 <= int(limit) <= 10_000):
                raise ApiError(400, "GET /api/events takes after=<seq ≥ 0> and limit=<1..10000>", "invalid_value")
        except ApiError as e:
            return _error(e, request)
        return JSONResponse(server.events.since(int(after), int(limit)))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(server, request, chat=True)

    return app


def _prepare(server: Server, request: Request, body: Any, chat: bool) -> GenRequest:
    """The checked request: model, pin, prompt within the context, max_tokens within the cap."""
    if body.model != server.name:
        raise ApiError(404, f"the model '{body.model}' does not exist; this server serves '{server.name}' "
                            "(GET /v1/models)", "model_not_found", "model")
    pin = request.headers.get("x-rankone-patchset")
    if pin is not None:
        server.check_admin(request.headers.get("authorization"), "X-Rankone-Patchset (pinning a patch set)")
        server.router.pinned(pin.strip(), server.engine.arms)  # an unknown pin is refused before queueing
    if chat:
        text, templated = chat_prompt(server.tok, body)
        ids = server.tok(text, add_special_tokens=False)["input_ids"] if templated else encode(server.tok, text)[0]
    else:
        text = completion_prompt(body)
        ids = encode(server.tok, text)[0]
    if not ids:
        raise ApiError(400, "the prompt is empty; send some text", "empty_prompt", "messages" if chat else "prompt")
    room = server.context - len(ids)
    cap = server.settings.max_tokens_cap
    asked = body.max_completion_tokens if chat and body.max_completion_tokens is not None else body.max_tokens
    param = "max_tokens"
    if asked is not None and not 1 <= asked <= cap:
        raise ApiError(400, f"'{param}' must be from 1 to {cap} (this server's cap), not {asked}", "invalid_value", param)
    if room < 1 or (asked is not None and asked > room):
        raise ApiError(400, f"this model's context is {server.context} tokens; the prompt has {len(ids)} and "
                            f"{param} asks for {asked or 1} more: shorten the prompt or lower {param}",
                       "context_length_exceeded", "messages" if chat else "prompt")
    max_tokens = asked if asked is not None else min(server.settings.default_max_tokens, room)
    user = body.user if body.user is not None else request.headers.get("x-rankone-user")
    temperature = 1.0 if body.temperature is None else body.temperature
    return GenRequest(ids, text, max_tokens, sink=lambda ev: None, temperature=temperature,
                      top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=stops_of(body),
                      route=Route(user, pin.strip() if pin is not None else None))


async def _generate(server: Server, request: Request, chat: bool) -> Response:
    call: _Call | None = None
    try:
        raw = await _read_body(request, server.settings.max_body_bytes)
        body = parse(raw, ChatBody if chat else CompletionBody)
        req = _prepare(server, request, body, chat)
        call = _Call(server, req, asyncio.get_running_loop())
        ps = await call.start()
    except ApiError as e:
        if call is not None and call.patchset is None:
            call.record(e.status)
        else:
            server.metrics.request("none", e.status, 0.0, None, 0)
        return _error(e, request)
    except Exception as e:  # noqa: BLE001 - never a traceback to the client
        log.error("500 %s %s: %s: %s", request.method, request.url.path, type(e).__name__, " ".join(str(e).split())[:300])
        return JSONResponse(ApiError(500, f"internal error ({type(e).__name__})", "internal_error").body(), status_code=500)
    rid = call.rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    shape = _Shape(rid, server.name, ps, chat, int(time.time()), len(req.prompt_ids))
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_stream(call, shape, usage, request), media_type="text/event-stream", headers=_headers(ps))
    try:
        text, info = "", {}
        async for kind, value in call.pieces():
            if kind == "text":
                text += value
            else:
                info = value
    except ApiError as e:
        call.record(e.status)
        return _error(e, request)
    call.text = info["text"]
    call.record(200)
    return JSONResponse(shape.whole(info["text"], info["finish_reason"], info["completion_tokens"]), headers=_headers(ps))


async def _stream(call: _Call, shape: "_Shape", usage: bool, request: Request) -> AsyncIterator[str]:
    status = 499  # until the last chunk is out: a client that leaves earlier is recorded as gone
    try:
        if shape.chat:
            yield _sse(shape.chunk({"role": "assistant", "content": ""}, None))
        async for kind, value in call.pieces():
            if kind == "text":
                call.text += value
                yield _sse(shape.chunk(value, None))
            else:
                yield _sse(shape.chunk("" if not shape.chat else {}, value["finish_reason"]))
                if usage:
                    yield _sse(dict(shape.chunk("", None), choices=[], usage=shape.usage(value["completion_tokens"])))
        yield "data: [DONE]\n\n"
        status = 200
    except ApiError as e:
        status = e.status
        log.warning("%d %s %s (mid-stream): %s", e.status, request.method, request.url.path, e.message)
        yield _sse(e.body())
        yield "data: [DONE]\n\n"
    finally:
        if status != 200:
            call.req.cancelled = True  # a client that left frees its place in the batch
        call.record(status)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class _Shape:
    """OpenAI's response and chunk shapes for one request."""

    def __init__(self, rid: str, model: str, ps: PatchSet, chat: bool, created: int, prompt_tokens: int) -> None:
        self.rid, self.model, self.ps, self.chat, self.created, self.prompt_tokens = rid, model, ps, chat, created, prompt_tokens

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.ps.digest}

    def usage(self, n: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def whole(self, text: str, finish: str, n: int) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return dict(self._head("chat.completion" if self.chat else "text_completion"), choices=[choice],
                    usage=self.usage(n), rankone=self.ps.describe())

    def chunk(self, delta: Any, finish: str | None) -> dict[str, Any]:
        if self.chat:
            d = delta if isinstance(delta, dict) else {"content": delta}
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
        return dict(self._head("chat.completion.chunk" if self.chat else "text_completion"), choices=[choice],
                    rankone=self.ps.describe())
