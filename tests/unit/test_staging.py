"""Staging in the registry: stage (canary / shadow), promote, abort, each an audit entry; a version-1
registry migrated in place; the CLI's commands and bad input (one line, exit 2, nothing changed)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from rankone.cli.main import main
from rankone.core.errors import RankoneError
from rankone.lifecycle.registry import Registry
from rankone.lifecycle.records import _SCHEMA, SCHEMA_VERSION
from test_registry import FAIL, M2, PASS, model, ready, reg, saved, synth_patch  # noqa: F401  (fixtures; tests/unit is on sys.path)


def test_stage_promote_abort_and_their_audit_entries(reg, model, tmp_path):
    a = ready(reg, saved(synth_patch(model, seed=1), tmp_path / "a"))
    b = ready(reg, saved(synth_patch(model, M2, seed=2, subject="Paris"), tmp_path / "b"))
    s = reg.stage(a, canary=5, actor="ana", reason="first users")
    assert (s.id, s.canary, s.shadow, s.staged_seq) == (a, 5.0, 0.0, 1) and reg.get(a).state == "staged"
    assert reg.stage(a, canary=25, shadow=10, actor="ana").canary == 25.0  # a staged patch's percentages change
    reg.stage(b, canary=0, shadow=50, actor="bo")
    assert [(x.id, x.canary, x.shadow) for x in reg.staged()] == [(a, 25.0, 10.0), (b, 0.0, 50.0)]
    with pytest.raises(RankoneError, match="already staged"):
        reg.stage(a, canary=25, shadow=10)
    with pytest.raises(RankoneError, match="is staged; only a validated patch is released; promote it"):
        reg.release(a)  # a staged patch is released only through promote
    rec, conflicts = reg.promote(a, "ana", "canary looked fine")
    assert rec.state == "released" and rec.release_seq == 1 and not conflicts
    assert reg.abort(b, "bo", "shadow disagreed").state == "aborted"
    assert reg.staged() == []
    log = [(e.action, e.from_state, e.to_state, e.details.get("canary")) for e in reg.log()][-5:]
    assert log == [("stage", "validated", "staged", 5.0), ("stage", "staged", "staged", 25.0),
                   ("stage", "validated", "staged", 0.0), ("promote", "staged", "released", None),
                   ("abort", "staged", "aborted", 0.0)]
    assert reg.log(a)[-2].details["was"] == {"canary": 5.0, "shadow": 0.0}
    assert reg.check().ok  # a promote counts as a release in the consistency check
    for bad, msg in [(lambda: reg.abort(a), "only a staged patch can be aborted"),
                     (lambda: reg.stage(b, canary=5), "only a validated patch can be staged"),
                     (lambda: reg.promote(b), "only a staged patch is promoted")]:
        with pytest.raises(RankoneError, match=msg):
            bad()


def test_stage_refuses_bad_percentages_and_failed_validations(reg, model, tmp_path):
    a = ready(reg, saved(synth_patch(model, seed=1), tmp_path / "a"))
    for canary, shadow in [(101, 0), (-1, 0), (float("nan"), 0), (0, 0), (True, 0)]:
        with pytest.raises(RankoneError):
            reg.stage(a, canary=canary, shadow=shadow)
    rec, _ = reg.add(saved(synth_patch(model, seed=3), tmp_path / "c"), "ana", "r")
    with pytest.raises(RankoneError, match="validate it first"):
        reg.stage(rec.id, canary=5)
    reg.record_validation(rec.id, PASS, True)
    reg.record_validation(rec.id, FAIL, False)
    with pytest.raises(RankoneError, match="failed its latest validation"):
        reg.stage(rec.id, canary=5)
    assert reg.staged() == [] and [e.action for e in reg.log(a)] == ["add", "validate"]


def test_a_version_1_registry_is_migrated_in_place(tmp_path, model):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)  # a registry as rankone wrote it before staging existed
    for stmt in _SCHEMA:
        if "staging" in stmt:
            continue
        db.execute(stmt.replace(",'staged'", "").replace(",'aborted'", ""))
    db.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    db.commit()
    db.close()
    with Registry(path) as reg:
        pid = ready(reg, saved(synth_patch(model, seed=1), tmp_path / "a"))
    raw = sqlite3.connect(path)
    raw.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")  # as if it had been written by the old code
    raw.execute("DROP TABLE staging")
    raw.commit()
    raw.close()
    with Registry(path) as reg:
        assert reg.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        assert reg.stage(pid, canary=10).canary == 10.0 and reg.get(pid).state == "staged"
        assert reg.check().ok and [e.action for e in reg.log(pid)] == ["add", "validate", "stage"]


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_stage_promote_abort(tmp_path, model, capsys):
    r = str(tmp_path / "r.db")
    with Registry(r) as reg:
        a = ready(reg, saved(synth_patch(model, seed=1), tmp_path / "a"))
        b = ready(reg, saved(synth_patch(model, M2, seed=2, subject="Paris"), tmp_path / "b"))
    code, out, _ = run_cli(capsys, "registry", "stage", a[:8], "--canary", "5", "--registry", r, "--reason", "try it")
    assert code == 0 and f"staged {a}: canary 5 %, shadow 0 %" in out
    code, out, _ = run_cli(capsys, "registry", "list", "--state", "staged", "--registry", r, "--json")
    assert [x["id"] for x in json.loads(out)] == [a]
    assert run_cli(capsys, "registry", "promote", a, "--registry", r)[0] == 0
    assert run_cli(capsys, "registry", "stage", b, "--shadow", "100", "--registry", r)[0] == 0
    code, out, _ = run_cli(capsys, "registry", "abort", b, "--registry", r, "--reason", "disagrees")
    assert code == 0 and f"aborted {b}" in out
    with Registry(r) as reg:
        assert [x.id for x in reg.released()] == [a] and reg.get(b).state == "aborted"


@pytest.mark.parametrize("argv, msg", [
    (["stage", "ID", "--canary", "150"], "--canary is a percentage of traffic from 0 to 100"),
    (["stage", "ID", "--canary", "five"], "--canary is a percentage"),
    (["stage", "ID"], "needs --canary or --shadow above 0"),
    (["abort", "ID"], "registry abort needs --reason"),
    (["abort", "ID", "--reason", "x"], "only a staged patch can be aborted"),
    (["promote", "ID"], "only a staged patch is promoted"),
])
def test_cli_bad_staging_input_changes_nothing(argv, msg, tmp_path, model, capsys):
    r = str(tmp_path / "r.db")
    with Registry(r) as reg:
        a = ready(reg, saved(synth_patch(model, seed=1), tmp_path / "a"))
        n = len(reg.log())
    code, _, err = run_cli(capsys, "registry", *[a if x == "ID" else x for x in argv], "--registry", r)
    assert code == 2 and msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with Registry(r) as reg:
        assert len(reg.log()) == n and reg.get(a).state == "validated"
