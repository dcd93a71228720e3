"""Compacting a registry: the whole release re-solved from the base as one patch, gated, released
in its place in one audited transition, and reversible.

    from rankone.lifecycle.compact import compact_release
    result = compact_release(registry, handle, reason="nightly compaction", suite=load_suite("suite.jsonl"))
    result.released, result.patch_id, result.replaced, result.report.passed

`compact_release` (what `rankone registry compact` and the self-healing loop call):

 1. the model must be the registry's base and nothing may be staged (staged patches were made
    on the weights the compaction replaces);
 2. the released chain is compacted (`rankone.edit.compaction.compact`: one edit per module,
    every released edit's key and target, solved by EMMET, MEMIT or AlphaEdit from the base);
 3. it is gated like any patch (`rankone.lifecycle.gates.run_gates` with the reference = the
    release now, the candidate = the base plus the compacted patch alone): a target check for
    every fact the replaced edits wrote (failing only where the release says it and the
    compaction does not), the suite's keep and perplexity checks, the ‖ΔW‖ gate;
 4. it is added and its gate report recorded (proposed → validated, or proposed with the failed
    report), and when it passed, released in place of the chain (`Registry.release_compaction`:
    the replaced patches become `compacted`, one audit entry lists them). `registry rollback` of
    the compacted patch releases them again, and the release builds to the same bits as before.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rankone.artifacts.patch import Patch
from rankone.core.errors import RankoneError
from rankone.core.util import user_name
from rankone.edit.compaction import CompactSettings, Compacted, compact
from rankone.lifecycle.gates import Check, GatePolicy, GateReport, Suite, run_gates
from rankone.lifecycle.registry import Registry
from rankone.models.handle import ModelHandle


@dataclass
class CompactionResult:
    patch_id: str  # the compacted patch's registry id
    replaced: list[str]  # the released patches it replaces (release order)
    released: bool  # False: the gates failed; it stays proposed with its report, the release is unchanged
    report: GateReport
    compacted: Compacted  # the patch and, per module, what the solve did (keys, superseded, constraint error)


def fact_checks(patches: list[Patch]) -> list[Check]:
    """A target check for every distinct fact the patches write, failing only on a regression
    (the reference says the target, the candidate does not)."""
    seen: dict[tuple[str, str], Check] = {}
    for p in patches:
        for f in p.facts():
            prompt = f.get("prompt", "").replace("{}", f.get("subject", "")).rstrip()
            if prompt and f.get("target", "").strip():  # a later edit of the same question wins, as in the chain
                seen[prompt, f["target"].strip()] = Check("target", prompt=prompt, target=f["target"].strip(),
                                                          where="replaced edit", regression_only=True)
    return list(seen.values())


def compact_release(registry: Registry, handle: ModelHandle, *, reason: str, suite: Suite | None = None,
                    policy: GatePolicy | None = None, settings: CompactSettings | None = None,
                    stats_corpus: str | os.PathLike | None = None, actor: str | None = None,
                    progress: bool = False) -> CompactionResult:
    """Compact the registry's release on its base model `handle` (left unchanged), gate it, and
    release it in place of the chain when it passes (module docstring). Raises RankoneError,
    with nothing changed, when nothing is released, something is staged, or the model is not the
    base; a release made meanwhile refuses the transition (the compacted patch stays validated)."""
    if not reason or not reason.strip():
        raise RankoneError("a compaction needs a reason: the audit log records why")
    ids = registry.check_compactable()
    fps = registry.check_model(handle)
    chain = [registry.load_patch(i) for i in ids]
    actor = actor or user_name()
    done = compact(handle, chain, settings, stats_corpus=stats_corpus, replaces=ids, author=actor, reason=reason,
                   progress=progress)
    checks = fact_checks(chain) + (list(suite.checks) if suite is not None else [])
    gate_suite = Suite(checks, suite.path if suite else "", suite.sha256 if suite else "")
    report = run_gates(handle.model, handle.tokenizer, done.patch, gate_suite, policy or GatePolicy(), chain, ids,
                       spec=handle.spec, replaces=True)
    with tempfile.TemporaryDirectory(prefix="rankone-compact-") as tmp:
        rec, _ = registry.add(done.patch.save(Path(tmp) / "patch"), actor, reason)
    rec = registry.record_validation(rec.id, report.to_dict(), report.passed, actor, reason)
    if report.passed:
        s = settings or CompactSettings()
        registry.release_compaction(rec.id, ids, actor, reason, base_modules=fps, details={
            "method": s.method, "targets": s.targets, "modules": len(done.modules),
            "keys": sum(d["n_kept"] for d in done.modules.values()),
            "max_constraint_error": done.max_constraint_error})
    return CompactionResult(rec.id, ids, report.passed, report, done)
