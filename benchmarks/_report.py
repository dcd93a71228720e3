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


def command(drop: tuple[str, ...] = ("--report-only", "--note")) -> str:
    """The command line that produced the figures: options that only redraw a section
    (`--report-only`, `--note TEXT`) are left out."""
    args, out, i = sys.argv[1:], [], 0
    while i < len(args):
        a = args[i]
        if a in drop:
            i += 1 if a == "--report-only" else 2
            continue
        if a.split("=", 1)[0] in drop:
            i += 1
            continue
        out.append(a)
        i += 1
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + out)


def write_section(name: str, title: str, body: str) -> None:
    text = BENCH.read_text() if BENCH.exists() else HEADER
    block = (f"<!-- {name}:begin -->\n## {title}\n\nCommand: `{command()}`  \nMachine: {machine()}\n\n"
             f"{body.strip()}\n<!-- {name}:end -->")
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
