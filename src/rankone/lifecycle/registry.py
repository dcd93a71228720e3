"""The patch registry: a state machine over the registry's database and store, with an audit log.

One registry releases onto one base model. The database, the content-addressed store, locking
and crash safety are `rankone.lifecycle.store`; this module is the patch lifecycle on top of them.

States: proposed → validated → released → rolled_back, and proposed|validated → rejected; a
validated patch may be staged first (validated → staged → released by `promote`, or → aborted;
`rankone.lifecycle.staging`), which `rankone serve` rolls out to a share of users. A compaction
replaces the whole release by one patch (released → compacted; rolling the compaction back
releases them again: `rankone.lifecycle.compactions`).
Every transition appends to `audit` (time, actor, action, states, reason) in the same
transaction as the change; triggers make `audit` and `validations` append-only, and each audit
entry carries the hash of the one before it, so `check` notices entries removed behind SQLite's
back.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from rankone.artifacts.patch import Patch, apply_patch
from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import tensor_sha256
from rankone.lifecycle.records import CheckReport, PatchRecord, _entry_hash
from rankone.lifecycle.store import _safe_id, content_id, crash_point, is_patch_dir
from rankone.core.util import user_name, utcnow
from rankone.lifecycle.compactions import Compactions
from rankone.models.handle import ModelHandle


def model_fingerprints(model: torch.nn.Module, modules: list[str], spec: arch.ArchSpec) -> dict[str, str]:
    """sha256 of each listed module's [out, in] weight, and of every layer's edited projection."""
    names = set(modules) | {spec.proj.format(i) for i in range(arch.num_layers(model, spec))}
    out = {}
    for m in sorted(names):
        try:
            out[m] = tensor_sha256(arch.weight_oi(arch.get_module(model, m)))
        except RankoneError:
            continue  # missing: the comparison names it
    return out


class Registry(Compactions):
    """One registry file and its store. Every public method is one transaction."""

    # -- transitions --

    def add(self, patch_dir: str | os.PathLike, actor: str | None = None, reason: str | None = None) -> tuple[PatchRecord, bool]:
        """Register a patch folder; (record, True) if new, (existing record, False) if already there."""
        src = Path(patch_dir)
        patch = Patch.load(src)  # refuses anything that is not a readable patch
        if not patch.edits:
            raise RankoneError(f"patch {src} holds no edits; nothing to register")
        pid = content_id(src)
        self._store_put(src, pid)
        crash_point("add:stored")
        first: dict[tuple[str, str, str], str] = {}  # a batch's fact once, with the first module that writes it
        for e in patch.edits:
            for f in e.facts:
                first.setdefault((f.get("subject", ""), f.get("prompt", ""), f.get("target", "")), e.module)
        summary = [{"module": m, "subject": s, "prompt": p, "target": t} for (s, p, t), m in first.items()]
        actor = actor or user_name()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM patches WHERE id = ?", (pid,)).fetchone() is None:
                db.execute("INSERT INTO patches (id, state, n_edits, summary, base, added_at, added_by, reason) "
                           "VALUES (?,?,?,?,?,?,?,?)",
                           (pid, "proposed", len(patch.edits), json.dumps(summary), json.dumps(patch.base, sort_keys=True),
                            utcnow(), actor, reason))
                self._audit(db, actor, "add", pid, None, "proposed", reason,
                            {"n_edits": len(patch.edits), "modules": sorted({e.module for e in patch.edits}),
                             "facts": [f"{s['prompt'].replace('{}', s['subject'])} -> {s['target']}" for s in summary]})
                crash_point("add:uncommitted")
                created = True
            else:
                created = False
        return self.get(pid), created

    def record_validation(self, ref: str, report: dict[str, Any], passed: bool, actor: str | None = None,
                          reason: str | None = None) -> PatchRecord:
        """Store a gate report; the state becomes `validated` only if it passed."""
        pid = self.resolve(ref)
        actor = actor or user_name()
        with self._tx() as db:
            state = self.require("validate", pid, self._state(db, pid))
            db.execute("INSERT INTO validations (patch_id, at, actor, passed, report) VALUES (?,?,?,?,?)",
                       (pid, utcnow(), actor, int(passed), json.dumps(report)))
            new = "validated" if passed else state
            if new != state:
                db.execute("UPDATE patches SET state = ? WHERE id = ?", (new, pid))
            n_fail = sum(not r["passed"] for r in report.get("results", []))
            self._audit(db, actor, "validate" if passed else "validate-failed", pid, state, new, reason,
                        {"passed": passed, "n_checks": len(report.get("results", [])), "n_failed": n_fail,
                         "suite_sha256": report.get("suite", {}).get("sha256", "")})
        return self.get(pid)

    def _released_patches(self, db: Any) -> list[tuple[str, Patch]]:
        rows = db.execute("SELECT id FROM patches WHERE state = 'released' ORDER BY release_seq").fetchall()
        return [(r[0], self.load_patch(r[0])) for r in rows]

    def check_model(self, model: ModelHandle | torch.nn.Module, extra_modules: Sequence[str] = ()) -> dict[str, str]:
        """Refuse a model that is not this registry's base; its fingerprints when it is."""
        h = model if isinstance(model, ModelHandle) else ModelHandle.of(model, None)
        fps = model_fingerprints(h.model, self.base_module_names() + list(extra_modules), h.spec)
        self.verify_base(fps)
        return fps

    def fit_check(self, ref: str, model: ModelHandle | torch.nn.Module) -> tuple[dict[str, str], list[str]]:
        """Apply the released chain and this patch to `model`, then revert: a patch that does not fit
        the real base model is refused here (one line, model unchanged). Returns the model's
        fingerprints and the released ids it was checked with."""
        pid = self.resolve(ref)
        patch = self.load_patch(pid)
        chain = [r.id for r in self.released()]
        fps = self.check_model(model, [e.module for e in patch.edits])
        h = model if isinstance(model, ModelHandle) else ModelHandle.of(model, None)
        apply_patch(h.model, [self.load_patch(q) for q in chain] + [patch], h.spec).revert()
        return fps, chain

    def release(self, ref: str, actor: str | None = None, reason: str | None = None, force: bool = False,
                conflict_threshold: float = 0.9, relations: dict[str, str] | None = None,
                base_modules: dict[str, str] | None = None, base_info: dict[str, Any] | None = None,
                verified_chain: list[str] | None = None,
                model: ModelHandle | torch.nn.Module | None = None,
                promote: bool = False) -> tuple[PatchRecord, list[Any]]:
        """Append a validated patch to the release order. Conflicts refuse unless `force`.

        `model`: the real base model (a ModelHandle from load_model, or the model itself). The
        patch, on top of the released ones, is applied to it and reverted first (`fit_check`), and
        its fingerprints, the checked chain and its source are recorded; without it the release
        rests on the fingerprint walk over the patches alone.
        `base_modules`/`base_info`/`verified_chain`: the same evidence, when the caller has already
        checked the model itself (recorded on the first release, compared on later ones).
        `promote`: release a staged patch (`Staging.promote`) rather than a validated one.
        """
        from rankone.lifecycle.conflicts import explain, find_conflicts, fit_release, relation_map

        pid = self.resolve(ref)
        if model is not None:
            base_modules, verified_chain = self.fit_check(pid, model)
            if isinstance(model, ModelHandle) and model.source:
                src = Path(model.source)
                base_info = dict(base_info or {}, name_or_path=str(src.resolve()) if src.exists() else model.source)
                if relations is None and model.folder is not None:
                    relations = relation_map(model.folder)
        patch = self.load_patch(pid)
        actor = actor or user_name()
        with self._tx() as db:
            state = self.require("promote" if promote else "release", pid, self._state(db, pid))
            self.require_passed(db, pid, "fix it and validate again before release")
            self._check_base(db, pid, patch, base_modules)
            released = self._released_patches(db)
            base_fp = {r["module"]: r["sha256"] for r in db.execute("SELECT * FROM base_modules")}
            learnt, deps, problems = fit_release(base_fp, released, patch)
            vouched = verified_chain is not None and verified_chain == [q for q, _ in released]
            if problems and not vouched:
                raise RankoneError(f"patch {pid} cannot be released onto this registry's base: {problems[0]}")
            conflicts = find_conflicts(patch, released, conflict_threshold, relations)
            if conflicts and not force:
                raise RankoneError(explain(conflicts))
            if not db.execute("SELECT 1 FROM base").fetchone():  # the first release fixes the base model
                info = dict(base_info or {}, model_type=patch.base.get("model_type"), n_layers=patch.base.get("n_layers"))
                for k, v in sorted(info.items()):
                    db.execute("INSERT INTO base VALUES (?, ?)", (k, json.dumps(v)))
            seq = self._mark_released(db, pid, base_modules, learnt)
            db.execute("DELETE FROM staging WHERE patch_id = ?", (pid,))
            for q in sorted(deps):
                db.execute("INSERT OR IGNORE INTO depends VALUES (?, ?)", (pid, q))
            details: dict[str, Any] = {"release_seq": seq, "depends_on": sorted(deps)}
            if conflicts:
                details["forced_over"] = [c.detail for c in conflicts]
            self._audit(db, actor, "promote" if promote else "release", pid, state, "released", reason, details)
            crash_point("release:uncommitted")
        return self.get(pid), conflicts

    def _check_base(self, db: Any, pid: str, patch: Patch, base_modules: dict[str, str] | None) -> None:
        info = {r["key"]: json.loads(r["value"]) for r in db.execute("SELECT * FROM base")}
        for k in ("model_type", "n_layers"):
            if info and patch.base.get(k) is not None and info.get(k) is not None and patch.base[k] != info[k]:
                raise RankoneError(f"patch {pid} was made for a {patch.base.get('model_type')} with {patch.base.get('n_layers')} "
                                   f"layers; this registry releases onto a {info.get('model_type')} with "
                                   f"{info.get('n_layers')} layers (use another --registry for another base model)")
        if base_modules is not None:
            self._compare_base(db, base_modules)

    def _compare_base(self, db: Any, model_fp: dict[str, str]) -> None:
        for r in db.execute("SELECT * FROM base_modules ORDER BY module"):
            got = model_fp.get(r["module"])
            if got != r["sha256"]:
                have = f"weights {got[:12]}…" if got else "no such module"
                raise RankoneError(f"the model given is not this registry's base model: {r['module']} has {have}, the "
                                   f"patches were released onto {r['sha256'][:12]}… (see `rankone registry show`)")

    def verify_base(self, model_fp: dict[str, str]) -> None:
        """Refuse a model whose fingerprints differ from the base the registry released onto."""
        self._compare_base(self.db, model_fp)

    def base_module_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT module FROM base_modules ORDER BY module")]

    def rollback(self, ref: str, actor: str | None = None, reason: str | None = None, cascade: bool = False) -> list[str]:
        """Take a released patch out of the release; patches built on it go too only with `cascade`."""
        pid = self.resolve(ref)
        actor = actor or user_name()
        with self._tx() as db:
            state = self.require("rollback", pid, self._state(db, pid))
            order, todo = [], [pid]
            while todo:  # released patches that depend on it, transitively
                q = todo.pop()
                if q in order:
                    continue
                order.append(q)
                todo += [r[0] for r in db.execute("SELECT d.patch_id FROM depends d JOIN patches p ON p.id = d.patch_id "
                                                  "WHERE d.on_id = ? AND p.state = 'released'", (q,))]
            if len(order) > 1 and not cascade:
                raise RankoneError(f"released patch(es) {', '.join(order[1:])} were made on top of {pid}; roll them back "
                                   "first, or pass --cascade to roll back all of them")
            for q in reversed(order):
                db.execute("UPDATE patches SET state = 'rolled_back' WHERE id = ?", (q,))
                self._audit(db, actor, "rollback", q, "released", "rolled_back", reason,
                            {} if q == pid else {"cascade_from": pid})
                self._restore_compacted(db, q, actor, reason)
            crash_point("rollback:uncommitted")
        return list(reversed(order))

    def reject(self, ref: str, actor: str | None = None, reason: str | None = None) -> PatchRecord:
        pid = self.resolve(ref)
        actor = actor or user_name()
        with self._tx() as db:
            state = self.require("reject", pid, self._state(db, pid))
            db.execute("UPDATE patches SET state = 'rejected' WHERE id = ?", (pid,))
            self._audit(db, actor, "reject", pid, state, "rejected", reason)
        return self.get(pid)

    def record_build(self, out: str, actor: str | None, ids: list[str], fmt: str) -> None:
        """Builds are not transitions but belong in the audit trail of what was shipped."""
        with self._tx() as db:
            self._audit(db, actor or user_name(), "build", None, None, None, None, {"out": out, "patches": ids, "format": fmt})

    # -- consistency --

    def check(self, prune: bool = False, min_age_s: float = 600) -> CheckReport:
        """Every row has its files and they hash to its id; the audit hash chain is intact.

        Orphaned store folders (a crash between the store write and the commit) are reported;
        with `prune`, those older than `min_age_s` (so never one a running `add` is making) and
        leftover temporary folders are removed.
        """
        rep = CheckReport()
        ids = {r[0] for r in self.db.execute("SELECT id FROM patches")}
        for pid in sorted(ids):
            d = self.patch_dir(pid)
            if not is_patch_dir(d):
                rep.problems.append(f"patch {pid} has no files in {self.store}")
            elif _safe_id(d) != pid:
                rep.problems.append(f"patch {pid}: files in {d} do not hash to its id (damaged)")
            else:
                try:
                    Patch.load(d)  # the digests inside the files, shapes and types
                except RankoneError as e:
                    rep.problems.append(f"patch {pid}: {e}")
        prev = ""
        for e in self.log():
            if e.prev_hash != prev or _entry_hash(prev, vars(e)) != e.hash:
                rep.problems.append(f"audit entry {e.seq} does not continue the hash chain (the log was altered)")
                break
            prev = e.hash
        seqs = [r[0] for r in self.db.execute("SELECT release_seq FROM patches WHERE release_seq IS NOT NULL ORDER BY release_seq")]
        if len(seqs) != len(set(seqs)):
            rep.problems.append("two patches share a release position")
        n_rel = self.db.execute("SELECT COUNT(*) FROM audit WHERE action IN ('release', 'promote', 'compact')").fetchone()[0]
        if n_rel != len(seqs):
            rep.problems.append(f"{len(seqs)} patches have a release position but the audit log records {n_rel} releases")
        for r in self.db.execute("SELECT s.patch_id, p.state FROM staging s JOIN patches p ON p.id = s.patch_id "
                                 "WHERE p.state != 'staged'"):
            rep.problems.append(f"patch {r[0]} has staging percentages but is {r[1]}")
        for d in sorted(self.store.iterdir()):
            old = time.time() - d.stat().st_mtime > min_age_s
            if d.name.startswith("."):
                if prune and old:
                    shutil.rmtree(d, ignore_errors=True)
                    rep.pruned.append(d.name)
            elif d.name not in ids:
                rep.orphans.append(d.name)
                if prune and old:
                    shutil.rmtree(d, ignore_errors=True)
                    rep.pruned.append(d.name)
        return rep
