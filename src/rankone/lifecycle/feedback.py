"""The live loop's records in the registry's database: user feedback, probe results, heal events.

    feedback        one row per report: the answer it is about (prompt, answer, arm, patch set),
                    the reporter (the user of that request, or a token-authenticated trusted
                    reporter), the verdict and correction; its status as heal handled it
    probe_results   every probe run: the prompt, the expected answer, the arm, pass or fail

`rankone serve` writes feedback (POST /v1/feedback); `rankone heal` reads it, runs the probes
and writes its decisions as audit entries (`record_event`: the same hash chain as every
transition). Both open the database with their own connection (WAL, a busy timeout), so the
server and heal run side by side like several `rankone registry` commands do.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from rankone.core.errors import RankoneError
from rankone.core.util import utcnow
from rankone.lifecycle.store import AuditEntry, RegistryStore

STATUSES = ("open", "acted", "dropped", "refused", "skipped")
HEAL_ACTOR = "heal"

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS feedback (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        request_id TEXT UNIQUE,            -- the response reported on; NULL for a trusted id-less report
        reporter TEXT NOT NULL,            -- the user of that request, or 'trusted:<name>'
        trusted INTEGER NOT NULL,
        verdict TEXT NOT NULL CHECK (verdict IN ('wrong', 'right')),
        prompt TEXT NOT NULL,
        answer TEXT,                       -- what the server answered (NULL for an id-less report)
        correction TEXT,
        subject TEXT,
        arm TEXT, digest TEXT, patches TEXT NOT NULL DEFAULT '[]',
        status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open','acted','dropped','refused','skipped')),
        patch_id TEXT, note TEXT, updated_at TEXT)""",
    "CREATE INDEX IF NOT EXISTS feedback_status ON feedback (status)",
    """CREATE TABLE IF NOT EXISTS probe_results (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL, run TEXT NOT NULL,
        prompt TEXT NOT NULL, expected TEXT NOT NULL,
        arm TEXT NOT NULL, patches TEXT NOT NULL,
        passed INTEGER NOT NULL, answer TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS probe_results_prompt ON probe_results (prompt, n)",
]


@dataclass
class Report:
    id: int
    at: str
    request_id: str | None
    reporter: str
    trusted: bool
    verdict: str
    prompt: str
    answer: str | None
    correction: str | None
    subject: str | None
    arm: str | None
    digest: str | None
    patches: list[str]
    status: str
    patch_id: str | None
    note: str | None

    @classmethod
    def from_row(cls, r: sqlite3.Row) -> "Report":
        d = {k: r[k] for k in r.keys() if k != "updated_at"}
        return cls(**dict(d, trusted=bool(d["trusted"]), patches=json.loads(d["patches"] or "[]")))


@dataclass
class ProbeResult:
    at: str
    run: str
    prompt: str
    expected: str
    arm: str
    patches: list[str]
    passed: bool
    answer: str


class FeedbackLog:
    """The feedback and probe tables of one registry database. Thread-safe (one lock)."""

    def __init__(self, registry: str | Path) -> None:
        self.path = Path(registry)
        if not self.path.is_file():
            raise RankoneError(f"no registry at {self.path}; `rankone registry add` creates one")
        try:
            self.db = sqlite3.connect(str(self.path), timeout=120, isolation_level=None, check_same_thread=False)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA busy_timeout = 120000")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = FULL")
            for stmt in _SCHEMA:
                self.db.execute(stmt)
        except sqlite3.DatabaseError as e:
            raise RankoneError(f"{self.path} is not a usable registry database ({e})") from None
        self._lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "FeedbackLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- feedback ------------------------------------------------------------------------------

    def add(self, *, reporter: str, trusted: bool, verdict: str, prompt: str, correction: str | None,
            subject: str | None = None, request_id: str | None = None, answer: str | None = None,
            arm: str | None = None, digest: str | None = None, patches: Iterable[str] = ()) -> int:
        """Store one report; its id. A second report on the same response is refused (RankoneError)."""
        with self._lock:
            try:
                cur = self.db.execute(
                    "INSERT INTO feedback (at, request_id, reporter, trusted, verdict, prompt, answer, correction, subject, "
                    "arm, digest, patches) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (utcnow(), request_id, reporter, int(trusted), verdict, prompt, answer, correction, subject, arm, digest,
                     json.dumps(list(patches))))
            except sqlite3.IntegrityError:
                raise RankoneError(f"response {request_id} already has a report; one report per response") from None
            return int(cur.lastrowid)

    def reports(self, statuses: Iterable[str] | None = ("open",), verdict: str | None = "wrong") -> list[Report]:
        q, args = "SELECT * FROM feedback WHERE 1=1", []
        if statuses is not None:
            st = list(statuses)
            q += f" AND status IN ({','.join('?' * len(st))})"
            args += st
        if verdict is not None:
            q += " AND verdict = ?"
            args.append(verdict)
        with self._lock:
            return [Report.from_row(r) for r in self.db.execute(q + " ORDER BY id", args)]

    def get(self, ids: Iterable[int]) -> list[Report]:
        ids = list(ids)
        if not ids:
            return []
        with self._lock:
            rows = self.db.execute(f"SELECT * FROM feedback WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids)
            return [Report.from_row(r) for r in rows]

    def set_status(self, ids: Iterable[int], status: str, patch_id: str | None = None, note: str | None = None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown feedback status {status!r}")
        ids = list(ids)
        if not ids:
            return
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany("UPDATE feedback SET status = ?, patch_id = ?, note = ?, updated_at = ? WHERE id = ?",
                                    [(status, patch_id, note, utcnow(), i) for i in ids])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def open_by_fact(self, limit: int = 50) -> list[dict[str, Any]]:
        """Open `wrong` reports grouped by prompt and correction, with their distinct reporters."""
        with self._lock:
            rows = self.db.execute(
                "SELECT prompt, correction, COUNT(*) AS reports, COUNT(DISTINCT reporter) AS users, "
                "MAX(trusted) AS trusted, MIN(at) AS first_at, MAX(at) AS last_at FROM feedback "
                "WHERE status = 'open' AND verdict = 'wrong' GROUP BY prompt, correction "
                "ORDER BY users DESC, last_at DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r, trusted=bool(r["trusted"])) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {r[0]: r[1] for r in self.db.execute("SELECT status, COUNT(*) FROM feedback GROUP BY status")}

    # ---- probes --------------------------------------------------------------------------------

    def record_probes(self, run: str, results: Iterable[ProbeResult]) -> None:
        rows = [(r.at, run, r.prompt, r.expected, r.arm, json.dumps(r.patches), int(r.passed), r.answer) for r in results]
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany("INSERT INTO probe_results (at, run, prompt, expected, arm, patches, passed, answer) "
                                    "VALUES (?,?,?,?,?,?,?,?)", rows)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def last_probe_results(self, arm: str = "stable") -> dict[str, ProbeResult]:
        """The latest result of each probe prompt on an arm."""
        with self._lock:
            rows = self.db.execute(
                "SELECT * FROM probe_results WHERE n IN (SELECT MAX(n) FROM probe_results WHERE arm = ? GROUP BY prompt)",
                (arm,)).fetchall()
        return {r["prompt"]: ProbeResult(r["at"], r["run"], r["prompt"], r["expected"], r["arm"], json.loads(r["patches"]),
                                         bool(r["passed"]), r["answer"]) for r in rows}

    def probe_history(self, prompt: str, limit: int = 20) -> list[ProbeResult]:
        with self._lock:
            rows = self.db.execute("SELECT * FROM probe_results WHERE prompt = ? ORDER BY n DESC LIMIT ?",
                                   (prompt, limit)).fetchall()
        return [ProbeResult(r["at"], r["run"], r["prompt"], r["expected"], r["arm"], json.loads(r["patches"]),
                            bool(r["passed"]), r["answer"]) for r in reversed(rows)]

    # ---- the heal view (the dashboard's) -------------------------------------------------------

    def heal_view(self, n_refusals: int = 20) -> dict[str, Any]:
        """Open reports by fact, heal's patches with their states, its latest refusals and decisions."""
        with self._lock:
            patches = [dict(r, summary=json.loads(r["summary"])) for r in self.db.execute(
                "SELECT id, state, n_edits, summary, added_at, reason FROM patches WHERE added_by = ? "
                "ORDER BY added_at DESC LIMIT 20", (HEAL_ACTOR,))]
            events = [dict(r, details=json.loads(r["details"])) for r in self.db.execute(
                "SELECT seq, at, action, patch_id, reason, details FROM audit WHERE actor = ? AND action LIKE 'heal-%' "
                "ORDER BY seq DESC LIMIT ?", (HEAL_ACTOR, 4 * n_refusals))]
        refusals = [e for e in events if e["action"] in ("heal-refuse", "heal-skip", "heal-drop")][:n_refusals]
        decisions = [e for e in events if e["action"] == "heal-decide"][:n_refusals]
        return {"open": self.open_by_fact(), "counts": self.counts(),
                "patches": [{"id": p["id"], "state": p["state"], "n_edits": p["n_edits"], "added_at": p["added_at"],
                             "reason": p["reason"], "facts": [f"{s['prompt'].replace('{}', s['subject'])} -> {s['target']}"
                                                              for s in p["summary"]]} for p in patches],
                "refusals": [{"seq": e["seq"], "at": e["at"], "action": e["action"], "reason": e["reason"]} for e in refusals],
                "decisions": [{"seq": e["seq"], "at": e["at"], "patch_id": e["patch_id"], "reason": e["reason"],
                               "decision": e["details"].get("decision")} for e in decisions]}


def record_event(reg: RegistryStore, action: str, patch_id: str | None, reason: str, details: dict[str, Any],
                 actor: str = HEAL_ACTOR) -> int:
    """Append a decision that changes no patch's state (a refusal, a rollout step's decision) to the
    audit log, in the hash chain like every transition; its sequence number."""
    with reg._tx() as db:  # noqa: SLF001 - the audit chain is this package's own
        reg._audit(db, actor, action, patch_id, None, None, reason, details)  # noqa: SLF001
        return int(db.execute("SELECT MAX(seq) FROM audit").fetchone()[0])


def heal_events(reg: RegistryStore, patch_id: str | None = None, action: str | None = None) -> list[Any]:
    """Heal's audit entries (oldest first), optionally of one patch and one action."""
    q, args = "SELECT * FROM audit WHERE action LIKE 'heal-%'", []
    if patch_id is not None:
        q += " AND patch_id = ?"
        args.append(patch_id)
    if action is not None:
        q += " AND action = ?"
        args.append(action)
    return [AuditEntry(**dict(r, details=json.loads(r["details"]))) for r in reg.db.execute(q + " ORDER BY seq", args)]
