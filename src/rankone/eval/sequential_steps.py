"""One step of a sequential run (`rankone.eval.sequential.SequentialRun`): cases i0..i1−1 written
through the run's Editor with the run's guard (one case for the ROME family, a batch for the
window methods), appended to the run's patch, and one JSONL record per case, scored (ES, top-1 of
the new target) right after its step.

Every record of a step carries the step's first index (`batch`, for a batch) and ‖Δ‖ per fact
(`delta_fro`: ‖ΣBA‖_F over the step's layers / √n, the number the guard judges; for one
rank-one edit its ‖Δ‖_F); a rank-one edit also records its denominators and key cosine. An
update that would overflow the weights is refused unwritten and recorded as a failed edit.

With `compact_every`, `compact_step` replaces the run's patch by its compaction from the base
weights (`rankone.edit.compaction`, against the run's own C), and the edits that follow are made
on the compacted model, AlphaEdit preserving the compacted patch's keys.
"""

from __future__ import annotations

import math
import time
from typing import Any, Protocol, Sequence

import torch

from rankone.artifacts.patch import Patch, apply_patch, compose, revert_patch
from rankone.core.errors import OverflowRefused
from rankone.edit.editor import Editor
from rankone.edit.compaction import compact
from rankone.edit.guard import Guard, norm_spike
from rankone.eval.cases import Case
from rankone.eval.metrics import score
from rankone.methods.base import PreservedKeys, question


class SequentialRun(Protocol):
    """What a step reads and writes of its run (rankone.eval.sequential.SequentialRun)."""

    editor: Editor
    guard: Guard | None
    cases: Sequence[Case]
    cfg: Any  # SequentialConfig: norm, spike_factor, warmup
    model: torch.nn.Module
    tok: Any
    lines: list[dict[str, Any]]
    patch: Patch

    def w_dist(self) -> float: ...

RANK_ONE_FIELDS = ("denominator", "denom_mean_mean", "denom_bare_bare", "denom_bare_mean", "key_cosine",
                   "weight_fro", "delta_norm", "current_value_norm")


def keep(run: SequentialRun, p: Patch) -> None:
    """Append a written patch's edits to the run's patch."""
    run.patch = compose([run.patch, p]) if run.patch.edits else Patch(
        list(p.edits), run.patch.base, run.patch.created_at, run.patch.library_versions)


def score_now(run: SequentialRun, case: Case) -> dict[str, float]:
    """ES (new target over the true one) and top-1 of the new target, on the model as it is now."""
    sc = score(run.model, run.tok, [(case.prompt, case.target_new), (case.prompt, case.target_true)])
    return {"es": float(sc[0].p(run.cfg.norm) > sc[1].p(run.cfg.norm)), "top1": float(sc[0].top1)}


def edit_step(run: SequentialRun, i0: int, i1: int) -> list[dict[str, Any]]:
    """Cases i0..i1−1 as one step of the run's method; one record per case."""
    cases = run.cases[i0:i1]
    t0 = time.perf_counter()
    recs: list[dict[str, Any]] = [{"type": "edit", "i": i, "case_id": c.case_id, "prompt": c.prompt,
                                   "target": c.target_new, "target_true": c.target_true}
                                  for i, c in zip(range(i0, i1), cases)]
    if len(cases) > 1 or not run.editor.method.one_at_a_time:
        for r in recs:
            r["batch"] = i0
    # a batch asks each question once: where a later case of the batch asks the same, it supersedes
    # the earlier one (as it would one batch later), which is recorded as not written
    last = {question(c.request): k for k, c in enumerate(cases)}
    kept = [k for k, c in enumerate(cases) if last[question(c.request)] == k]
    for k, c in enumerate(cases):
        if k not in kept:
            recs[k].update(accepted=False, reason=f"superseded by edit {i0 + last[question(c.request)]} of the same "
                           "batch (it asks the same question)", delta_fro=None, flags=["superseded"])
    recs_kept, cases = [recs[k] for k in kept], [cases[k] for k in kept]
    n_rej, why, p = len(run.editor.rejected), "not written", None
    try:
        p = run.editor.edit([c.request for c in cases], keep=True, guard=run.guard)
    except OverflowRefused as e:  # the update overflows the weight's dtype: never written
        why = f"overflow: {e}"
    refused = run.editor.rejected[-1] if len(run.editor.rejected) > n_rej else None
    computed = refused.computed if refused is not None else None
    if p is not None and p.edits:
        keep(run, p)
        per_fact = math.sqrt(sum(e.delta_fro ** 2 for e in p.edits) / len(cases))  # as the guard measures it
        prev = [r["delta_fro"] for r in run.lines if r["type"] == "edit" and r["accepted"]]
        spike = norm_spike(per_fact, prev, run.cfg.spike_factor, run.cfg.warmup)
        d = p.edits[-1].diagnostics
        probs = d["targets"]["target_prob"] if "targets" in d else [d.get("value", {}).get("target_prob")]
        for rec, c, prob in zip(recs_kept, cases, probs):
            rec.update(accepted=True, **score_now(run, c), value_prob=prob, delta_fro=per_fact,
                       flags=[f"‖Δ‖ spike: {spike}"] if spike else [])
    else:
        why = refused.reason if refused is not None else why
        per_fact = computed.delta_fro / math.sqrt(len(cases)) if computed is not None else None
        d = computed.updates[-1].diagnostics if computed is not None else {}
        for rec in recs_kept:
            rec.update(accepted=False, reason=why, delta_fro=per_fact,
                       flags=["refused by the guard" if refused is not None else "not written"])
    for rec in recs:
        rec.update({k: d.get(k) for k in RANK_ONE_FIELDS} if run.editor.method.one_at_a_time else {"denominator": None})
    w, secs = run.w_dist(), (time.perf_counter() - t0) / len(recs)
    for rec in recs:
        rec.update(w_dist=w, seconds=secs)
    return recs


def served_rank(patch: Patch) -> int:
    """The largest rank a module carries in the patch: Σ k of its edits (what a server adds per token)."""
    ranks: dict[str, int] = {}
    for e in patch.edits:
        ranks[e.module] = ranks.get(e.module, 0) + e.rank
    return max(ranks.values(), default=0)


def compact_step(run: SequentialRun, n_done: int) -> dict[str, Any]:
    """The run's patch replaced by its compaction from the base weights: reverted (exactly),
    compacted against the run's C, applied (fingerprint-checked); its keys are what AlphaEdit
    preserves from now on. One record."""
    t0 = time.perf_counter()
    rank_before = served_rank(run.patch)
    revert_patch(run.model, run.patch)
    try:
        done = compact(run.editor.handle, [run.patch], run.cfg.compaction(), context=run.editor.context,
                       replaces=[], reason=f"compaction after {n_done} edits", progress=False)
    except BaseException:
        apply_patch(run.model, run.patch, run.editor.handle.spec)  # the run goes on from where it was
        raise
    apply_patch(run.model, done.patch, run.editor.handle.spec)
    run.patch = done.patch
    run.editor.context.kept = PreservedKeys.of_patches([done.patch])
    mods = done.modules.values()
    return {"type": "compact", "n": n_done, "method": run.cfg.compact_method, "targets": run.cfg.compact_targets,
            "rank_before": rank_before, "rank_after": served_rank(done.patch),
            "keys": sum(d["n_kept"] for d in mods), "superseded": sum(len(d["superseded"]) for d in mods),
            "constraint_error": done.max_constraint_error, "w_dist": run.w_dist(),
            "seconds": time.perf_counter() - t0}
