"""The two kinds of step of a sequential run (`rankone.eval.sequential.SequentialRun`): one
rank-one edit, or one batch (MEMIT, AlphaEdit). Each writes through the run's Editor with the
run's guard, appends what was written to the run's patch and returns the JSONL records: one per
case, scored (ES, top-1 of the new target) right after its edit or its batch.

In a batch every case's record carries the batch's first index (`batch`) and the batch's ‖Δ‖ per
fact (`delta_fro`: ‖ΣBA‖_F over the window / √n, the number the guard judges; see
rankone.edit.guard); batch methods have no denominator.
"""

from __future__ import annotations

import math
import time
from typing import Any

from rankone.artifacts.patch import Patch, compose
from rankone.edit.guard import norm_spike
from rankone.eval.cases import Case
from rankone.eval.metrics import score


def keep(run: Any, p: Patch) -> None:
    """Append a written patch's edits to the run's patch."""
    run.patch = compose([run.patch, p]) if run.patch.edits else Patch(
        list(p.edits), run.patch.base, run.patch.created_at, run.patch.library_versions)


def score_now(run: Any, case: Case) -> dict[str, float]:
    """ES (new target over the true one) and top-1 of the new target, on the model as it is now."""
    sc = score(run.model, run.tok, [(case.prompt, case.target_new), (case.prompt, case.target_true)])
    return {"es": float(sc[0].p(run.cfg.norm) > sc[1].p(run.cfg.norm)), "top1": float(sc[0].top1)}


def edit_one(run: Any, i: int) -> dict[str, Any]:
    """Case i as one rank-one edit; its record with the update's ‖Δ‖ and denominators."""
    case = run.cases[i]
    t0 = time.perf_counter()
    n_rej = len(run.editor.rejected)
    rec: dict[str, Any] = {"type": "edit", "i": i, "case_id": case.case_id, "prompt": case.prompt,
                           "target": case.target_new, "target_true": case.target_true}
    try:
        p = run.editor.edit([case.request], keep=True, guard=run.guard)
    except FloatingPointError as e:  # the update overflows the weight's dtype: never written
        p, rec["reason"] = None, f"overflow: {e}"
    if p is not None and p.edits:
        e = p.edits[0]
        keep(run, p)
        d = e.diagnostics
        prev = [r["delta_fro"] for r in run.lines if r["type"] == "edit" and r["accepted"]]
        rec.update(accepted=True, **score_now(run, case), value_prob=d.get("value", {}).get("target_prob"))
        spike = norm_spike(e.delta_fro, prev, run.cfg.spike_factor, run.cfg.warmup)
        rec["flags"] = [f"‖Δ‖ spike: {spike}"] if spike else []
    else:
        d = run.editor.rejected[-1].diagnostics if len(run.editor.rejected) > n_rej else {}
        rec.update(accepted=False, reason=rec.get("reason") or (run.editor.rejected[-1].reason if d else "?"),
                   flags=["refused by the guard" if d else "not written"])
    for k in ("delta_fro", "denominator", "denom_mean_mean", "denom_bare_bare", "denom_bare_mean", "key_cosine",
              "weight_fro", "delta_norm", "current_value_norm"):
        rec[k] = d.get(k)
    rec["w_dist"] = run.w_dist()
    rec["seconds"] = time.perf_counter() - t0
    return rec


def edit_batch(run: Any, i0: int, i1: int) -> list[dict[str, Any]]:
    """Cases i0..i1−1 as one batch; one record per case, scored once the batch is written."""
    cases = run.cases[i0:i1]
    t0 = time.perf_counter()
    recs: list[dict[str, Any]] = [{"type": "edit", "i": i, "batch": i0, "case_id": c.case_id, "prompt": c.prompt,
                                   "target": c.target_new, "target_true": c.target_true, "denominator": None}
                                  for i, c in zip(range(i0, i1), cases)]
    n_rej, why = len(run.editor.rejected), "not written"
    try:
        p = run.editor.edit([c.request for c in cases], keep=True, guard=run.guard)
    except FloatingPointError as e:  # the update overflows the weight's dtype: never written
        p, why = None, f"overflow: {e}"
    if p is not None and p.edits:
        keep(run, p)
        per_fact = math.sqrt(sum(e.delta_fro ** 2 for e in p.edits) / len(cases))  # as the guard measures it
        prev = [r["delta_fro"] for r in run.lines if r["type"] == "edit" and r["accepted"]]
        spike = norm_spike(per_fact, prev, run.cfg.spike_factor, run.cfg.warmup)
        probs = p.edits[-1].diagnostics.get("targets", {}).get("target_prob", [None] * len(cases))
        for rec, c, prob in zip(recs, cases, probs):
            rec.update(accepted=True, **score_now(run, c), value_prob=prob, delta_fro=per_fact,
                       flags=[f"‖Δ‖ spike: {spike}"] if spike else [])
    else:
        refused = len(run.editor.rejected) > n_rej
        why = run.editor.rejected[-1].reason if refused else why
        per_fact = run.editor.rejected[-1].diagnostics["delta_fro_per_fact"] if refused else None
        for rec in recs:
            rec.update(accepted=False, reason=why, delta_fro=per_fact,
                       flags=["refused by the guard" if refused else "not written"])
    w, secs = run.w_dist(), (time.perf_counter() - t0) / len(cases)
    for rec in recs:
        rec.update(w_dist=w, seconds=secs)
    return recs
