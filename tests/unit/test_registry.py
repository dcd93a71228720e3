"""The registry: content ids, the state machine, the append-only audit log, base checks,
conflicts, dependencies, consistency, and every bad CLI input (message, exit 2, nothing written)."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from rankone.core import architectures as arch
from rankone.cli.main import main
from rankone.core.fingerprint import tensor_sha256
from rankone.artifacts.patch import Patch, apply_patch, make_edit
from rankone.core.util import utcnow
from rankone.lifecycle.registry import Registry, content_id
from tiny import make_model
from conftest import handle_of, run_cli  # noqa: E402

M1 = "transformer.h.1.mlp.c_proj"
M2 = "transformer.h.2.mlp.c_proj"
PASS = {"results": [{"passed": True}], "suite": {"sha256": "x"}}
FAIL = {"results": [{"passed": False}], "suite": {"sha256": "x"}}


def synth_patch(model, module=M1, seed=0, subject="Danielle Darrieux", prompt="{} was born in", target="Rome",
                scale=1e-3, A=None, rank=1) -> Patch:
    """A real one-edit patch (exact revert fix and fingerprints) with a random ΔW = B A of rank `rank`."""
    w = arch.weight_oi(arch.get_module(model, module)).detach().clone()
    g = torch.Generator().manual_seed(seed)
    k = rank if A is None else A.shape[0]
    B = torch.randn(w.shape[0], k, generator=g) * scale  # [out, k]
    A = torch.randn(k, w.shape[1], generator=g) if A is None else A.float()  # [k, in]
    e, _ = make_edit(w, B, A, module=module, layer=int(module.split(".")[-3]), method="r-rome", hparams={}, seed=seed,
                     request={"prompt": prompt, "subject": subject, "target": target})
    base = {"model_type": model.config.model_type, "name_or_path": "", "n_layers": handle_of(model, None).n_layers}
    return Patch([e], base=base, created_at=utcnow())


@pytest.fixture
def model():
    return make_model("gpt2")


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "reg" / "registry.db")
    yield r
    r.close()


def saved(p: Patch, path) -> str:
    p.save(path)
    return str(path)


def ready(reg, path, reason="r"):
    rec, _ = reg.add(path, "alice", reason)
    reg.record_validation(rec.id, PASS, True, "alice")
    return rec.id


def n_audit(reg):
    return reg.db.execute("SELECT COUNT(*) FROM audit").fetchone()[0]


def test_content_id_store_and_idempotent_add(reg, model, tmp_path):
    a = saved(synth_patch(model, seed=1), tmp_path / "a")
    b = saved(synth_patch(model, seed=2), tmp_path / "b")
    rec, created = reg.add(a, "alice", "first")
    assert created and rec.state == "proposed" and rec.id == content_id(a) and len(rec.id) == 16
    for f in ("patch.json", "patch.safetensors"):  # the store holds the files byte for byte
        assert (reg.patch_dir(rec.id) / f).read_bytes() == (tmp_path / "a" / f).read_bytes()
    again, created2 = reg.add(a, "bob", "again")
    assert not created2 and again.id == rec.id and again.added_by == "alice"
    assert [e.action for e in reg.log()] == ["add"]
    assert reg.add(b, "alice", "second")[0].id != rec.id
    # the id is the content: one changed float gives another id
    p = Patch.load(a)
    p.edits[0].B[0, 0] += 1.0
    assert content_id(saved(p, tmp_path / "a2")) != rec.id
    assert reg.resolve(rec.id[:6]) == rec.id and reg.resolve(a) == rec.id


def test_state_machine_and_audit_trail(reg, model, tmp_path):
    pid = reg.add(saved(synth_patch(model), tmp_path / "a"), "alice", "ticket 1")[0].id
    with pytest.raises(Exception, match="validate it first"):
        reg.release(pid, "alice")
    assert reg.record_validation(pid, FAIL, False, "carol").state == "proposed"  # fail: state unchanged
    with pytest.raises(Exception, match="validate it first"):
        reg.release(pid)
    assert reg.record_validation(pid, PASS, True, "carol").state == "validated"
    rec, conflicts = reg.release(pid, "dave", "ship it")
    assert rec.state == "released" and rec.release_seq == 1 and conflicts == []
    with pytest.raises(Exception, match="only released patches"):
        reg.rollback(reg.add(saved(synth_patch(model, seed=5), tmp_path / "b"), "x", "y")[0].id, "x", "z")
    assert reg.rollback(pid, "erin", "broke prod") == [pid]
    assert reg.get(pid).state == "rolled_back"
    with pytest.raises(Exception, match="is rolled_back"):
        reg.rollback(pid, "erin", "again")
    with pytest.raises(Exception, match="is rolled_back"):
        reg.record_validation(pid, PASS, True)
    log = reg.log(pid)
    assert [(e.action, e.from_state, e.to_state, e.actor) for e in log] == [
        ("add", None, "proposed", "alice"), ("validate-failed", "proposed", "proposed", "carol"),
        ("validate", "proposed", "validated", "carol"), ("release", "validated", "released", "dave"),
        ("rollback", "released", "rolled_back", "erin")]
    assert log[-1].reason == "broke prod" and log[0].reason == "ticket 1"
    assert len(reg.validations(pid)) == 2 and reg.check().ok


def test_audit_log_is_append_only_and_chained(reg, model, tmp_path):
    ready(reg, saved(synth_patch(model), tmp_path / "a"))
    for sql in ("UPDATE audit SET actor = 'mallory'", "DELETE FROM audit", "DELETE FROM validations"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            reg.db.execute(sql)
    assert n_audit(reg) == 2 and reg.check().ok
    # someone drops the trigger and removes an entry behind SQLite's back: the hash chain notices
    reg.db.execute("DROP TRIGGER audit_no_delete")
    reg.db.execute("DELETE FROM audit WHERE seq = 1")
    assert any("hash chain" in p for p in reg.check().problems)


def test_release_onto_another_base_is_refused(reg, model, tmp_path):
    ready_a = ready(reg, saved(synth_patch(model, seed=1), tmp_path / "a"))
    reg.release(ready_a)
    other = make_model("gpt2", seed=7)  # same architecture, other weights
    pid = ready(reg, saved(synth_patch(other, seed=2, subject="Toko Yasuda"), tmp_path / "b"))
    with pytest.raises(Exception, match="made for another base model"):
        reg.release(pid)
    llama = make_model("llama")
    pid = ready(reg, saved(synth_patch(llama, "model.layers.1.mlp.down_proj", subject="X"), tmp_path / "c"))
    with pytest.raises(Exception, match="releases onto a gpt2"):
        reg.release(pid)
    assert [r.release_seq for r in reg.released()] == [1]


def test_conflicts_refused_unless_forced(reg, model, tmp_path):
    first = synth_patch(model, seed=1)
    reg.release(ready(reg, saved(first, tmp_path / "a")))
    # same subject, same relation (case and spacing differ), another target
    same = ready(reg, saved(synth_patch(model, seed=2, subject="danielle  darrieux", target="Oslo"), tmp_path / "b"))
    with pytest.raises(Exception, match=r"conflict.*rewrites the fact.*--force") as ei:
        reg.release(same)
    assert "Danielle Darrieux was born in -> Rome" in str(ei.value)
    # another fact whose C⁻¹-weighted key (the row of A) nearly equals the released one's
    near = first.edits[0].A + 0.05 * torch.randn(first.edits[0].A.shape, generator=torch.Generator().manual_seed(3))
    close = ready(reg, saved(synth_patch(model, seed=3, subject="Toko Yasuda", A=near), tmp_path / "c"))
    with pytest.raises(Exception, match=r"keys of cosine 0\.9\d+ > 0\.9"):
        reg.release(close)
    # the same key on another module is no conflict; an unrelated key is none either
    reg.release(ready(reg, saved(synth_patch(model, M2, seed=4, subject="Paris", A=first.edits[0].A), tmp_path / "d")))
    reg.release(ready(reg, saved(synth_patch(model, seed=5, subject="Rome", prompt="{} is in"), tmp_path / "e")))
    rec, conflicts = reg.release(same, "alice", force=True)
    assert rec.state == "released" and [c.kind for c in conflicts] == ["same-fact"]
    assert reg.log(same)[-1].details["forced_over"][0].startswith("edit 0")
    assert reg.release(close, conflict_threshold=0.99999)[0].state == "released"


def test_rollback_of_a_patch_others_were_made_on(reg, model, tmp_path):
    a = synth_patch(model, seed=1)
    reg.release(ready(reg, saved(a, tmp_path / "a")))
    h = apply_patch(model, a)  # B is computed on the model with A merged
    b = synth_patch(model, seed=2, subject="Toko Yasuda")
    h.revert()
    c = synth_patch(model, seed=3, subject="Rome", prompt="{} is in")  # C on the plain base: stacks
    bid, cid = ready(reg, saved(b, tmp_path / "b")), ready(reg, saved(c, tmp_path / "c"))
    reg.release(bid)
    reg.release(cid)
    aid = reg.released()[0].id
    assert reg.dependents(aid) == [bid]
    with pytest.raises(Exception, match=f"{bid} were made on top of {aid}.*--cascade"):
        reg.rollback(aid, "x", "bad")
    assert reg.get(aid).state == "released"
    assert reg.rollback(aid, "x", "bad", cascade=True) == [bid, aid]
    assert [r.id for r in reg.released()] == [cid]
    assert reg.log(bid)[-1].details == {"cascade_from": aid}
    # what remains builds: C alone on the base
    apply_patch(model, [reg.load_patch(cid)]).revert()


def test_check_tolerates_orphans_but_not_rows_without_files(reg, model, tmp_path):
    pid = reg.add(saved(synth_patch(model), tmp_path / "a"), "a", "r")[0].id
    orphan = synth_patch(model, seed=9)
    orphan.save(reg.store / content_id(saved(orphan, tmp_path / "o")))
    rep = reg.check()
    assert rep.ok and rep.orphans == [content_id(tmp_path / "o")]
    assert reg.check(prune=True, min_age_s=0).pruned == rep.orphans and not reg.check().orphans
    (reg.patch_dir(pid) / "patch.safetensors").unlink()
    rep = reg.check()
    assert not rep.ok and "has no files" in rep.problems[0]
    with pytest.raises(Exception, match="run `rankone registry check`"):
        reg.load_patch(pid)


# ---- CLI ------------------------------------------------------------------------------------



def test_cli_add_list_show_log_reject(tmp_path, model, capsys):
    db = str(tmp_path / "r.db")
    a = saved(synth_patch(model), tmp_path / "a")
    code, out, _ = run_cli(capsys, "registry", "add", a, "--reason", "ticket 7", "--author", "alice", "--registry", db)
    assert code == 0 and out.startswith("added ") and "Danielle Darrieux was born in -> Rome" in out
    pid = out.split()[1]
    code, out, _ = run_cli(capsys, "registry", "add", a, "--reason", "dup", "--registry", db)
    assert code == 0 and "already registered" in out
    code, out, _ = run_cli(capsys, "registry", "list", "--registry", db)
    assert pid in out and "proposed" in out and "alice" in out
    code, out, _ = run_cli(capsys, "registry", "show", pid[:5], "--registry", db)
    assert code == 0 and "state proposed" in out and M1 in out and "ticket 7" in out
    code, out, _ = run_cli(capsys, "registry", "reject", pid, "--reason", "wrong fact", "--registry", db)
    assert code == 0
    code, out, _ = run_cli(capsys, "registry", "log", "--json", "--registry", db)
    assert [e["action"] for e in json.loads(out)] == ["add", "reject"]
    code, out, _ = run_cli(capsys, "registry", "list", "--state", "rejected", "--json", "--registry", db)
    assert [r["id"] for r in json.loads(out)] == [pid]


def test_cli_env_registry_and_default(tmp_path, model, capsys, monkeypatch):
    monkeypatch.setenv("RANKONE_REGISTRY", str(tmp_path / "env" / "x.db"))
    a = saved(synth_patch(model), tmp_path / "a")
    assert run_cli(capsys, "registry", "add", a, "--reason", "r")[0] == 0
    assert (tmp_path / "env" / "x.db").is_file() and (tmp_path / "env" / "x.store").is_dir()
    monkeypatch.delenv("RANKONE_REGISTRY")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert Registry(create=True).path == tmp_path / "xdg" / "rankone" / "registry.db"


BAD = [
    (["registry", "add", "{missing}", "--reason", "r"], "is not a patch"),
    (["registry", "add", "{patch}"], "needs --reason"),
    (["registry", "list"], "no registry at"),
    (["registry", "show", "abcd"], "no registry at"),
    (["registry", "log"], "no registry at"),
    (["registry", "rollback", "abcd", "--reason", "x"], "no registry at"),
]


@pytest.mark.parametrize("argv,msg", BAD)
def test_cli_bad_input_on_empty_registry_writes_nothing(argv, msg, tmp_path, model, capsys):
    db = tmp_path / "r" / "r.db"
    p = saved(synth_patch(model), tmp_path / "p")
    argv = [a.format(missing=str(tmp_path / "nope"), patch=p) for a in argv] + ["--registry", str(db)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and err.startswith("rankone: error:") and msg in err and len(err.strip().splitlines()) == 1
    assert not db.exists() and not (tmp_path / "r").exists()


BAD_EXISTING = [
    (["registry", "show", "zz"], "neither a patch id"),
    (["registry", "show", "ffff"], "no patch 'ffff'"),
    (["registry", "release", "{pid}"], "validate it first"),
    (["registry", "rollback", "{pid}"], "needs --reason"),
    (["registry", "rollback", "{pid}", "--reason", "x"], "only released patches"),
    (["registry", "reject", "{pid}"], "needs --reason"),
    (["registry", "list", "--state", "gone"], "unknown state"),
    (["registry", "validate", "{pid}", "--model", "{tmp}/nomodel", "--suite", "{tmp}/nosuite.jsonl"], "suite file"),
    (["registry", "release", "{pid}", "--policy", "{tmp}/nopolicy.json"], "policy file"),
    (["registry", "build", "--model", "{tmp}/nomodel", "--out", "{tmp}/out"], "does not exist"),
    (["registry", "build", "--model", "{tmp}/nomodel", "--out", "{tmp}/out", "--format", "peft"], "nothing is released"),
]


@pytest.mark.parametrize("argv,msg", BAD_EXISTING)
def test_cli_bad_input_changes_nothing(argv, msg, tmp_path, model, capsys):
    db = tmp_path / "r.db"
    pid = Registry(db).add(saved(synth_patch(model), tmp_path / "p"), "a", "r")[0].id
    before = sqlite_dump(db)
    argv = [a.format(pid=pid, tmp=tmp_path) for a in argv] + ["--registry", str(db)]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and msg in err and err.startswith("rankone: error:")
    assert sqlite_dump(db) == before and not (tmp_path / "out").exists()


def sqlite_dump(db) -> list[str]:
    con = sqlite3.connect(str(db))
    try:
        return list(con.iterdump())
    finally:
        con.close()


def test_cli_release_and_build_check_the_base_model(tmp_path, model, tok, capsys):
    d, other = tmp_path / "base", tmp_path / "other"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    make_model("gpt2", seed=3).save_pretrained(other)
    tok.save_pretrained(other)
    db = str(tmp_path / "r.db")
    reg = Registry(db)
    pid = ready(reg, saved(synth_patch(model), tmp_path / "a"))
    qid = ready(reg, saved(synth_patch(model, M2, seed=4, subject="Toko Yasuda"), tmp_path / "b"))
    dump = sqlite_dump(db)
    code, _, err = run_cli(capsys, "registry", "release", pid, "--model", str(other), "--registry", db)
    assert code == 2 and "patch does not fit this model" in err and sqlite_dump(db) == dump
    code, out, _ = run_cli(capsys, "registry", "release", pid, "--model", str(d), "--registry", db, "--author", "dave")
    assert code == 0 and f"released {pid} as #1" in out
    # the first release with --model records every layer's projection as the base identity
    assert sorted(reg.base()["modules"]) == [f"transformer.h.{i}.mlp.c_proj" for i in range(3)]
    dump = sqlite_dump(db)
    for argv in (["release", qid, "--model", str(other)], ["build", "--model", str(other), "--out", str(tmp_path / "out")],
                 ["validate", qid, "--model", str(other), "--suite", str(_suite(tmp_path))]):
        code, _, err = run_cli(capsys, "registry", *argv, "--registry", db)
        assert code == 2 and "not this registry's base model" in err, argv
        assert sqlite_dump(db) == dump and not (tmp_path / "out").exists()
    code, out, _ = run_cli(capsys, "registry", "build", "--model", str(d), "--out", str(tmp_path / "out"), "--registry", db)
    assert code == 0 and pid in out
    man = json.loads((tmp_path / "out" / "rankone" / "build.json").read_text())
    assert [p["id"] for p in man["patches"]] == [pid] and man["base"]["model_type"] == "gpt2"
    assert reg.log()[-1].action == "build" and reg.log()[-1].details["patches"] == [pid]


def _suite(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"type": "keep", "prompt": "Rome is"}\n')
    return p


def test_multi_edit_patch_stacks_on_released_ones(reg, model, tmp_path):
    # A and B are both made on the base; B edits M1 twice in sequence: B's second edit continues
    # its own chain, which apply_patch stacks onto A, so release and build accept it.
    reg.release(ready(reg, saved(synth_patch(model, seed=1), tmp_path / "a")))
    b1 = synth_patch(model, seed=2, subject="Toko Yasuda")
    h = apply_patch(model, b1)
    b2 = synth_patch(model, seed=3, subject="Rome", prompt="{} is in")
    h.revert()
    b = Patch(b1.edits + b2.edits, b1.base, utcnow())
    bid = ready(reg, saved(b, tmp_path / "b"))
    assert reg.release(bid)[0].state == "released"
    base = arch.weight_oi(arch.get_module(model, M1)).detach().double().clone()
    a = reg.load_patch(reg.released()[0].id)
    h = apply_patch(model, [a, b])  # what build does
    got = arch.weight_oi(arch.get_module(model, M1)).detach().double() - base
    h.revert()
    want = sum(e.delta() for p in (a, b) for e in p.edits if e.module == M1)
    assert torch.allclose(got, want, atol=1e-6)


def test_a_failed_revalidation_blocks_release(reg, model, tmp_path):
    pid = ready(reg, saved(synth_patch(model), tmp_path / "a"))
    assert reg.record_validation(pid, FAIL, False, "qa").state == "validated"  # state moves only on pass
    with pytest.raises(Exception, match="failed its latest validation"):
        reg.release(pid)
    reg.record_validation(pid, PASS, True, "qa")
    assert reg.release(pid)[0].state == "released"
