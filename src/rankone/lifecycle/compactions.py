"""The compaction transition: one validated patch released in place of the whole release.

    released chain p₁ … p_n  →  compacted (each, `compactions` row: into C)
    validated C              →  released (the next release position)

in one transaction, with an audit entry for C that lists the patches it replaces and one for
each of them. Rolling C back (`Registry.rollback`) puts p₁ … p_n back to released at their old
positions, so the release builds to the same bits as before the compaction. How C is made and
gated is `rankone.lifecycle.compact`.
"""

from __future__ import annotations

from typing import Any, Sequence

from rankone.core.errors import RankoneError
from rankone.core.util import user_name, utcnow
from rankone.lifecycle.staging import Staging
from rankone.lifecycle.records import PatchRecord


class Compactions(Staging):
    """The compaction transitions; `rankone.lifecycle.registry.Registry` adds release and the rest."""

    def release_compaction(self, ref: str, replaces: Sequence[str], actor: str | None = None,
                           reason: str | None = None, base_modules: dict[str, str] | None = None,
                           details: dict[str, Any] | None = None) -> PatchRecord:
        """validated C → released in place of `replaces`, which must be the release as it is now
        (in release order): a release, rollback or staging since C was computed refuses it."""
        from rankone.lifecycle.conflicts import fit_release

        pid = self.resolve(ref)
        patch = self.load_patch(pid)
        actor = actor or user_name()
        with self._tx() as db:
            state = self.require("compact", pid, self._state(db, pid))
            self.require_passed(db, pid, "it does not replace the release")
            now = self._compactable(db)
            if now != list(replaces):
                raise RankoneError(f"the release changed since the compaction was computed ({len(now)} released patch(es) "
                                   f"now, {len(replaces)} compacted); compact again")
            self._check_base(db, pid, patch, base_modules)  # type: ignore[attr-defined]
            base_fp = {r["module"]: r["sha256"] for r in db.execute("SELECT * FROM base_modules")}
            learnt, deps, problems = fit_release(base_fp, [], patch)
            if problems or deps:
                raise RankoneError(f"patch {pid} is not made on the registry's base model, so it cannot replace the "
                                   f"release: {problems[0] if problems else 'it depends on released patches'}")
            seq = self._mark_released(db, pid, base_modules, learnt)
            self._audit(db, actor, "compact", pid, state, "released", reason,
                        {"release_seq": seq, "replaces": now, **(details or {})})
            for q in now:
                self.require("compacted", q, self._state(db, q))
                db.execute("UPDATE patches SET state = 'compacted' WHERE id = ?", (q,))
                db.execute("INSERT OR REPLACE INTO compactions VALUES (?, ?)", (q, pid))
                self._audit(db, actor, "compacted", q, "released", "compacted", reason, {"into": pid})
        return self.get(pid)

    def _mark_released(self, db: Any, pid: str, base_modules: dict[str, str] | None, learnt: dict[str, str]) -> int:
        """Inside a release's transaction: the base fingerprints it brings recorded, and the patch put
        at the next release position; returns that position."""
        for m, sha in sorted((base_modules or {}).items()):  # checked against the known ones before
            db.execute("INSERT OR IGNORE INTO base_modules VALUES (?, ?, 'model')", (m, sha))
        for m, sha in sorted(learnt.items()):
            db.execute("INSERT OR IGNORE INTO base_modules VALUES (?, ?, ?)", (m, sha, f"patch:{pid}"))
        seq = db.execute("SELECT COALESCE(MAX(release_seq), 0) + 1 FROM patches").fetchone()[0]
        db.execute("UPDATE patches SET state = 'released', release_seq = ?, released_at = ? WHERE id = ?",
                   (seq, utcnow(), pid))
        return int(seq)

    def compacted_into(self, ref: str) -> str | None:
        """The compaction a compacted patch was replaced by (None for any other patch)."""
        pid = self.resolve(ref)
        row = self.db.execute("SELECT c.into_id FROM compactions c JOIN patches p ON p.id = c.patch_id "
                              "WHERE c.patch_id = ? AND p.state = 'compacted'", (pid,)).fetchone()
        return row[0] if row else None

    def replaced_by(self, ref: str) -> list[str]:
        """The patches a compaction replaced, in their release order."""
        pid = self.resolve(ref)
        rows = self.db.execute("SELECT c.patch_id FROM compactions c JOIN patches p ON p.id = c.patch_id "
                               "WHERE c.into_id = ? ORDER BY p.release_seq", (pid,))
        return [r[0] for r in rows]

    def _restore_compacted(self, db: Any, pid: str, actor: str, reason: str | None) -> list[str]:
        """Inside a rollback of `pid`: the patches it replaced go back to released (their positions
        were kept), each with an audit entry."""
        rows = db.execute("SELECT c.patch_id FROM compactions c JOIN patches p ON p.id = c.patch_id "
                          "WHERE c.into_id = ? AND p.state = 'compacted' ORDER BY p.release_seq", (pid,)).fetchall()
        for (q,) in rows:
            self.require("restore", q, "compacted")
            db.execute("UPDATE patches SET state = 'released' WHERE id = ?", (q,))
            self._audit(db, actor, "restore", q, "compacted", "released", reason, {"compaction_rolled_back": pid})
        return [r[0] for r in rows]

    def check_compactable(self) -> list[str]:
        """The released ids, in release order, when the release can be compacted now (something is
        released, nothing staged); else one line saying why not. The CLI asks before it loads a model."""
        return self._compactable(self.db)

    def _compactable(self, db: Any) -> list[str]:
        now = [r[0] for r in db.execute("SELECT id FROM patches WHERE state = 'released' ORDER BY release_seq")]
        if not now:
            raise RankoneError("nothing is released, so there is nothing to compact")
        staged = [r[0] for r in db.execute("SELECT patch_id FROM staging s JOIN patches p ON p.id = s.patch_id "
                                           "WHERE p.state = 'staged'")]
        if staged:
            raise RankoneError(f"patch(es) {', '.join(staged)} are staged on top of the release; promote or abort "
                               "them before compacting (they were made on the weights a compaction replaces)")
        return now
