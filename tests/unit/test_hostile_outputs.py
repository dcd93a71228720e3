"""Issue 29 beyond the table: an audit log that its inputs cannot forge, outputs that never lose
data (refused overlaps, the written config checked, failed writes that leave nothing, caches that
only warn), and output permissions that follow the umask."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from rankone.cli.main import EscapingFormatter, main
from rankone.core.text import shown
from rankone.lifecycle import dbfile
from rankone.lifecycle.registry import Registry
from rankone.testbed import builtin_model_dir

M = builtin_model_dir()
ROOT = Path(__file__).resolve().parents[2]
FACT = ["--prompt", "{} was born in", "--subject", "Stoukthen Fokai Thathai", "--target", "Lisbon"]
QUICK = '{"v_steps": 1, "v_steps_max": 1, "stats_tokens": 5000}'


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    got = capsys.readouterr()
    return code, got.out, got.err


@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory):
    """A real r-ROME patch of the built-in model (made once for the module)."""
    d = tmp_path_factory.mktemp("outputs") / "p"
    assert main(["edit", "--model", str(M), *FACT, "--hparams", QUICK, "--quiet", "--out", str(d)]) == 0
    return d


# ---- the audit log --------------------------------------------------------------------------

FORGED = ("ticket 7\n2    2026-01-01 00:00:00  mallory  release  deadbeefdeadbeef  validated -> released  #1"
          "\x1b[2J\x07\u202e")
AUTHOR = "eve\x1b[31mRED\x1b[0m"


def test_a_forged_log_row_in_a_reason_stays_one_escaped_entry_and_the_chain_verifies(tmp_path, patch_dir, capsys):
    reg = tmp_path / "reg.db"
    code, out, err = run_cli(capsys, "registry", "add", patch_dir, "--reason", FORGED, "--author", AUTHOR, "--registry", reg)
    assert code == 0, err
    with Registry(reg) as r:  # stored exactly as given
        (entry,) = r.log()
        assert (entry.reason, entry.actor) == (FORGED, AUTHOR) and r.list()[0].reason == FORGED
    for argv in (["log"], ["list"], ["show", entry.patch_id]):
        code, out, err = run_cli(capsys, "registry", *argv, "--registry", reg)
        assert code == 0, err
        assert not any(c in out for c in "\x1b\x07\u202e"), argv  # nothing reaches the terminal raw
        if argv == ["log"]:
            rows = out.splitlines()
            assert len(rows) == 2 and rows[1].startswith("1 ") and "  add  " in rows[1]  # the header and ONE entry
        if argv != ["list"]:
            assert "ticket 7\\n2    2026-01-01" in out and "\\x1b[2J\\x07\\u202e" in out
        assert "eve\\x1b[31mRED\\x1b[0m" in out
    code, out, err = run_cli(capsys, "registry", "log", "--json", "--registry", reg)
    assert json.loads(out)[0]["reason"] == FORGED  # JSON carries the exact text (escaped by JSON itself)
    code, out, err = run_cli(capsys, "registry", "check", "--registry", reg)
    assert code == 0 and "registry is consistent" in out


def test_show_and_errors_escape_what_a_patch_or_argument_carries(tmp_path, capsys):
    d = tmp_path / "p"
    code, _, err = run_cli(capsys, "edit", "--model", M, *FACT, "--hparams", QUICK, "--quiet", "--author", AUTHOR,
                       "--reason", "line one\nline two\x1b]0;pwned\x07", "--out", d)
    assert code == 0, err
    code, out, err = run_cli(capsys, "show", d)
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "by eve\\x1b[31mRED\\x1b[0m: line one\\nline two\\x1b]0;pwned\\x07" in out
    code, out, err = run_cli(capsys, "registry", "show", "\x1b[2Jabcd", "--registry", tmp_path / "none.db")
    assert code == 2 and "\x1b" not in err and len(err.strip().splitlines()) == 1
    rec = logging.LogRecord("x", logging.WARNING, "", 0, "the edit %r says %s", ("a", "b\x1b[2J\nfake line"), None)
    assert EscapingFormatter("rankone: %(message)s").format(rec) == "rankone: the edit 'a' says b\\x1b[2J\\nfake line"
    assert shown("a\tb\u2028c\x9b") == "a\\tb\\u2028c\\x9b" and shown("Zürich → 東京") == "Zürich → 東京"
    assert shown("line\n\tnext\x1b[2J", lines=True) == "line\n\tnext\\x1b[2J"  # generated text keeps its lines


# ---- outputs that overlap their inputs --------------------------------------------------------

# (command, the argv around --model and --out) for every command that writes a model or patch folder
WRITERS = {
    "edit": lambda m, o, reg: ["edit", "--model", m, *FACT, "--out", o, "--force"],
    "apply": lambda m, o, reg: ["apply", "--model", m, "--patch", "{patch}", "--out", o, "--force"],
    "revert": lambda m, o, reg: ["revert", "--model", m, "--patch", "{patch}", "--out", o, "--force"],
    "export": lambda m, o, reg: ["export", "--model", m, "--patch", "{patch}", "--out", o, "--force"],
    "registry build": lambda m, o, reg: ["registry", "build", "--model", m, "--out", o, "--force", "--registry", reg],
}


@pytest.mark.parametrize("where", ["is", "inside", "holds"])
@pytest.mark.parametrize("command", list(WRITERS))
def test_no_output_command_writes_over_in_or_around_its_model(tmp_path, patch_dir, command, where, capsys):
    model = tmp_path / "outer" / "model"
    shutil.copytree(M, model)
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*"))
    out = {"is": model, "inside": model / "out", "holds": model.parent}[where]
    reg = tmp_path / "reg.db"
    Registry(reg).close()
    argv = [str(a).replace("{patch}", str(patch_dir)) for a in WRITERS[command](model, out, reg)]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert {"is": "is --model", "inside": "is inside --model", "holds": "holds --model"}[where] in err
    assert sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*")
                  if "reg." not in p.name) == before  # every file of the model is still there, unchanged


def test_apply_writes_every_weight_and_the_config_it_was_made_on(tmp_path, patch_dir, capsys):
    out = tmp_path / "merged"
    code, _, err = run_cli(capsys, "apply", "--model", M, "--patch", patch_dir, "--out", out)
    assert code == 0, err
    names = lambda d: {k for f in d.glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}  # noqa: E731
    assert names(out) == names(M)  # no tensor dropped
    assert json.loads((out / "config.json").read_text())["n_layer"] == json.loads((M / "config.json").read_text())["n_layer"]
    # a copy whose config differs from the patch's base (same weights): refused, unless told
    other = tmp_path / "relu"
    shutil.copytree(M, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(cfg, activation_function="relu")))
    code, _, err = run_cli(capsys, "apply", "--model", other, "--patch", patch_dir, "--out", tmp_path / "x")
    assert code == 2 and "activation_function" in err and not (tmp_path / "x").exists()
    code, _, err = run_cli(capsys, "apply", "--model", other, "--patch", patch_dir, "--out", tmp_path / "x", "--allow-config-change")
    assert code == 0 and json.loads((tmp_path / "x" / "config.json").read_text())["activation_function"] == "relu"


# ---- failed writes leave nothing; caches only warn -----------------------------------------

# Runs rankone commands in one child process, each under its own file-size limit (RLIMIT_FSIZE, with
# SIGXFSZ ignored so that a write past it fails with EFBIG, as on a full disk); prints one JSON line
# per command: exit code and stderr.
CHILD = r"""
import contextlib, io, json, logging, os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
import torch; torch.set_num_threads(1)
from rankone.cli.main import main
for limit, argv in json.loads(sys.argv[1]):
    logging.getLogger().handlers.clear()
    err = io.StringIO()
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # what the test must never see
            import traceback; traceback.print_exc(); code = -1
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    print(json.dumps({"code": code, "err": err.getvalue()}), flush=True)
"""


def _limits_work() -> bool:
    try:
        import resource
        import signal

        return hasattr(signal, "SIGXFSZ") and resource.getrlimit(resource.RLIMIT_FSIZE)[1] == resource.RLIM_INFINITY
    except (ImportError, ValueError, OSError):
        return False


@pytest.mark.skipif(not _limits_work(), reason="needs RLIMIT_FSIZE and SIGXFSZ (POSIX) with no hard file-size limit set")
def test_a_full_disk_leaves_nothing_behind_and_a_full_cache_only_warns(tmp_path, patch_dir):
    out = tmp_path / "outs"
    out.mkdir()
    merged, reg = tmp_path / "merged", tmp_path / "reg.db"
    assert main(["apply", "--model", str(M), "--patch", str(patch_dir), "--out", str(merged)]) == 0
    Registry(reg).close()
    weights = 1 << 20  # the built-in model's weights are 3.8 MB: a 1 MB limit fails their write
    jobs = {  # first, before anything in this process has the statistics in memory:
        # the statistics cache (2 MB) fails, the patch (about 250 kB) does not: a warning, and the patch
        "full cache": (weights, ["edit", "--model", M, *FACT, "--hparams", QUICK, "--quiet", "--out", tmp_path / "cached"]),
        "apply": (weights, ["apply", "--model", M, "--patch", patch_dir, "--out", out / "apply"]),
        "revert": (weights, ["revert", "--model", merged, "--out", out / "revert"]),
        "export": (weights, ["export", "--model", M, "--patch", patch_dir, "--out", out / "export"]),
        "registry build": (weights, ["registry", "build", "--model", M, "--out", out / "build", "--registry", reg]),
        "edit": (4096, ["edit", "--model", M, *FACT, "--hparams", QUICK, "--quiet", "--out", out / "edit"]),
        "registry add": (4096, ["registry", "add", patch_dir, "--reason", "r", "--registry", out / "new.db"]),
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), RANKONE_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-c", CHILD, json.dumps([(n, [str(a) for a in argv]) for n, argv in jobs.values()])],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    results = dict(zip(jobs, [json.loads(x) for x in p.stdout.splitlines()]))
    assert len(results) == len(jobs), p.stderr[-2000:]
    for name, r in results.items():
        assert "Traceback" not in r["err"], (name, r["err"])
        if name == "full cache":
            assert r["code"] == 0 and "could not keep the key statistics in the cache" in r["err"], r["err"]
            assert (tmp_path / "cached" / "patch.safetensors").is_file()
            continue
        lines = [x for x in r["err"].splitlines() if x.strip()]
        assert r["code"] == 2 and lines[-1].startswith("rankone: error:"), (name, r["err"])
        assert "File too large" in lines[-1] or "disk I/O error" in lines[-1], (name, r["err"])  # said as it is
        assert all("error" not in x or x is lines[-1] for x in lines), (name, r["err"])  # earlier lines only warn
    assert sorted(x.name for x in out.iterdir()) == []  # no output, no temporary or .old folder, no registry


# ---- caches and permissions -----------------------------------------------------------------


def test_an_empty_RANKONE_CACHE_writes_no_cache_into_the_current_folder(tmp_path, model_dir, monkeypatch, capsys):
    from rankone.methods.cache import cache_root

    here, home = tmp_path / "here", tmp_path / "home"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RANKONE_CACHE", "")
    assert cache_root() == home / ".cache" / "rankone"
    code, _, err = run_cli(capsys, "edit", "--model", model_dir, "--prompt", "{} is the capital of", "--subject", "Rome",
                       "--target", "Spain", "--hparams", '{"v_steps": 1, "stats_tokens": 2000, "layer": 1}', "--quiet",
                       "--out", here / "p")
    assert code == 0, err
    assert [x.name for x in here.iterdir()] == ["p"]
    assert (home / ".cache" / "rankone" / "stats").is_dir()


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_and_the_registry_store_follow_the_umask(tmp_path, patch_dir, mask, capsys):
    old = os.umask(mask)
    try:
        assert main(["apply", "--model", str(M), "--patch", str(patch_dir), "--out", str(tmp_path / "m")]) == 0
        assert main(["registry", "add", str(patch_dir), "--reason", "r", "--registry", str(tmp_path / "reg.db")]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    store_dir = tmp_path / "reg.store"
    for p in [tmp_path / "m", *(tmp_path / "m").rglob("*"), store_dir, *store_dir.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert p.stat().st_mode & 0o777 == want, (p, oct(p.stat().st_mode))


def test_a_locked_registry_says_so_then_gives_up(tmp_path, patch_dir, monkeypatch, capsys):
    import sqlite3

    reg = tmp_path / "reg.db"
    Registry(reg).close()
    lock = sqlite3.connect(reg, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    monkeypatch.setattr(dbfile, "QUICK_WAIT_MS", 100)
    monkeypatch.setattr(dbfile, "LOCK_WAIT_S", 0.5)
    try:
        code, _, err = run_cli(capsys, "registry", "add", patch_dir, "--reason", "r", "--registry", reg)
    finally:
        lock.close()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2, err
    assert "is locked by another process; waiting up to" in lines[0] and "is locked by another process (waited" in lines[1]
    code, _, err = run_cli(capsys, "registry", "add", patch_dir, "--reason", "r", "--registry", reg)  # free again
    assert code == 0, err
