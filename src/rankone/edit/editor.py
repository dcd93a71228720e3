"""The edit loop, one for every method: requests → steps → the method's factors → merged into the
model → recorded in a Patch, with each step's outcome measured.

    Editor(load_model(path))                              # r-ROME with the model card's settings
    Editor(handle, {"method": "memit", "layer": 3})       # your settings over the card's, then the paper's
    Editor(handle, EditHParams(v_steps=30, layer=3))      # a settings object: used exactly as given

A method (rankone.methods.base) either edits one request per step, on the model with the earlier
ones merged (the ROME family: one rank-one edit each), or all requests as one step (MEMIT,
AlphaEdit, EMMET: one rank-n edit per window layer). Settings resolve once, in the constructor,
into the frozen object the patch records (`Editor.settings`); the context (`Editor.context`,
rankone.edit.context) holds what every step shares: corpus, templates, C, the kept keys.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from rankone.artifacts.patch import Applied, Edit, Patch, apply_patch, library_versions, make_edit, revert_patch
from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.hooks import after_forward
from rankone.core.progress import Progress, track
from rankone.core.tokens import EditRequest, encode_request, join_target
from rankone.core.util import user_name, utcnow
from rankone.edit.context import EditContext
from rankone.methods.base import Computed, check_batch, method, resolve_settings
from rankone.methods.settings import MethodSettings
from rankone.methods.stats import LayerStats
from rankone.models.generation import check_fits, greedy, says, target_logprob
from rankone.models.handle import ModelHandle

log = logging.getLogger(__name__)

# A guard (rankone.edit.guard.Guard, or any such callable) looks at a step's computed update
# before it is written, with the step's requests, and returns a reason to refuse it (or None).
GuardFn = Callable[[Computed, Sequence[EditRequest]], "str | None"]


@dataclass
class Rejected:
    """A step the guard refused: its requests, why, and what had been computed (nothing was written)."""

    requests: list[EditRequest]
    reason: str
    computed: Computed


class Editor:
    def __init__(self, handle: ModelHandle, settings: MethodSettings | Mapping[str, Any] | str | None = None,
                 stats_corpus: str | os.PathLike | None = None, *, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True) -> None:
        """`settings`: None (r-ROME), a method name, a dict of your settings ("method" among them;
        merged over the model card's recommendations, then the paper's defaults), or a settings
        object used exactly as given (only a layer it leaves open is the model's default)."""
        if not isinstance(handle, ModelHandle):
            raise TypeError("Editor takes a ModelHandle: load_model(path), or ModelHandle.of(model, tokenizer)")
        self.handle = handle
        self.settings = resolve_settings(handle, settings)
        self.method = method(self.settings.method)
        self.context = EditContext(handle, stats_corpus, self.settings.sampled_corpus_tokens, self.settings.seed,
                                   cache_dir, progress)
        self.progress = progress
        self.rejected: list[Rejected] = []
        self.notes: dict[str, Any] = {}  # recorded in every edit's diagnostics (e.g. why this layer)

    @property
    def model(self) -> torch.nn.Module:
        return self.handle.model

    @property
    def tok(self) -> Any:
        return self.handle.tokenizer

    @property
    def layers(self) -> list[int]:
        """Every layer an edit writes: a batch method's window, else the one layer."""
        return list(self.settings.layers)

    @property
    def layer(self) -> int:
        """The edited layer; for a window method, the critical layer (the window's last)."""
        return self.layers[-1]

    @property
    def templates(self) -> list[str]:
        """"{}" and the context templates these settings average keys and values over."""
        return self.context.templates(self.settings)

    def stats(self, layer: int | None = None) -> LayerStats:
        """C of a layer (default: the edited one) with these settings' token budget, kept by the context."""
        layer = self.layer if layer is None else layer
        return self.context.stats([layer], self.settings.stats_tokens)[layer]

    # -- one step --

    def compute(self, requests: Sequence[EditRequest]) -> Computed:
        """The update for one step on the model as it is now (nothing is written)."""
        reqs = list(requests)
        if self.method.one_at_a_time and len(reqs) != 1:
            raise ValueError(f"{self.method.name} computes one request per step, not {len(reqs)}")
        s = self.settings
        planned = self.method.planned_passes(s, len(reqs), len(self.templates)) or None
        what = f"{reqs[0].subject} -> {reqs[0].target}" if len(reqs) == 1 else f"{len(reqs)} facts"
        t0 = time.perf_counter()
        # a pass is counted where every pass of every method runs: the (critical) edited projection
        passes = 0

        def count() -> None:
            nonlocal passes
            passes += 1
            bar.update()

        with Progress(planned, f"{self.method.name} ({what})", "passes", enabled=self.progress, delay=2.0) as bar, \
                after_forward(self.handle.proj(s.layer), count):
            c = self.method.compute(self.context, reqs, s)
            bar.end(passes)  # the loop may stop early (or read a few more passes): the line says what ran
        c.diagnostics["stats"] = self.context.stats_record(self.stats())
        if not self.method.one_at_a_time:
            c.diagnostics["batch_seconds"] = time.perf_counter() - t0
        return c

    def write(self, c: Computed, requests: Sequence[EditRequest], patch: Patch | None = None,
              author: str | None = None, reason: str | None = None) -> list[Edit]:
        """Merge each layer's update into the model, lowest first, appending its edit to `patch` as
        soon as it is written (so that the caller can revert exactly what was written)."""
        s, reqs = self.settings, [r.to_dict() for r in requests]
        templates = self.templates
        written: list[Edit] = []
        for u in c.updates:
            w = arch.weight_oi(arch.get_module(self.model, u.module))
            e, after = make_edit(
                w.detach().clone(), u.B, u.A, module=u.module, layer=u.layer, request=reqs[0],
                requests=None if self.method.one_at_a_time else reqs, keys=u.keys, method=s.method,
                hparams=s.to_dict(), seed=s.seed, context_templates=templates,
                diagnostics={**u.diagnostics, **c.diagnostics, **self.notes}, author=author, reason=reason)
            with torch.no_grad():
                w.copy_(after)
            written.append(e)
            if patch is not None:
                patch.edits.append(e)
        return written

    def outcome(self, request: EditRequest) -> dict[str, Any]:
        return outcome(self.model, self.tok, request)

    # -- the loop --

    def edit(self, requests: Iterable[EditRequest], keep: bool = False, author: str | None = None,
             reason: str | None = None, guard: GuardFn | None = None) -> Patch:
        """Edit and return the patch. With keep=False the model is given back exactly as it was;
        with keep=True the edits stay (and their keys join the context's kept keys). A guard (e.g.
        `rankone.edit.guard.Guard()`) may refuse a step; refused ones are in `self.rejected`."""
        reqs = list(requests)
        if not self.method.one_at_a_time:
            check_batch(reqs)
        steps = [[r] for r in reqs] if self.method.one_at_a_time else [reqs]
        author = author or user_name()
        patch = Patch([], base=self.handle.base_info(), created_at=utcnow(), library_versions=library_versions())
        try:
            for step in track(steps, "edits", "edits", enabled=self.progress and len(steps) > 1):
                c = self.compute(step)
                why = guard(c, step) if guard is not None else None
                if why:
                    log.warning("refused %s: %s", f"edit {step[0].subject!r}" if len(step) == 1
                                else f"a batch of {len(step)} edit(s)", why)
                    self.rejected.append(Rejected(list(step), why, c))
                    continue
                self.write(c, step, patch, author, reason)
                self._record_outcomes(step, patch.edits[-1])
        except BaseException:
            revert_patch(self.model, patch)
            raise
        if keep:
            self.context.kept.add_patch(patch)
        else:
            revert_patch(self.model, patch)
        return patch

    def _record_outcomes(self, step: Sequence[EditRequest], last: Edit) -> None:
        """What the model says now for each request of a step, on the step's last edit."""
        outs = [self.outcome(r) for r in step]
        if self.method.one_at_a_time:
            last.diagnostics["outcome"] = outs[0]
        else:
            last.diagnostics["outcomes"] = outs
        missed = [(r, o) for r, o in zip(step, outs) if not o["reached"]]
        if len(step) == 1 and missed:
            r, o = missed[0]
            log.warning("the edit %r -> %r did not reach its target: p(target) = %.3f, the model now says %r",
                        r.text()[0], r.target, o["p_target"], o["answer"])
        elif missed:
            r, o = missed[0]
            log.warning("%d of %d edit(s) of the batch did not reach the target, e.g. %r -> %r: the model now says %r",
                        len(missed), len(step), r.text()[0], r.target, o["answer"])

    def continue_from(self, patches: Sequence[Patch]) -> Applied:
        """Go on from patches made earlier (a registry's released ones, a run's checkpoint) as an
        unbroken run would: the templates and statistics are taken now, from the model as it is
        (the base the patches were made on), then the patches are applied (checked) and their keys
        kept. Returns the handle that reverts them."""
        self.templates  # noqa: B018 (taken now, from the base model)
        self.context.stats(self.layers, self.settings.stats_tokens)
        applied = apply_patch(self.model, list(patches), self.handle.spec)
        for p in patches:
            self.context.kept.add_patch(p)
        return applied


def outcomes_of(patch: Patch) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(request, outcome) for every request of a patch the Editor made: a rank-one edit's own
    outcome, or a batch's outcomes (recorded on its last edit)."""
    out = []
    for e in patch.edits:
        if "outcomes" in e.diagnostics:
            out += list(zip(e.facts, e.diagnostics["outcomes"]))
        elif "outcome" in e.diagnostics:
            out.append((e.request, e.diagnostics["outcome"]))
    return out


def outcome(model: torch.nn.Module, tok: Any, request: EditRequest) -> dict[str, Any]:
    """What the model says now for the request: p(target) (teacher forced) and its greedy answer;
    `reached` when the answer starts with the target as whole words."""
    prompt = request.text()[0]
    n = len(tok(" " + request.target, add_special_tokens=False)["input_ids"]) + 1
    answer = greedy(model, tok, prompt, n)
    try:
        p = math.exp(target_logprob(model, tok, prompt, request.target))
    except RankoneError:  # a target the tokenizer cannot align after this prompt: no probability, still an answer
        p = float("nan")
    return {"p_target": p, "answer": answer.strip(), "reached": says(answer, request.target)}


def check_request(handle: ModelHandle, request: EditRequest, s: MethodSettings) -> None:
    """Refuse, before any work, a request the tokenizer cannot align or that does not fit the context window."""
    model, tok = handle.model, handle.tokenizer
    encode_request(tok, request)
    given = [len(tok(p.replace("{}", ""))["input_ids"]) for p in s.prefixes or []]
    longest = max([n for n, _ in s.prefix_spec] + given + [0])  # tokens a context prefix adds
    check_fits(model, tok, join_target(request.text()[0], request.target)[0], extra_tokens=longest + 2,
               what="the edit prompt with its target")  # + 2: the prefix's separator and a BOS


def edit(handle: ModelHandle, requests: EditRequest | Iterable[EditRequest],
         settings: MethodSettings | Mapping[str, Any] | str | None = None,
         stats_corpus: str | os.PathLike | None = None, keep: bool = False, **kw: Any) -> Patch:
    """Compute a patch for one or many requests (see Editor). The model is left unchanged unless keep."""
    reqs = [requests] if isinstance(requests, EditRequest) else list(requests)
    return Editor(handle, settings, stats_corpus, progress=kw.pop("progress", True)).edit(reqs, keep=keep, **kw)
