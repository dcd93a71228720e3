"""The registry's storage: a SQLite database and a content-addressed store beside it.

    registry.db          patches, validation reports, release order, staging, base identity, audit log
    registry.store/<id>/ patch.json + patch.safetensors, byte-for-byte as added

Path: `--registry`, else $RANKONE_REGISTRY, else $XDG_DATA_HOME/rankone/registry.db
(~/.local/share/rankone/registry.db).

Crash safety: the store is written first (a temporary folder renamed into place), the database
row after, in one `BEGIN IMMEDIATE` transaction. A crash leaves at most an orphaned store folder
(tolerated; `check --prune` removes old ones), never a row without its files. WAL mode and a
busy timeout let several processes add, validate and release at once without losing anything; a
registry held by another process for more than a moment says so on stderr, waits up to
dbfile.LOCK_WAIT_S, then gives up with one line. A registry that `add` creates and then cannot fill (a full
disk) is removed again: a failed command leaves no empty database or store behind.

The schema, the states, the table of which state each action starts from (TRANSITIONS) and the
records are `records`; the state machine on top of it (add, validate, release, roll back, reject,
stage, compact) is `registry.Registry`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from rankone.core.atomic import honour_umask_tree
from rankone.core.errors import RankoneError
from rankone.core.util import utcnow
from rankone.lifecycle.dbfile import check_columns, connect, remove_created, waiting_for_lock
from rankone.artifacts.patch import Patch
from rankone.artifacts.patch_files import content_id_of, read_files
from rankone.lifecycle.records import (
    _SCHEMA,
    SCHEMA_VERSION,
    TRANSITIONS,
    AuditEntry,
    PatchRecord,
    StagedRecord,
    _entry_hash,
    _migrate,
)

ID_LEN = 16
FILES = ("patch.json", "patch.safetensors")


def default_path() -> Path:
    if os.environ.get("RANKONE_REGISTRY"):
        return Path(os.environ["RANKONE_REGISTRY"])
    data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return data / "rankone" / "registry.db"


# Named points inside multi-step writes ("add:stored", "release:uncommitted", ...). Production code
# only announces them; a test that wants to crash or stall the process at one sets the hook.
_checkpoint_hook: Callable[[str], None] | None = None


def set_checkpoint_hook(hook: Callable[[str], None] | None) -> None:
    """Call `hook(name)` at every named checkpoint of the registry's writes (None: no hook)."""
    global _checkpoint_hook
    _checkpoint_hook = hook


def crash_point(name: str) -> None:
    """A named checkpoint: nothing happens unless a hook was set with `set_checkpoint_hook`."""
    if _checkpoint_hook is not None:
        _checkpoint_hook(name)


# ---- content ids ----------------------------------------------------------------------------


def content_id(patch_dir: str | os.PathLike) -> str:
    """sha256 over the canonical manifest (sorted keys) and every tensor (name, dtype, shape, bytes)."""
    man, tensors, _ = read_files(patch_dir)
    return content_id_of(man, tensors)[:ID_LEN]


def is_patch_dir(ref: str | os.PathLike) -> bool:
    return Path(ref).is_dir() and all((Path(ref) / f).is_file() for f in FILES)


# ---- the database and the store -------------------------------------------------------------


class RegistryStore:
    """One registry file and its store: opening, locking, the store, reading, the audit chain."""

    def __init__(self, path: str | os.PathLike | None = None, create: bool = True) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.store = self.path.with_name(self.path.name.rsplit(".", 1)[0] + ".store")
        if self.path.exists() and not self.path.is_file():
            raise RankoneError(f"registry {self.path} is not a file; give the path of a registry database")
        if not self.path.exists() and not create:
            raise RankoneError(f"no registry at {self.path}; `rankone registry add PATCH --reason ...` creates one "
                               "(choose the file with --registry or RANKONE_REGISTRY)")
        self.created = not self.path.exists()  # made by this object: removed again if it stays empty (discard_if_new)
        self._store_created = not self.store.exists()
        self.db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.store.mkdir(parents=True, exist_ok=True)
            self.db = connect(self.path)
            self.db.row_factory = sqlite3.Row
            self._waiting(lambda: check_columns(self.db, self.path, _SCHEMA))  # another program's file stays as it is
            self._waiting(lambda: self.db.execute("PRAGMA journal_mode = WAL"))
            self.db.execute("PRAGMA synchronous = FULL")
            self.db.execute("PRAGMA foreign_keys = OFF")  # a migration rebuilds `patches` (SQLite's documented way)
            with self._tx() as db:  # the schema is made under the write lock: two first users agree
                for stmt in _SCHEMA:
                    db.execute(stmt)
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif int(row[0]) in (1, 2):
                    _migrate(db)
                elif int(row[0]) != SCHEMA_VERSION:
                    raise RankoneError(f"registry {self.path} has schema {row[0]}; this rankone reads {SCHEMA_VERSION}")
            self.db.execute("PRAGMA foreign_keys = ON")
        except BaseException as e:
            self._remove_if_created()
            if isinstance(e, sqlite3.OperationalError) and ("full" in str(e) or "I/O" in str(e)):
                raise RankoneError(f"cannot write the registry {self.path} ({e}); free some space and retry") from None
            if isinstance(e, sqlite3.DatabaseError):
                raise RankoneError(f"{self.path} is not a usable registry database ({e})") from None
            raise

    def _waiting(self, step: Callable[[], Any]) -> Any:
        return waiting_for_lock(self.db, self.path, step)

    def _remove_if_created(self) -> None:
        """Take away what this object created: the database (and its journal files), the store."""
        if self.db is not None:
            self.db.close()
        remove_created(self.path if self.created else None, self.store if self._store_created else None)

    def discard_if_new(self) -> None:
        """After a failed first command: remove the registry if this object created it and nothing
        was recorded in it (the caller's error is then all that remains)."""
        if not self.created:
            return
        try:
            empty = self.db.execute("SELECT (SELECT COUNT(*) FROM patches) + (SELECT COUNT(*) FROM audit)").fetchone()[0] == 0
        except sqlite3.Error:
            empty = True
        if empty:
            self._remove_if_created()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "RegistryStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """BEGIN IMMEDIATE takes the write lock up front: read-check-write cannot interleave."""
        self._waiting(lambda: self.db.execute("BEGIN IMMEDIATE"))
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as e:
            if self.db.in_transaction:  # a failed COMMIT (a full disk) may have ended it already
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(e, sqlite3.OperationalError) and ("full" in str(e) or "I/O" in str(e)):
                raise RankoneError(f"cannot write the registry {self.path} ({e}); nothing was recorded: free some "
                                   "space and retry") from None
            raise

    # -- store --

    def patch_dir(self, pid: str) -> Path:
        return self.store / pid

    def load_patch(self, pid: str) -> Patch:
        d = self.patch_dir(pid)
        if not is_patch_dir(d):
            raise RankoneError(f"registry {self.path} lists patch {pid} but its files are missing from {self.store}; "
                               "run `rankone registry check`")
        return Patch.load(d)

    def _store_put(self, src: Path, pid: str) -> None:
        """Copy the patch files to store/<pid> by one rename; an existing good copy is kept."""
        target = self.patch_dir(pid)
        if is_patch_dir(target) and _safe_id(target) == pid:
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{pid}.", suffix=".tmp", dir=self.store))
        try:
            for f in FILES:
                with open(src / f, "rb") as fi, open(tmp / f, "wb") as fo:
                    shutil.copyfileobj(fi, fo)
                    fo.flush()
                    os.fsync(fo.fileno())
            if _safe_id(tmp) != pid:
                raise RankoneError(f"patch {src} changed while it was being added; add it again")
            honour_umask_tree(tmp)  # mkdtemp makes it 0700; the store is as shareable as the umask says
            if target.exists():  # a damaged copy (never made by us: the rename is atomic)
                shutil.rmtree(target)
            try:
                os.rename(tmp, target)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # another process placed the same content first: same id, same bytes' meaning
            _fsync_dir(self.store)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # -- reading --

    def resolve(self, ref: str) -> str:
        """A full id from an id prefix (4+ characters) or a patch folder."""
        if is_patch_dir(ref):
            pid = content_id(ref)
            if self.db.execute("SELECT 1 FROM patches WHERE id = ?", (pid,)).fetchone() is None:
                raise RankoneError(f"patch {ref} (id {pid}) is not in the registry; add it with `rankone registry add`")
            return pid
        if len(ref) < 4 or any(c not in "0123456789abcdef" for c in ref.lower()):
            raise RankoneError(f"{ref!r} is neither a patch id (4+ hex characters) nor a patch folder")
        rows = self.db.execute("SELECT id FROM patches WHERE id LIKE ?", (ref.lower() + "%",)).fetchall()
        if not rows:
            raise RankoneError(f"no patch {ref!r} in registry {self.path}; see `rankone registry list`")
        if len(rows) > 1:
            raise RankoneError(f"patch id {ref!r} is ambiguous ({', '.join(r[0] for r in rows)}); give more characters")
        return rows[0][0]

    def get(self, ref: str) -> PatchRecord:
        pid = self.resolve(ref)
        return PatchRecord.from_row(self.db.execute("SELECT * FROM patches WHERE id = ?", (pid,)).fetchone())

    def list(self, state: str | None = None) -> list[PatchRecord]:
        q = "SELECT * FROM patches" + (" WHERE state = ?" if state else "") + " ORDER BY added_at, id"
        return [PatchRecord.from_row(r) for r in self.db.execute(q, (state,) if state else ())]

    def released(self) -> list[PatchRecord]:
        """Released patches in release order."""
        rows = self.db.execute("SELECT * FROM patches WHERE state = 'released' ORDER BY release_seq")
        return [PatchRecord.from_row(r) for r in rows]

    def staged(self) -> list[StagedRecord]:
        """Staged patches in the order they joined the candidate."""
        rows = self.db.execute("SELECT s.*, p.summary FROM staging s JOIN patches p ON p.id = s.patch_id "
                               "WHERE p.state = 'staged' ORDER BY s.staged_seq")
        return [StagedRecord(r["patch_id"], r["canary"], r["shadow"], r["staged_seq"], r["staged_at"], r["staged_by"],
                             json.loads(r["summary"])) for r in rows]

    def audit_head(self) -> int:
        """The sequence number of the latest audit entry (0 for none): every change of state moves it."""
        return int(self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM audit").fetchone()[0])

    def log_tail(self, n: int) -> list[AuditEntry]:
        """The latest `n` audit entries, oldest first."""
        rows = self.db.execute("SELECT * FROM audit ORDER BY seq DESC LIMIT ?", (n,)).fetchall()
        return [AuditEntry(**dict(r, details=json.loads(r["details"]))) for r in reversed(rows)]

    def validations(self, pid: str) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT * FROM validations WHERE patch_id = ? ORDER BY n", (pid,))
        return [dict(r, report=json.loads(r["report"])) for r in rows]

    def log(self, pid: str | None = None) -> list[AuditEntry]:
        q = "SELECT * FROM audit" + (" WHERE patch_id = ?" if pid else "") + " ORDER BY seq"
        return [AuditEntry(**dict(r, details=json.loads(r["details"]))) for r in self.db.execute(q, (pid,) if pid else ())]

    def base(self) -> dict[str, Any]:
        """The base model this registry releases onto: info and module fingerprints ({} until the first release)."""
        info = {r["key"]: json.loads(r["value"]) for r in self.db.execute("SELECT * FROM base")}
        if info:
            info["modules"] = {r["module"]: r["sha256"] for r in self.db.execute("SELECT * FROM base_modules")}
        return info

    def dependents(self, pid: str) -> list[str]:
        rows = self.db.execute("SELECT patch_id FROM depends WHERE on_id = ?", (pid,)).fetchall()
        return [r[0] for r in rows]

    # -- writing: the audit chain --

    def _audit(self, db: Any, actor: str, action: str, pid: str | None, from_state: str | None,
               to_state: str | None, reason: str | None, details: dict[str, Any] | None = None) -> None:
        row = db.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        prev = row[0] if row else ""
        e = {"at": utcnow(), "actor": actor, "action": action, "patch_id": pid, "from_state": from_state,
             "to_state": to_state, "reason": reason, "details": details or {}}
        db.execute("INSERT INTO audit (at, actor, action, patch_id, from_state, to_state, reason, details, prev_hash, hash) "
                   "VALUES (?,?,?,?,?,?,?,?,?,?)",
                   (e["at"], actor, action, pid, from_state, to_state, reason, json.dumps(e["details"], sort_keys=True),
                    prev, _entry_hash(prev, e)))

    def _state(self, db: Any, pid: str) -> str:
        return db.execute("SELECT state FROM patches WHERE id = ?", (pid,)).fetchone()[0]

    def require(self, action: str, pid: str, state: str | None = None) -> str:
        """The patch's state when `action` may start from it, else one line saying what to do."""
        state = state if state is not None else self._state(self.db, pid)
        allowed, rule = TRANSITIONS[action]
        if state not in allowed:
            hint = ""
            if state == "proposed" and action in ("release", "stage"):
                hint = "; validate it first with `rankone registry validate`"
            elif state == "staged" and action == "release":
                hint = "; promote it with `rankone registry promote`"
            elif state == "compacted":
                row = self.db.execute("SELECT into_id FROM compactions WHERE patch_id = ?", (pid,)).fetchone()
                hint = f"; it was compacted into {row[0]}: roll that back to release it again" if row else ""
            raise RankoneError(f"patch {pid} is {state}; {rule}{hint}")
        return state

    def require_passed(self, db: Any, pid: str, otherwise: str) -> None:
        """Refuse a patch whose latest validation failed (or that has none): `otherwise` says what to do."""
        last = db.execute("SELECT passed FROM validations WHERE patch_id = ? ORDER BY n DESC LIMIT 1", (pid,)).fetchone()
        if last is None or not last[0]:
            raise RankoneError(f"patch {pid} failed its latest validation; {otherwise}")


def _safe_id(d: Path) -> str | None:
    try:
        return content_id(d)
    except Exception:
        return None


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
