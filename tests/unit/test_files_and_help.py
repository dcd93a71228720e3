"""Install and files: outputs honour the umask, a killed run's temporary folder is removed by the
next run (a running one's is not), every option of every command has help, `--version` exists."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rankone.cli.main import build_parser, main
from rankone.core.atomic import atomic_dir, sweep_stale, write_json


def _options(parser: argparse.ArgumentParser, path: list[str]):
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            helps = {c.dest: c.help for c in a._choices_actions}
            for name, sub in a.choices.items():
                yield path + [name], "(the command itself)", helps.get(name)
                yield from _options(sub, path + [name])
        elif not isinstance(a, argparse._HelpAction):
            yield path, "/".join(a.option_strings) or a.dest, a.help


def test_every_option_of_every_command_has_help():
    rows = list(_options(build_parser(), ["rankone"]))
    assert len(rows) > 150  # the walk reaches every sub-command
    missing = [f"{' '.join(p)} {o}" for p, o, h in rows if not (h and h.strip())]
    assert missing == []
    hp = next(h for p, o, h in rows if p == ["rankone", "edit"] and o == "--hparams")
    assert "v_steps (whole number, default 20)" in hp and "rankone.methods" not in hp  # fields, not a class name


def test_version(capsys):
    from rankone import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"rankone {__version__}"


def test_outputs_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "out") as d:
            write_json(d / "a.json", {"x": 1})
            (d / "sub").mkdir()
        write_json(tmp_path / "f.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o640


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    # a real run killed while it writes: its temporary folder stays behind
    code = ("import sys, time; sys.path.insert(0, sys.argv[2]); from rankone.core.atomic import atomic_dir\n"
            "with atomic_dir(sys.argv[1]) as d:\n"
            "    (d / 'big.bin').write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)\n")
    src = str(Path(__file__).resolve().parents[2] / "src")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "OUT"), src], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    live = [p.name for p in tmp_path.iterdir()]
    assert len(live) == 1 and live[0].startswith(f".OUT.{proc.pid}.") and live[0].endswith(".tmp")
    assert sweep_stale(tmp_path, "OUT") == []  # a running writer's folder is never touched
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    legacy = tmp_path / ".OUT.abc123.tmp"  # an older rankone's name, without a process id, two hours old
    legacy.mkdir()
    os.utime(legacy, (time.time() - 7200,) * 2)
    other = tmp_path / ".OUTPUT.99999999.abc.tmp"  # another output's: not ours to remove
    other.mkdir()
    with atomic_dir(tmp_path / "OUT") as d:  # the next run
        write_json(d / "ok.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".OUTPUT.99999999.abc.tmp", "OUT"]
