"""Shared by every benchmark: write one named section of BENCHMARKS.md, with the command that made it.

Each script owns the text between `<!-- NAME:begin -->` and `<!-- NAME:end -->`; other sections
are left as they are, so benchmarks can be re-run one at a time.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery figure below was produced by the command shown with it, on the machine described.\n"


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}")


def shown(path: str | os.PathLike, root: Path = ROOT, home: Path | None = None) -> str:
    """A path as BENCHMARKS.md writes it, the same on every machine: relative to the repository
    when inside it, `../NAME/...` inside a folder beside it (e.g. `../shared/data`), `~/...` inside
    the home directory; the deepest of these folders wins (home over the folder beside the
    repository when they are one). A relative path is read from the current directory; a path
    under none of them is left as it is."""
    home = Path.home() if home is None else home
    text = os.fspath(path)
    p = Path(os.path.abspath(home / text[2:] if text.startswith("~/") else text))
    anchors = [(root, ""), (home, "~/"), (root.parent, "../")]
    if root.parent == Path(root.anchor):  # a repository at the top of the file system has no folder beside it
        anchors.pop()
    found = [(len(a.parts), -i, a, pre) for i, (a, pre) in enumerate(anchors) if p == a or a in p.parents]
    if not found:
        return text
    _, _, a, pre = max(found)
    rest = p.relative_to(a).as_posix()
    if rest == ".":
        return "." if pre == "" else pre.rstrip("/")
    return pre + rest


def _looks_like_path(arg: str) -> bool:
    """An argument to show with `shown`: absolute, from home, or relative to a current directory
    other than the repository's and naming something there (not a model name or a JSON value)."""
    if arg.startswith(("/", "~")):
        return True
    return Path.cwd() != ROOT and bool(arg) and not arg.startswith("-") and Path(arg).exists()


def _quote(arg: str) -> str:
    """shlex.quote, keeping a leading `~/` outside the quotes so the shell still expands it."""
    return "~/" + shlex.quote(arg[2:]) if arg.startswith("~/") else shlex.quote(arg)


def command(drop: tuple[str, ...] = ("--report-only", "--note"), argv: list[str] | None = None) -> str:
    """The command line that produced the figures, with paths as `shown` writes them: options
    that only redraw a section (`--report-only`, `--note TEXT`) are left out."""
    argv = sys.argv if argv is None else argv
    args, out, i = argv[1:], [], 0
    while i < len(args):
        a = args[i]
        if a in drop:
            i += 1 if a == "--report-only" else 2
            continue
        opt, eq, value = a.partition("=")
        if opt in drop:
            i += 1
            continue
        if a.startswith("--") and eq and _looks_like_path(value):
            out += [opt, shown(value)]  # `--opt ~/x`: the shell expands no `~` after `=`
        else:
            out.append(shown(a) if _looks_like_path(a) else a)
        i += 1
    line = "python " + " ".join(_quote(a) for a in [shown(argv[0])] + out)
    return relative_paths(line)  # and paths inside a quoted option value, e.g. --extra '--ppl-text /x/y'


def relative_paths(text: str, root: Path = ROOT, home: Path | None = None) -> str:
    """Prose with every absolute path under the repository, a folder beside it or the home
    directory written as `shown` writes it."""
    home = Path.home() if home is None else home
    folders = sorted({root, home, root.parent} - {Path(root.anchor)}, key=lambda a: -len(a.parts))
    pat = re.compile(r"(?<![\w./~-])(" + "|".join(re.escape(str(a)) for a in folders) + r")(?=/|\b)(/[^\s`'\"),;]*)?")
    return pat.sub(lambda m: shown(m.group(0), root, home), text)


def write_section(name: str, title: str, body: str) -> None:
    text = BENCH.read_text() if BENCH.exists() else HEADER
    block = (f"<!-- {name}:begin -->\n## {relative_paths(title)}\n\nCommand: `{command()}`  \nMachine: {machine()}\n\n"
             f"{relative_paths(body.strip())}\n<!-- {name}:end -->")
    pat = re.compile(rf"<!-- {re.escape(name)}:begin -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = BENCH.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, BENCH)


def publish(name: str, title: str, body: str, write: bool = True) -> None:
    """Print a benchmark's section and (unless write is False, e.g. --no-write) put it in BENCHMARKS.md."""
    print(body)
    if write:
        write_section(name, title, body)


def table(header: list[str], rows: list[list[object]]) -> str:
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
