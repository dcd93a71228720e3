"""Staging: a validated patch reaches a share of live traffic before it is released.

    validated → staged (stage: canary %, shadow %) → released (promote) | aborted (abort)

A staged patch joins the *candidate*: the released patches plus every staged patch, in the
order they were staged. `rankone serve` routes `canary` % of users to it (sticky per user) and
re-runs `shadow` % of the other requests on it without showing the answer. Staging a staged
patch again changes its percentages; each change is an audit entry like every transition.
Promoting releases it exactly as `release` does (gates passed, base checked, conflicts refused
unless forced); aborting takes it out of the candidate for good, with a reason.
"""

from __future__ import annotations

import math
from typing import Any

from rankone.core.errors import RankoneError
from rankone.core.util import user_name, utcnow
from rankone.lifecycle.records import PatchRecord, StagedRecord
from rankone.lifecycle.store import RegistryStore


def check_percent(name: str, value: Any) -> float:
    """A share of traffic: a finite number from 0 to 100."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 <= value <= 100:
        raise RankoneError(f"--{name} is a percentage of traffic from 0 to 100, not {value!r}")
    return float(value)


class Staging(RegistryStore):
    """The staging transitions; `rankone.lifecycle.registry.Registry` adds release and the rest."""

    def stage(self, ref: str, canary: float, shadow: float = 0.0, actor: str | None = None,
              reason: str | None = None) -> StagedRecord:
        """validated → staged with these percentages, or new percentages for a staged patch."""
        canary, shadow = check_percent("canary", canary), check_percent("shadow", shadow)
        if canary == 0 and shadow == 0:
            raise RankoneError("a staged patch needs --canary or --shadow above 0 (else nobody's traffic reaches it)")
        pid = self.resolve(ref)
        patch = self.load_patch(pid)  # a damaged patch is refused before it reaches any user
        actor = actor or user_name()
        with self._tx() as db:
            state = self.require("stage", pid, self._state(db, pid))
            self.require_passed(db, pid, "fix it and validate again before staging")
            self._check_base(db, pid, patch, None)  # type: ignore[attr-defined]
            old = db.execute("SELECT canary, shadow FROM staging WHERE patch_id = ?", (pid,)).fetchone()
            details: dict[str, Any] = {"canary": canary, "shadow": shadow}
            if old is None:
                seq = db.execute("SELECT COALESCE(MAX(staged_seq), 0) + 1 FROM staging").fetchone()[0]
                db.execute("INSERT INTO staging VALUES (?, ?, ?, ?, ?, ?)", (pid, canary, shadow, seq, utcnow(), actor))
            elif (old[0], old[1]) == (canary, shadow):
                raise RankoneError(f"patch {pid} is already staged at canary {canary:g} % and shadow {shadow:g} %; nothing changed")
            else:
                db.execute("UPDATE staging SET canary = ?, shadow = ? WHERE patch_id = ?", (canary, shadow, pid))
                details["was"] = {"canary": old[0], "shadow": old[1]}
            db.execute("UPDATE patches SET state = 'staged' WHERE id = ?", (pid,))
            self._audit(db, actor, "stage", pid, state, "staged", reason, details)
        return next(r for r in self.staged() if r.id == pid)

    def promote(self, ref: str, actor: str | None = None, reason: str | None = None, **release: Any) -> tuple[PatchRecord, list[Any]]:
        """staged → released: `Registry.release` with its checks (`release` takes its keyword arguments)."""
        return self.release(ref, actor, reason, promote=True, **release)  # type: ignore[attr-defined]

    def abort(self, ref: str, actor: str | None = None, reason: str | None = None) -> PatchRecord:
        """staged → aborted: out of the candidate for good (a later patch with the same content is this one)."""
        pid = self.resolve(ref)
        actor = actor or user_name()
        with self._tx() as db:
            state = self.require("abort", pid, self._state(db, pid))
            row = db.execute("SELECT canary, shadow FROM staging WHERE patch_id = ?", (pid,)).fetchone()
            db.execute("DELETE FROM staging WHERE patch_id = ?", (pid,))
            db.execute("UPDATE patches SET state = 'aborted' WHERE id = ?", (pid,))
            self._audit(db, actor, "abort", pid, "staged", "aborted", reason, {"canary": row[0], "shadow": row[1]})
        return self.get(pid)
