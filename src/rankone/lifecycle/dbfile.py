"""The registry's SQLite file as untrusted ground: another process holding its lock, a file that is
some other program's database, and a registry that a failed first command created.

A command that finds the write lock taken waits QUICK_WAIT_MS in silence (the usual case: another
`add` finishing), then says on stderr that another process holds it and waits up to LOCK_WAIT_S,
then gives up with one line; it never waits minutes without a word.
"""

from __future__ import annotations

import functools
import shutil
import sqlite3
from pathlib import Path
from typing import Any, Callable, Sequence

from rankone.core.errors import RankoneError

LOCK_WAIT_S = 120.0  # how long a command waits for another process's write lock, in all
QUICK_WAIT_MS = 2000  # how long it waits before saying so


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), timeout=QUICK_WAIT_MS / 1000, isolation_level=None)
    db.execute(f"PRAGMA busy_timeout = {QUICK_WAIT_MS}")
    return db


def _is_lock(e: sqlite3.OperationalError) -> bool:
    return "locked" in str(e) or "busy" in str(e)


def waiting_for_lock(db: sqlite3.Connection, path: Path, step: Callable[[], Any]) -> Any:
    """step() (a statement that needs the database lock), waiting for another process as above."""
    locked = RankoneError(f"registry {path} is locked by another process (waited "
                          f"{max(LOCK_WAIT_S, QUICK_WAIT_MS / 1000):.0f} s); try again when it has finished")
    try:
        return step()
    except sqlite3.OperationalError as e:
        if not _is_lock(e):
            raise
        if LOCK_WAIT_S * 1000 <= QUICK_WAIT_MS:
            raise locked from None
    from rankone.core.progress import status

    status(f"registry {path} is locked by another process; waiting up to {LOCK_WAIT_S:.0f} s for it")
    db.execute(f"PRAGMA busy_timeout = {int(LOCK_WAIT_S * 1000)}")
    try:
        return step()
    except sqlite3.OperationalError as e:
        if not _is_lock(e):
            raise
        raise locked from None
    finally:
        db.execute(f"PRAGMA busy_timeout = {QUICK_WAIT_MS}")


@functools.lru_cache(maxsize=4)
def _columns_of(schema: tuple[str, ...]) -> dict[str, list[str]]:
    """Each table the schema statements create, and its columns, as SQLite itself reads them."""
    mem = sqlite3.connect(":memory:")
    try:
        for stmt in schema:
            mem.execute(stmt)
        tables = [r[0] for r in mem.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
        return {t: [r[1] for r in mem.execute(f"PRAGMA table_info({t})")] for t in tables}
    finally:
        mem.close()


def check_columns(db: sqlite3.Connection, path: Path, schema: Sequence[str]) -> None:
    """Refuse a database whose tables of our names lack our columns (another program's file), before
    anything is written to it; tables it does not have yet are the schema's to create."""
    for table, columns in _columns_of(tuple(schema)).items():
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if have and (missing := [c for c in columns if c not in have]):
            raise RankoneError(f"{path} is not a rankone registry: its table {table} lacks column(s) {missing}; "
                               "give another --registry")


def remove_created(db_path: Path | None, store: Path | None) -> None:
    """Remove a database file (with its journal files) and a store folder that hold nothing yet."""
    if db_path is not None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    if store is not None and store.is_dir() and not any(not p.name.startswith(".") for p in store.iterdir()):
        shutil.rmtree(store, ignore_errors=True)
