"""The registry's rows: its schema (and the migration of older files), the states and the one
table of which state each action starts from, and the records read back from it.
`rankone.lifecycle.store` opens the database and the store on top of this.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from rankone.core.errors import RankoneError

# 2: the states staged and aborted, and the staging table; 3: the state compacted and the compactions
# table (an older file is migrated on open)
SCHEMA_VERSION = 3
STATES = ("proposed", "validated", "staged", "released", "rejected", "rolled_back", "aborted", "compacted")

# Which state an action may start from, and what to do instead: the one table every transition
# (and the CLI, before it loads a model) consults through `RegistryStore.require`.
TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "validate": (("proposed", "validated"), "only proposed or validated patches are validated"),
    "release": (("validated",), "only a validated patch is released"),
    "stage": (("validated", "staged"), "only a validated patch can be staged"),
    "promote": (("staged",), "only a staged patch is promoted (`rankone registry stage` first)"),
    "abort": (("staged",), "only a staged patch can be aborted"),
    "rollback": (("released",), "only released patches can be rolled back"),
    "reject": (("proposed", "validated"), "only proposed or validated patches can be rejected"),
    # a compaction C replaces the whole release: validated C → released, each replaced patch
    # released → compacted; rolling C back restores them (compacted → released)
    "compact": (("validated",), "only a validated compaction can replace the release"),
    "compacted": (("released",), "only a released patch is replaced by a compaction"),
    "restore": (("compacted",), "only a compacted patch is released again, when its compaction is rolled back"),
}

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS patches (
        id TEXT PRIMARY KEY,
        state TEXT NOT NULL CHECK (state IN (""" + ",".join(f"'{s}'" for s in STATES) + """)),
        n_edits INTEGER NOT NULL,
        summary TEXT NOT NULL,            -- JSON: [{module, subject, prompt, target}]
        base TEXT NOT NULL,               -- JSON: the patch's base description
        added_at TEXT NOT NULL, added_by TEXT NOT NULL, reason TEXT,
        release_seq INTEGER UNIQUE,       -- position in the release order (NULL until released)
        released_at TEXT)""",
    """CREATE TABLE IF NOT EXISTS validations (
        n INTEGER PRIMARY KEY AUTOINCREMENT,
        patch_id TEXT NOT NULL REFERENCES patches(id),
        at TEXT NOT NULL, actor TEXT NOT NULL, passed INTEGER NOT NULL,
        report TEXT NOT NULL)             -- JSON GateReport""",
    """CREATE TABLE IF NOT EXISTS depends (
        patch_id TEXT NOT NULL REFERENCES patches(id), on_id TEXT NOT NULL REFERENCES patches(id),
        PRIMARY KEY (patch_id, on_id))""",
    """CREATE TABLE IF NOT EXISTS staging (
        patch_id TEXT PRIMARY KEY REFERENCES patches(id),
        canary REAL NOT NULL CHECK (canary >= 0 AND canary <= 100),   -- % of users who get the candidate
        shadow REAL NOT NULL CHECK (shadow >= 0 AND shadow <= 100),   -- % of stable requests re-run on it
        staged_seq INTEGER NOT NULL UNIQUE,  -- the order in which staged patches join the candidate
        staged_at TEXT NOT NULL, staged_by TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS compactions (
        patch_id TEXT PRIMARY KEY REFERENCES patches(id),   -- a released patch replaced by a compaction
        into_id TEXT NOT NULL REFERENCES patches(id))      -- the compacted patch released in its place""",
    "CREATE TABLE IF NOT EXISTS base (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS base_modules (module TEXT PRIMARY KEY, sha256 TEXT NOT NULL, source TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS audit (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, patch_id TEXT,
        from_state TEXT, to_state TEXT, reason TEXT, details TEXT NOT NULL,
        prev_hash TEXT NOT NULL, hash TEXT NOT NULL)""",
] + [
    f"CREATE TRIGGER IF NOT EXISTS {table}_no_{op.lower()} BEFORE {op} ON {table} "
    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
    for table in ("audit", "validations") for op in ("UPDATE", "DELETE")
]


def _migrate(db: sqlite3.Connection) -> None:
    """Version 1 or 2 → 3: `patches` gains the states staged and aborted (2) and compacted (3).
    SQLite cannot change a CHECK constraint in place, so the table is copied into a new one
    (foreign keys off, in the caller's transaction), as SQLite's ALTER TABLE documentation prescribes."""
    ddl = next(stmt for stmt in _SCHEMA if "IF NOT EXISTS patches (" in stmt)
    db.execute(ddl.replace("IF NOT EXISTS patches (", "patches_v2 ("))
    db.execute("INSERT INTO patches_v2 SELECT * FROM patches")
    db.execute("DROP TABLE patches")
    db.execute("ALTER TABLE patches_v2 RENAME TO patches")
    if db.execute("PRAGMA foreign_key_check").fetchone() is not None:
        raise RankoneError("the registry's rows do not reference each other consistently; it was not migrated "
                           "(run `rankone registry check` with the rankone that wrote it)")
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))



# ---- records --------------------------------------------------------------------------------


@dataclass
class PatchRecord:
    id: str
    state: str
    n_edits: int
    summary: list[dict[str, Any]]
    base: dict[str, Any]
    added_at: str
    added_by: str
    reason: str | None
    release_seq: int | None
    released_at: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "PatchRecord":
        d = dict(row)
        d["summary"], d["base"] = json.loads(d["summary"]), json.loads(d["base"])
        return cls(**d)


@dataclass
class StagedRecord:
    """A staged patch and its rollout: the share of users on the candidate, the share of stable
    requests re-run on it, and its place in the candidate (patches join in `staged_seq` order)."""
    id: str
    canary: float
    shadow: float
    staged_seq: int
    staged_at: str
    staged_by: str
    summary: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class AuditEntry:
    seq: int
    at: str
    actor: str
    action: str
    patch_id: str | None
    from_state: str | None
    to_state: str | None
    reason: str | None
    details: dict[str, Any]
    prev_hash: str
    hash: str


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)  # inconsistencies: rows without files, bad hashes
    orphans: list[str] = field(default_factory=list)  # store folders without a row (crash leftovers)
    pruned: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _entry_hash(prev: str, e: dict[str, Any]) -> str:
    body = json.dumps({k: e[k] for k in ("at", "actor", "action", "patch_id", "from_state", "to_state", "reason", "details")},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((prev + "\n" + body).encode()).hexdigest()
