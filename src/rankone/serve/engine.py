"""The generation engine: one thread that owns the model and batches every request it can.

Continuous batching: between two decode steps, waiting requests join the running batch (their
prompts prefilled together), and finished rows leave it, so concurrent requests share each
forward pass whatever their lengths. Rows of different patch sets share the batch too: each
row's low-rank deltas are added to its own rows only (`rankone.serve.deltas`), which measured
faster than running one batch per arm (BENCHMARKS.md, "Serving").

A request's patch set is chosen when it joins the batch and kept until it finishes. New
candidate or pin settings apply to the next request that joins. New stable weights (a promote
or a rollback) wait until the batch has drained: no new request joins meanwhile, and they are
copied in when no row is in flight, so no request ever sees two stables.

Shadow runs (a stable request re-run greedily on the candidate after its answer was sent) wait
in their own bounded queue (a full queue skips the sample, counted) and run in their own batch,
advanced only while no request is in flight: they use the time the server would idle, so they
cost no more than their own compute and add no latency to any answer beyond finishing the step
in progress when a request arrives.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from rankone.serve.batch import Batch, Runner, left_padded, zero_padding
from rankone.serve.deltas import row_deltas
from rankone.serve.errors import ApiError
from rankone.serve.patchsets import Arms, PatchSet, swap_in
from rankone.serve.routing import Route, Router
from rankone.serve.text import TextTracker

log = logging.getLogger("rankone.serve")

Event = tuple[str, Any]  # ("start", PatchSet) | ("text", str) | ("done", dict) | ("error", ApiError)


@dataclass
class GenRequest:
    prompt_ids: list[int]
    prompt_text: str
    max_tokens: int
    sink: Callable[[Event], None]  # called on the engine thread; must not block
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    route: Route = field(default_factory=Route)
    patchset: PatchSet | None = None  # set for shadow rows (chosen when their job was made)
    cancelled: bool = False  # set by the caller (client gone); the row leaves at the next step
    ended: bool = False  # done, failed or dropped: no longer counted against the capacity


@dataclass
class _Row:
    req: GenRequest
    patchset: PatchSet
    text: TextTracker
    gen: torch.Generator | None
    last: int = -1


@dataclass
class _Lane:
    """Rows decoded together and their cache, kept in step."""
    rows: list[_Row] = field(default_factory=list)
    batch: Batch = field(default_factory=Batch)

    def keep(self, idx: list[int]) -> None:
        self.rows = [self.rows[i] for i in idx]
        self.batch.keep(idx)

    def clear(self) -> None:
        self.rows = []
        self.batch.clear()


@dataclass
class ShadowJob:
    """A stable answer and its re-run on the candidate; compared when both are known."""
    prompt_text: str
    candidate: PatchSet
    baseline: str | None  # the stable greedy answer, when the request itself was greedy
    answers: dict[str, str] = field(default_factory=dict)


class Engine:
    def __init__(self, model: nn.Module, tok: Any, arms: Arms, router: Router, max_batch: int = 16,
                 max_waiting: int = 64, max_shadow: int = 32, seed: int = 0,
                 on_shadow: Callable[[ShadowJob, bool], None] | None = None) -> None:
        self.model, self.tok, self.router = model, tok, router
        self.runner = Runner(model)
        self.max_batch, self.max_waiting, self.max_shadow = max_batch, max_waiting, max_shadow
        self.rng = random.Random(seed)
        self.on_shadow = on_shadow
        self.pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
        self.arms = arms
        self._pending: tuple[Arms, dict[str, torch.Tensor]] | None = None  # a stable swap waiting for a drain
        self._queue: deque[GenRequest] = deque()
        self._shadow: deque[tuple[GenRequest, ShadowJob]] = deque()
        self.shadow_dropped = 0
        self._active = 0  # requests submitted and not ended (waiting, running, or being answered)
        self._live = _Lane()  # the requests in flight
        self._shadows = _Lane()  # shadow runs in flight: advanced only when no request is
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.alive = False

    # ---- the outside: submit, update, stats ----------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="rankone-engine", daemon=True)
        self.alive = True
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, req: GenRequest) -> None:
        """Queue a request, or refuse it with 429 when the queue is full (never an unbounded backlog)."""
        with self._lock:  # requests in the batch and waiting for it, together, are bounded
            if self._active >= self.max_batch + self.max_waiting:
                raise ApiError(429, f"the server is at capacity ({self.max_batch} running, {self.max_waiting} waiting); "
                                    "retry shortly", "server_busy", headers={"Retry-After": "1"})
            self._queue.append(req)
            self._active += 1
        self._wake.set()

    def _end(self, req: GenRequest) -> None:
        if req.patchset is None and not req.ended:  # shadow rows never counted
            req.ended = True
            with self._lock:
                self._active -= 1

    def update(self, arms: Arms, stable: dict[str, torch.Tensor] | None) -> None:
        """New arms from the registry; `stable`: new stable weights to copy in once nothing is in flight."""
        with self._lock:
            if stable is None and self._pending is None:
                self.arms = arms
            else:
                self._pending = (arms, stable if stable is not None else self._pending[1])  # type: ignore[index]
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"waiting": len(self._queue), "running": len(self._live.rows), "active": self._active,
                    "shadow_waiting": len(self._shadow), "shadow_running": len(self._shadows.rows),
                    "shadow_dropped": self.shadow_dropped, "max_batch": self.max_batch, "max_waiting": self.max_waiting,
                    "swap_pending": self._pending is not None}

    # ---- the loop ---------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            lane = self._live
            new = self._admit()
            if not new and not lane.rows:  # no request in flight: the time is the shadows'
                lane, new = self._shadows, self._admit_shadows()
                if not new and not lane.rows:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
            try:
                if new:
                    self._prefill(lane, new)
                if lane.rows and (lane is self._live or not self._queue):
                    self._decode(lane)
            except Exception as e:  # noqa: BLE001 - one failed pass fails its rows, never the server
                log.error("generation failed (%s: %s); %d request(s) answered with 500", type(e).__name__,
                          " ".join(str(e).split())[:300], len(lane.rows) + len(new))
                for r in [*lane.rows, *new]:
                    self._emit(r, ("error", ApiError(500, f"generation failed: {type(e).__name__}", "generation_failed")))
                lane.clear()
        self.alive = False

    def _admit(self) -> list[_Row]:
        """Swap stable in if a swap waits and no request is in flight (shadow runs in flight are
        dropped: they compare against the stable that goes); then take waiting requests."""
        with self._lock:
            if self._pending is not None:
                if self._live.rows:
                    return []  # draining: the swap happens once the batch is empty
                self.shadow_dropped += len(self._shadows.rows)
                self._shadows.clear()
                arms, weights = self._pending
                swap_in(self.model, weights)
                self.arms, self._pending = arms, None
            room = self.max_batch - len(self._live.rows)
            taken = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
            arms = self.arms
        return self._rows_for(taken, arms)

    def _admit_shadows(self) -> list[_Row]:
        with self._lock:
            if self._pending is not None:
                return []
            room = self.max_batch - len(self._shadows.rows)
            taken = [self._shadow.popleft()[0] for _ in range(min(room, len(self._shadow)))]
            arms = self.arms
        return self._rows_for(taken, arms)

    def _rows_for(self, taken: list[GenRequest], arms: Arms) -> list[_Row]:
        rows = []
        for req in taken:
            if req.cancelled:
                self._end(req)
                continue
            try:
                ps = req.patchset if req.patchset is not None else self.router.resolve(req.route, arms)
            except ApiError as e:
                self._end(req)
                req.sink(("error", e))
                continue
            if ps.stable_digest != arms.stable.digest:
                continue  # a shadow row made for a stable that is gone: its comparison would mean nothing
            gen = None
            if req.temperature > 0:
                gen = torch.Generator().manual_seed(req.seed if req.seed is not None else self.rng.getrandbits(63))
            row = _Row(req, ps, TextTracker(self.tok, req.max_tokens, req.stop), gen)
            req.sink(("start", ps))
            rows.append(row)
        return rows

    def _prefill(self, lane: "_Lane", new: list[_Row]) -> None:
        ids, mask = left_padded([r.req.prompt_ids for r in new], self.pad_id)
        with row_deltas(self.model, [r.patchset for r in new]):
            logits, kv = self.runner.step(ids, mask, None)
        kv = zero_padding(kv, mask)
        keep = self._take_tokens(new, logits)
        if keep:
            idx = torch.tensor(keep, dtype=torch.long)
            dev = kv[0][0].device
            lane.batch.join([(k.index_select(0, idx.to(dev)), v.index_select(0, idx.to(dev))) for k, v in kv],
                            mask.index_select(0, idx))
            lane.rows += [new[i] for i in keep]

    def _decode(self, lane: "_Lane") -> None:
        live = [i for i, r in enumerate(lane.rows) if not r.req.cancelled]
        for r in lane.rows:
            if r.req.cancelled:
                self._end(r.req)
        if len(live) < len(lane.rows):
            lane.keep(live)
            if not lane.rows:
                return
        assert lane.batch.mask is not None
        ids = torch.tensor([[r.last] for r in lane.rows], dtype=torch.long)  # [batch, 1]
        mask = torch.cat([lane.batch.mask, torch.ones(len(lane.rows), 1, dtype=torch.long)], 1)
        with row_deltas(self.model, [r.patchset for r in lane.rows]):
            logits, kv = self.runner.step(ids, mask, lane.batch.kv)
        lane.batch.kv, lane.batch.mask = kv, mask
        keep = self._take_tokens(lane.rows, logits)
        if len(keep) < len(lane.rows):
            lane.keep(keep)

    def _take_tokens(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token [batch, vocab] -> emit; the indices of the rows that go on."""
        greedy = logits.argmax(-1).tolist()
        keep = []
        for i, r in enumerate(rows):
            tok = greedy[i] if r.gen is None else _sample(logits[i], r.req.temperature, r.req.top_p, r.gen)
            piece = r.text.push(tok)
            r.last = tok
            if piece:
                self._emit(r, ("text", piece))
            if r.text.finish is None:
                keep.append(i)
            else:
                self._emit(r, ("done", {"finish_reason": r.text.finish, "completion_tokens": len(r.text.ids),
                                        "text": r.text.text}))
                self._after(r)
        return keep

    def _emit(self, row: _Row, event: Event) -> None:
        if event[0] in ("done", "error"):
            self._end(row.req)  # before the answer leaves: the client may send its next request at once
        try:
            row.req.sink(event)
        except Exception as e:  # noqa: BLE001 - a broken consumer never stops the batch
            log.warning("dropped an event for a request whose consumer failed (%s)", type(e).__name__)
            row.req.cancelled = True

    # ---- shadow runs --------------------------------------------------------------------------------

    def _after(self, row: _Row) -> None:
        """A stable request done (routed, not pinned): maybe queue its shadow re-run on the candidate."""
        req = row.req
        if req.patchset is not None or req.route.pin is not None or row.patchset.arm != "stable" or not self.arms.staged:
            return
        ids = self.router.shadow_ids(self.arms)
        if not ids:
            return
        job = ShadowJob(req.prompt_text, self.arms.with_deltas(ids, "candidate"),
                        row.text.text if row.gen is None else None)
        runs = [("candidate", job.candidate)] + ([] if job.baseline is not None else [("stable", row.patchset)])
        with self._lock:
            if len(self._shadow) + len(runs) > self.max_shadow:
                self.shadow_dropped += 1
                return
            for name, ps in runs:
                self._shadow.append((GenRequest(req.prompt_ids, req.prompt_text, req.max_tokens,
                                                self._shadow_sink(job, name), stop=list(req.stop), patchset=ps), job))

    def _shadow_sink(self, job: ShadowJob, name: str) -> Callable[[Event], None]:
        def sink(event: Event) -> None:
            if event[0] != "done":
                return
            job.answers[name] = event[1]["text"]
            baseline = job.baseline if job.baseline is not None else job.answers.get("stable")
            if baseline is not None and "candidate" in job.answers and self.on_shadow is not None:
                self.on_shadow(job, baseline == job.answers["candidate"])
        return sink


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """A token from softmax(logits / temperature), within the top_p share of the mass."""
    probs = torch.softmax(logits.float() / temperature, -1)  # [vocab]
    if top_p < 1.0:
        sp, si = probs.sort(descending=True)
        sp[(sp.cumsum(0) - sp) >= top_p] = 0  # keep tokens while the mass before them is below top_p
        probs = torch.zeros_like(probs).scatter_(0, si, sp)
    return int(torch.multinomial(probs, 1, generator=gen))
