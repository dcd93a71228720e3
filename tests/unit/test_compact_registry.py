"""`registry compact`: the release replaced by its compaction on the built-in testbed, gated,
audited, served as one delta per module, and rolled back to the same bits; its refusals; the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rankone.artifacts.patch import apply_patch
from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import tensor_sha256
from rankone.core.tokens import EditRequest
from rankone.edit.compaction import CompactSettings
from rankone.edit.editor import Editor
from rankone.lifecycle.compact import compact_release
from rankone.lifecycle.gates import load_suite
from rankone.lifecycle.registry import Registry
from rankone.serve.errors import ApiError
from rankone.serve.patchsets import Arms, StableBuilder, delta_factors
from rankone.serve.routing import Router
from conftest import run_cli

FAST = {"stats_tokens": 20_000, "v_steps": 40}


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    """The built-in testbed, two patches made one on top of the other (an r-ROME edit, then an
    EMMET batch of two), saved; the model given back as the base."""
    from rankone.models.load import load_model
    from rankone.testbed import World, builtin_model_dir

    d = builtin_model_dir()
    h = load_model(d)
    world = World.load(d)
    rng = random.Random(0)
    reqs, keeps = [], []
    for f in rng.sample(world.facts, 6):
        target = rng.choice([o for o in world.relation(f.relation).objects if o != f.object])
        reqs.append(EditRequest.create(world.prompts(f, "train")[0], f.subject, target))
    first = Editor(h, {"method": "r-rome", **FAST}, progress=False).edit(reqs[:1], keep=True)
    # as for MEMIT, this toy model needs δ ≈ 2–4 ‖h‖ (clamp 4) to write a fact
    second = Editor(h, {"method": "emmet", **FAST, "clamp_norm_factor": 4.0, "v_steps": 60}, progress=False
                    ).edit(reqs[1:3], keep=True)
    from rankone.artifacts.patch import revert_patch

    revert_patch(h.model, second)
    revert_patch(h.model, first)
    folder = tmp_path_factory.mktemp("patches")
    dirs = [str(first.save(folder / "first")), str(second.save(folder / "second"))]
    from rankone.testbed.check import greedy_hits

    edited = {w for r in reqs[:3] for w in r.subject.split()}  # keep checks about other people (no shared name)
    others = [f for f in rng.sample(world.facts, 80) if not edited & set(f.subject.split())]
    pairs = [(world.prompts(f, "train")[0].replace("{}", f.subject), f.object) for f in others]
    keeps = [p for (p, _), hit in zip(pairs, greedy_hits(h.model, h.tokenizer, pairs)[0]) if hit][:3]  # facts it knows
    suite = folder / "suite.jsonl"
    suite.write_text("".join(json.dumps({"type": "keep", "prompt": k}) + "\n" for k in keeps)
                     + json.dumps({"type": "perplexity", "text": (d / "corpus.txt").read_text()[:3000]}) + "\n")
    return h, dirs, suite, reqs


def released_registry(path, h, dirs):
    reg = Registry(path)
    for p in dirs:
        rec, _ = reg.add(p, "alice", "a fact")
        reg.record_validation(rec.id, {"results": [{"passed": True}], "suite": {"sha256": "x"}}, True, "alice")
        reg.release(rec.id, "alice", "ship it", model=h)
    return reg


def chain_weights(h, reg):
    """The release as `registry build` merges it: each module's sha256 (the model is given back)."""
    patches = [reg.load_patch(r.id) for r in reg.released()]
    mods = sorted({e.module for p in patches for e in p.edits})
    applied = apply_patch(h.model, patches)
    try:
        return {m: tensor_sha256(arch.weight_oi(arch.get_module(h.model, m))) for m in mods}
    finally:
        applied.revert()


def test_compaction_replaces_the_release_and_rolls_back_to_the_same_bits(testbed, tmp_path):
    h, dirs, suite, reqs = testbed
    reg = released_registry(tmp_path / "r.db", h, dirs)
    chain_ids = [r.id for r in reg.released()]
    chain = [reg.load_patch(i) for i in chain_ids]
    before = chain_weights(h, reg)
    base = {m: tensor_sha256(arch.weight_oi(arch.get_module(h.model, m))) for m in before}

    res = compact_release(reg, h, reason="fewer deltas", suite=load_suite(suite), actor="bob",
                          settings=CompactSettings(targets="released"))
    assert res.released and res.replaced == chain_ids and res.report.passed
    # the gates checked every replaced fact (none lost), the suite's keep and perplexity checks, ‖ΔW‖
    kinds = [r.type for r in res.report.results]
    assert kinds.count("target") == 3 and kinds.count("keep") == 3 and "perplexity" in kinds and "delta" in kinds
    assert all(r.before.split()[0] == r.after.split()[0] for r in res.report.results if r.type == "target")
    # one audited transition: the compaction released, the chain compacted into it
    assert [r.id for r in reg.released()] == [res.patch_id]
    assert [reg.get(i).state for i in chain_ids] == ["compacted", "compacted"]
    assert reg.replaced_by(res.patch_id) == chain_ids and reg.compacted_into(chain_ids[0]) == res.patch_id
    entry = next(e for e in reg.log(res.patch_id) if e.action == "compact")
    assert (entry.from_state, entry.to_state, entry.details["replaces"]) == ("validated", "released", chain_ids)
    assert [e.action for e in reg.log(chain_ids[1])][-1] == "compacted" and reg.check().ok
    # served: one delta per module, and stable gives what the chain gave at every key it carries
    compacted = reg.load_patch(res.patch_id)
    assert {m: a.shape[0] for m, (a, _) in delta_factors([compacted]).items()} == {
        e.module: e.rank for e in compacted.edits}
    assert len(compacted.edits) == len({e.module for p in chain for e in p.edits})
    builder = StableBuilder(h.model)
    w_chain, w_comp = builder.build(chain), builder.build([compacted])
    for e in compacted.edits:  # to the solve's own tolerance (EMMET's λ = 0.1 relaxes each key a little)
        w0 = arch.weight_oi(arch.get_module(h.model, e.module)).double()
        want, got = w_chain[e.module].double() @ e.keys, w_comp[e.module].double() @ e.keys
        tol = e.diagnostics["compaction"]["constraint_error_stored"]
        assert 0 < tol < 1e-3 and float((got - want).norm() / (want - w0.detach() @ e.keys).norm()) < 1.01 * tol + 1e-6
    assert all(tensor_sha256(arch.weight_oi(arch.get_module(h.model, m))) == s for m, s in base.items())
    # a compacted patch is not rolled back alone, and pinning it would write its edits twice
    with pytest.raises(RankoneError, match=f"compacted into {res.patch_id}"):
        reg.rollback(chain_ids[0], "bob", "no")
    with pytest.raises(RankoneError, match=f"only proposed or validated patches can be rejected; it was compacted into "
                                           f"{res.patch_id}"):  # every action's rule comes from the one table
        reg.reject(chain_ids[1], "bob", "no")
    arms = Arms("fp", tuple((i, reg.load_patch(i)) for i in [res.patch_id]), (), torch.float32, "cpu",
                known={r.id: r.state for r in reg.list()})
    with pytest.raises(ApiError, match="was compacted into the release") as ei:
        Router(reg.store).pinned(chain_ids[0][:8], arms)
    assert ei.value.status == 409

    # rollback: the chain is released again at its positions and builds to the same bits
    assert reg.rollback(res.patch_id, "bob", "back") == [res.patch_id]
    assert [r.id for r in reg.released()] == chain_ids and reg.get(res.patch_id).state == "rolled_back"
    assert chain_weights(h, reg) == before
    assert [e.action for e in reg.log(chain_ids[0])][-2:] == ["compacted", "restore"] and reg.check().ok
    reg.close()


def test_refusals_leave_the_release_as_it_is(testbed, tmp_path):
    from rankone.artifacts.patch import Patch
    from rankone.edit.compaction import compact

    h, dirs, suite, _ = testbed
    reg = Registry(tmp_path / "r.db")
    with pytest.raises(RankoneError, match="nothing is released"):
        compact_release(reg, h, reason="x")
    reg.close()
    reg = released_registry(tmp_path / "r2.db", h, dirs[:1])
    first = [r.id for r in reg.released()]
    with pytest.raises(RankoneError, match="needs a reason"):
        compact_release(reg, h, reason=" ")
    # a compaction of the release as it was, validated; then another patch is released
    done = compact(h, [Patch.load(dirs[0])], replaces=first, progress=False)
    rec, _ = reg.add(done.patch.save(tmp_path / "c"), "bob", "compact")
    reg.record_validation(rec.id, {"results": [{"passed": True}], "suite": {"sha256": "x"}}, True, "bob")
    nxt, _ = reg.add(dirs[1], "alice", "more")
    reg.record_validation(nxt.id, {"results": [{"passed": True}], "suite": {"sha256": "x"}}, True, "alice")
    reg.stage(nxt.id, canary=5)
    n = len(reg.log())
    with pytest.raises(RankoneError, match="staged on top of the release"):
        compact_release(reg, h, reason="x")
    with pytest.raises(RankoneError, match="staged on top of the release"):
        reg.release_compaction(rec.id, first, "bob", "x")
    reg.promote(nxt.id, "alice", "ship", model=h)
    with pytest.raises(RankoneError, match="the release changed since the compaction was computed"):
        reg.release_compaction(rec.id, first, "bob", "x")
    assert reg.get(rec.id).state == "validated" and len(reg.released()) == 2 and len(reg.log()) == n + 1
    reg.close()


def test_cli_compact_list_log_rollback(testbed, tmp_path, capsys):
    from rankone.testbed import builtin_model_dir

    h, dirs, suite, _ = testbed
    r = str(tmp_path / "r.db")
    released_registry(r, h, dirs).close()
    common = ["--registry", r, "--model", str(builtin_model_dir())]
    code, out, err = run_cli(capsys, "registry", "compact", *common, "--suite", suite)
    assert code == 2 and "registry compact needs --reason" in err and out == ""
    code, out, err = run_cli(capsys, "registry", "compact", *common, "--suite", suite, "--hparams", '{"emmet_lamda": 1}',
                             "--reason", "x")
    assert code == 2 and "unknown hyper-parameter" in err
    with Registry(r) as reg:
        assert len(reg.released()) == 2 and len(reg.log()) == 6
    code, out, _ = run_cli(capsys, "registry", "compact", *common, "--suite", suite, "--reason", "nightly", "--quiet")
    assert code == 0, out
    assert "compacted 2 released patch(es) with emmet (written targets)" in out and "checks passed: PASS" in out
    pid = out.split("released ")[-1].split()[0]
    code, out, _ = run_cli(capsys, "registry", "list", "--registry", r, "--state", "compacted")
    assert code == 0 and out.count("compacted") == 2
    code, out, _ = run_cli(capsys, "registry", "log", "--registry", r)
    assert "compact" in out and "replaces 2" in out
    code, out, _ = run_cli(capsys, "registry", "rollback", pid[:8], "--registry", r, "--reason", "undo")
    assert code == 0 and f"rolled back {pid}" in out and "released again (the compaction rolled back)" in out


def test_a_version_2_registry_is_migrated_to_hold_compactions(tmp_path):
    import sqlite3

    from rankone.lifecycle.records import _SCHEMA, SCHEMA_VERSION

    path = tmp_path / "v2.db"
    db = sqlite3.connect(path)  # a registry as rankone wrote it before compaction existed
    for stmt in _SCHEMA:
        if "compactions" not in stmt:
            db.execute(stmt.replace(",'compacted'", ""))
    db.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    db.execute("INSERT INTO patches (id, state, n_edits, summary, base, added_at, added_by) "
               "VALUES ('ab12cd34', 'released', 1, '[]', '{}', 'then', 'ana')")
    db.commit()
    db.close()
    with Registry(path) as reg:
        assert reg.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        assert reg.get("ab12cd34").state == "released"
        with reg._tx() as tx:  # the new state and table are there
            tx.execute("UPDATE patches SET state = 'compacted' WHERE id = 'ab12cd34'")
            tx.execute("INSERT INTO compactions VALUES ('ab12cd34', 'ab12cd34')")
        assert reg.compacted_into("ab12cd34") == "ab12cd34"


def test_heal_compacts_the_release_once_enough_patches_are_released(testbed, tmp_path):
    from rankone.heal.loop import Healer
    from rankone.heal.policy import HealPolicy
    from rankone.heal.probes import Probe, ProbeOutcome, ProbeSet

    h, dirs, _, reqs = testbed
    path = tmp_path / "r.db"
    released_registry(path, h, dirs[:1]).close()
    said: list[str] = []
    healer = Healer(path, ProbeSet([], "probes.jsonl", "x"), HealPolicy(compact_after_patches=2), h, say=said.append)
    probe = Probe(reqs[0].text()[0], reqs[0].target, where="probes.jsonl:1")  # the release answers it
    healer._maybe_compact([ProbeOutcome(probe, True, reqs[0].target)])
    assert said == [] and len(healer.reg.released()) == 1  # one released patch: below compact_after_patches
    healer.close()
    with Registry(path) as reg:
        rec, _ = reg.add(dirs[1], "alice", "more")
        reg.record_validation(rec.id, {"results": [{"passed": True}], "suite": {"sha256": "x"}}, True, "alice")
        reg.release(rec.id, "alice", "ship it", model=h)
        chain = [r.id for r in reg.released()]
    healer = Healer(path, ProbeSet([], "probes.jsonl", "x"), HealPolicy(compact_after_patches=2), h, say=said.append)
    healer._maybe_compact([ProbeOutcome(probe, True, reqs[0].target)])
    (pid,) = [r.id for r in healer.reg.released()]
    assert said == [f"compacted 2 released patches into {pid}: released in their place"]
    assert [healer.reg.get(i).state for i in chain] == ["compacted", "compacted"]
    report = healer.reg.validations(pid)[-1]["report"]
    assert any(r["type"] == "target" and r["what"] == probe.prompt for r in report["results"])  # the probe was a gate
    assert next(e for e in healer.reg.log(pid) if e.action == "compact").actor == "heal"
    healer.close()
