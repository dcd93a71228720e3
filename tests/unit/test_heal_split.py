"""A heal patch the gates reject is not the end of its corrections: they are retried in halves, and
a correction whose lone patch still fails is skipped for good, every step in the audit log.

On the built-in model, with no server (heal proposes and validates only) and a gate no edit can
pass (‖ΔW‖_F ≤ 1e-9), so each proposal is rejected and the splitting runs to its end.
"""

from __future__ import annotations

import pytest

from rankone.heal.loop import Healer
from rankone.heal.policy import HealPolicy
from rankone.heal.probes import ProbeSet
from rankone.lifecycle.feedback import FeedbackLog, heal_events
from rankone.lifecycle.registry import Registry
from rankone.models.load import load_model
from rankone.testbed import builtin_model_dir

FACTS = [("Thoutem Nousren was born in", "Thoutem Nousren", "Lisbon"),
         ("Likdos Nousren Nasher was born in", "Likdos Nousren Nasher", "Oslo"),
         ("Thurber Fokai was born in", "Thurber Fokai", "Cairo")]
FAST = {"v_steps": 3, "prefix_spec": [[3, 2]], "stats_tokens": 3000}


@pytest.fixture(scope="module")
def handle():
    return load_model(builtin_model_dir())


def _healer(path, handle, gates):
    policy = HealPolicy(quiet_s=0, method_one="r-rome", method_many="r-rome", gates=gates,
                        hparams={"r-rome": FAST}, probe_sample=0)
    return Healer(path, ProbeSet([], "", ""), policy, handle, client=None, say=lambda _: None)


def _report(path, facts):
    with FeedbackLog(path) as fb:
        for prompt, subject, target in facts:
            fb.add(reporter="trusted:ops", trusted=True, verdict="wrong", prompt=prompt, correction=target,
                   subject=subject)


def test_a_rejected_batch_is_retried_in_halves_then_each_failing_fact_skipped(tmp_path, handle):
    path = tmp_path / "reg.db"
    Registry(path).close()
    _report(path, FACTS)
    healer = _healer(path, handle, {"max_delta_fro": 1e-9})
    sizes = []
    try:
        for _ in range(8):
            plan = healer.cycle()
            if plan.patch_id is None:
                break
            sizes.append(healer.reg.get(plan.patch_id).n_edits)
        assert sizes == [3, 1, 2, 1, 1]  # the batch, its halves of 1 and 2, the 2's halves
        assert healer.cycle().patch_id is None  # nothing left to try: each fact failed alone
        states = [r.state for r in healer.reg.list()]
        assert states == ["rejected"] * 5 and healer.reg.check().ok
        splits = heal_events(healer.reg, action="heal-split")
        assert [len(h) for e in splits for h in e.details["halves"]] == [1, 2, 1, 1]
        skips = [e for e in heal_events(healer.reg, action="heal-skip") if e.details["rule"] == "breaks_checks"]
        assert sorted(e.details["correction"]["correction"] for e in skips) == ["Cairo", "Lisbon", "Oslo"]
        assert all("failed the gates" in e.reason for e in skips)
    finally:
        healer.close()
    with FeedbackLog(path) as fb:
        assert {r.status for r in fb.reports(None)} == {"skipped"}


def test_a_half_that_passes_is_proposed_and_the_rest_waits_its_turn(tmp_path, handle):
    """After a split, only the first pending half is proposed; a passing half is validated."""
    path = tmp_path / "reg.db"
    Registry(path).close()
    _report(path, FACTS[:2])
    healer = _healer(path, handle, {"max_delta_fro": 1e-9})
    try:
        first = healer.cycle()
        assert healer.reg.get(first.patch_id).state == "rejected"
        healer.policy.gates = {}  # the gate people relaxed: the halves now pass
        second = healer.cycle()
        rec = healer.reg.get(second.patch_id)
        assert rec.state == "validated" and rec.n_edits == 1
        assert "Thoutem Nousren" in rec.reason or "#1" in rec.reason
    finally:
        healer.close()
    with FeedbackLog(path) as fb:
        status = {r.prompt: r.status for r in fb.reports(None)}
    assert status == {FACTS[0][0]: "acted", FACTS[1][0]: "open"}  # the second half waits for the first's rollout


def test_a_staged_patch_is_guarded_before_heals_own_next_one(tmp_path, handle):
    """Heal holds a validated patch of its own (no server: it cannot roll it out) when a person
    stages another: with adopt_staged the staged one, on live traffic, is what heal works on."""
    from rankone import EditRequest, Editor

    path = tmp_path / "reg.db"
    Registry(path).close()
    _report(path, FACTS[:1])
    healer = _healer(path, handle, {})
    try:
        own = healer.cycle().patch_id
        assert healer.reg.get(own).state == "validated"
        prompt, subject, target = FACTS[1]
        Editor(handle, dict(FAST, method="r-rome")).edit([EditRequest.create(prompt, subject, target)]).save(tmp_path / "p")
        theirs, _ = healer.reg.add(tmp_path / "p", "ana", "by hand")
        healer.reg.record_validation(theirs.id, {"results": [], "suite": {"sha256": "x"}}, True, "ana")
        healer.reg.stage(theirs.id, 5, 0, "ana", "by hand")
        assert healer._active() == own  # not adopted: a person's rollout is theirs
        healer.policy.adopt_staged = True
        assert healer._active() == theirs.id
    finally:
        healer.close()


def test_a_patch_aborted_on_the_canary_has_its_corrections_retried_in_halves(tmp_path, handle):
    path = tmp_path / "reg.db"
    Registry(path).close()
    _report(path, FACTS[:2])
    healer = _healer(path, handle, {"max_perplexity_rise": 10.0, "keep_max_prob_change": 1.0})
    try:
        pid = healer.cycle().patch_id
        healer.reg.stage(pid, 5, 0, "heal", "canary")
        healer.reg.abort(pid, "heal", "probes regressed on the canary")
        again = healer.cycle().patch_id  # the abort is reconciled: split, then the first half proposed
        (split,) = heal_events(healer.reg, pid, "heal-split")
        assert "was aborted" in split.reason and [len(h) for h in split.details["halves"]] == [1, 1]
        assert again != pid and healer.reg.get(again).state == "validated"
    finally:
        healer.close()
