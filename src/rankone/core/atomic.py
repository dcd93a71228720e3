"""Atomic file and folder writes: a reader sees the old state or the new one, never half of it.

Temporary names carry the writer's process id (`.NAME.<pid>.<random>.tmp`), so that the next
write beside them removes what a killed run left behind (its process is gone) and never what a
running one is writing. Outputs get the permissions the user's umask gives (tempfile's 0600/0700
are widened to them before the rename).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from rankone.core.errors import RankoneError

log = logging.getLogger(__name__)
STALE_WITHOUT_PID_S = 3600  # temporary names without a process id (older rankone): removed after an hour


def umask() -> int:
    """The process umask, read without changing it where /proc allows (threads may be running)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _honour_umask(path: Path, is_dir: bool) -> None:
    os.chmod(path, (0o777 if is_dir else 0o666) & ~umask())


def honour_umask_tree(root: str | os.PathLike) -> None:
    """Every folder and file under `root` (written by libraries that create files 0600, such as
    safetensors, or folders 0700, such as tempfile) gets the permissions the umask gives."""
    mask = umask()
    for d, dirs, files in os.walk(root):
        os.chmod(d, 0o777 & ~mask)
        for f in files:
            if not os.path.islink(os.path.join(d, f)):
                os.chmod(os.path.join(d, f), 0o666 & ~mask)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def sweep_stale(parent: Path, name: str) -> list[str]:
    """Remove temporary files and folders for `name` in `parent` left by runs that were killed."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not (p.name.startswith(f".{name}.") and p.name.endswith((".tmp", ".old"))):
            continue
        middle = p.name[len(name) + 2:].rsplit(".", 1)[0].split(".")  # [pid, random] or [random] (older rankone)
        try:
            if len(middle) == 2 and middle[0].isdigit():
                stale = not _alive(int(middle[0]))
            elif len(middle) == 1:
                stale = time.time() - p.lstat().st_mtime > STALE_WITHOUT_PID_S
            else:
                continue  # another output's name that starts like this one's
        except OSError:
            continue
        if stale:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def _prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _honour_umask(Path(tmp), is_dir=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_cache(path: str | os.PathLike, data: bytes | Any, what: str) -> bool:
    """Keep a computed value (bytes, or a JSON-able object) in a cache file if the file system
    lets us: a cache that cannot be written (a full disk, a read-only cache folder) costs the next
    run the work again, so it is one warning and the work goes on. True when it was written."""
    try:
        if isinstance(data, bytes):
            write_bytes(path, data)
        else:
            write_json(path, data)
        return True
    except OSError as e:
        log.warning("could not keep the %s in the cache (%s: %s); going on without it (set RANKONE_CACHE to a "
                    "writable folder to keep it)", what, e.filename or path, e.strerror or e)
        return False


def _writable_ancestor(p: Path) -> None:
    """Refuse now, not after minutes of work, an output whose nearest existing folder cannot be written."""
    q = p.resolve().parent
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise RankoneError(f"cannot write {p}: {q} is not a folder; choose another --out")
    read_only = not os.access(q, os.W_OK | os.X_OK)
    if not read_only and os.geteuid() == 0:  # root may write anywhere; a folder without write bits says "don't"
        read_only = not q.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    if read_only:
        raise RankoneError(f"cannot write {p}: the folder {q} is read-only; choose another --out")


Inputs = Iterable[tuple[str, "str | os.PathLike | None"]]


def apart_from_inputs(p: Path, inputs: Inputs, file: bool = False) -> None:
    """Refuse an output that is, holds or sits inside one of the command's inputs (e.g. --model):
    replacing it would delete what is being read. Also the folder the user is in, which cannot be
    replaced by a rename. `inputs` are (what, path) pairs; paths that do not exist are skipped."""
    out = p.resolve()
    cwd = Path.cwd().resolve()
    if not file and (out == cwd or out in cwd.parents):
        raise RankoneError(f"--out {p} is the current folder or holds it; write to a new folder instead")
    for what, given in inputs:
        if given is None or not os.path.exists(given):
            continue
        q = Path(given).resolve()
        if out == q:
            raise RankoneError(f"--out {p} is {what} {given} itself: writing it would replace what is being read; "
                               "write to another folder")
        if out in q.parents:
            raise RankoneError(f"--out {p} holds {what} {given}: replacing it would delete it; write to another folder")
        if q in out.parents:
            raise RankoneError(f"--out {p} is inside {what} {given}: write outside it")


def check_out_dir(path: str | os.PathLike, overwrite: bool = False, inputs: Inputs = ()) -> Path:
    """Refuse (before any work) to clobber a folder the user did not ask us to replace, to write
    where we cannot, or to write over, inside or around an input (`inputs`: (what, path) pairs)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RankoneError(f"output {p} exists and is a file; choose another --out")
    apart_from_inputs(p, inputs)
    if p.exists() and any(p.iterdir()) and not overwrite:
        raise RankoneError(f"output folder {p} already exists and is not empty; choose another --out or pass --force")
    _writable_ancestor(p)
    return p


def check_out_file(path: str | os.PathLike, inputs: Inputs = ()) -> Path:
    """The same for one output file (e.g. eval's JSON): not a folder, not an input nor inside one,
    and its folder writable."""
    p = Path(path)
    if p.is_dir():
        raise RankoneError(f"output {p} is a folder; give a file path")
    apart_from_inputs(p, inputs, file=True)
    _writable_ancestor(p)
    return p


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename."""
    target = check_out_dir(path, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RankoneError(f"cannot create {target.parent}: {e.strerror or e}; choose another --out") from None
    sweep_stale(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target.name), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        honour_umask_tree(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(target.name), suffix=".old", dir=target.parent))
            try:
                os.replace(target, old / "x")
            except BaseException:
                shutil.rmtree(old, ignore_errors=True)
                raise
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / "x", target)  # the old folder back where it was
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                raise RankoneError(f"output folder {target} appeared while rankone was writing it; nothing replaced") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
