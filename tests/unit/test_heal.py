"""Heal's pure parts: the policy, the probe file, triage and the rollout decisions."""

from __future__ import annotations

import json

import pytest

from rankone.core.errors import RankoneError
from rankone.heal.policy import HealPolicy
from rankone.heal.probes import ProbeOutcome, load_probes, run_probes
from rankone.heal.rollout import Window, binomial_p_above, decide, two_proportion_p
from rankone.heal.triage import refuse_by_subject, triage
from rankone.lifecycle.feedback import ProbeResult, Report

# ---- policy ---------------------------------------------------------------------------------------


def test_policy_defaults_round_trip_and_load(tmp_path):
    p = HealPolicy()
    assert (p.k_users, p.canary_steps, p.min_requests, p.gate_policy().max_perplexity_rise) == (3, [5.0, 25.0, 100.0], 50, 0.05)
    f = tmp_path / "policy.json"
    f.write_text(json.dumps({"_comment": "mine", "k_users": 5, "canary_steps": [10, 100], "stats_corpus": "c.txt"}))
    q = HealPolicy.load(f)
    assert (q.k_users, q.canary_steps, q.stats_corpus) == (5, [10, 100], str(tmp_path / "c.txt"))
    assert HealPolicy.from_dict(q.to_dict()) == q


def test_the_documented_example_is_the_defaults():
    from pathlib import Path

    doc = Path(__file__).resolve().parents[2] / "docs" / "heal-policy.example.json"
    assert HealPolicy.load(doc) == HealPolicy(hparams={"alphaedit": {}})


def test_policy_hparams_are_per_method_and_checked():
    assert HealPolicy(hparams={"r-rome": {"v_steps": 10}}).settings("r-rome") == {"method": "r-rome", "v_steps": 10}
    assert HealPolicy().settings("alphaedit") == {"method": "alphaedit"}
    with pytest.raises(RankoneError, match="hparams maps a method"):
        HealPolicy(hparams={"v_steps": 10})
    with pytest.raises(RankoneError, match="heal policy hparams r-rome"):
        HealPolicy(hparams={"r-rome": {"window": 3}})


@pytest.mark.parametrize("body, says", [
    ({"k_user": 3}, "unknown heal policy key(s) ['k_user']"),
    ({"k_users": "3"}, "k_users must be"),
    ({"k_users": 0}, "k_users must be a whole number of at least 1"),
    ({"alpha": 1.5}, "alpha must be a number from 0 to 1"),
    ({"canary_steps": [25, 5, 100]}, "canary_steps must rise strictly"),
    ({"canary_steps": [5, 50]}, "canary_steps must rise strictly from above 0 to 100"),
    ({"method_many": "nope"}, "method_many must be one of"),
    ({"gates": {"max_perplexity_rise": -1}}, "heal policy gates: policy max_perplexity_rise must be a non-negative number"),
    ({"gates": {"typo": 1}}, "heal policy gates: unknown policy key(s) ['typo']"),
    ({"compact_after_patches": 1}, "compact_after_patches must be null or at least 2"),
])
def test_policy_of_the_wrong_shape_is_one_line(tmp_path, body, says):
    f = tmp_path / "policy.json"
    f.write_text(json.dumps(body))
    with pytest.raises(RankoneError) as e:
        HealPolicy.load(f)
    assert says in str(e.value) and str(f) in str(e.value)


def test_policy_file_not_json_or_not_an_object(tmp_path):
    f = tmp_path / "p.json"
    f.write_text("{k_users: 3")
    with pytest.raises(RankoneError, match="is not valid JSON"):
        HealPolicy.load(f)
    f.write_text("[1, 2]")
    with pytest.raises(RankoneError, match="must be a JSON object"):
        HealPolicy.load(f)
    with pytest.raises(RankoneError, match="does not exist"):
        HealPolicy.load(tmp_path / "none.json")


# ---- probes ---------------------------------------------------------------------------------------


def _probes(tmp_path, *lines):
    f = tmp_path / "probes.jsonl"
    f.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return f


def test_probe_file_parsed_with_its_optional_fields(tmp_path):
    f = _probes(tmp_path, {"prompt": "Ann  was born in", "expected": "Rome"}, "",
                {"prompt": "Bo speaks", "expected": "French", "subject": "Bo", "paraphrases": ["Bo grew up speaking"],
                 "neighbours": ["Cy speaks"], "protected": True})
    ps = load_probes(f)
    assert [p.prompt for p in ps.probes] == ["Ann was born in", "Bo speaks"]
    assert ps.probes[1].protected and ps.probes[1].where == f"{f}:3"
    assert ps.matching("bo grew up  speaking") is ps.probes[1] and ps.matching("nobody") is None


@pytest.mark.parametrize("line, says", [
    ("{not json", "probes.jsonl:1 is not valid JSON"),
    ('["a list"]', "probes.jsonl:1 is not a JSON object"),
    ({"prompt": "x"}, "needs a non-empty string 'expected'"),
    ({"prompt": " ", "expected": "y"}, "needs a non-empty string 'prompt'"),
    ({"prompt": "x", "expected": "y", "protect": True}, "has no field(s) ['protect']"),
    ({"prompt": "x", "expected": "y", "protected": "yes"}, "'protected' must be true or false"),
    ({"prompt": "x", "expected": "y", "paraphrases": "z"}, "'paraphrases' must be a list of non-empty strings"),
    ({"prompt": "Ann was born in", "expected": "y", "subject": "Bo"}, "the subject 'Bo' does not occur"),
])
def test_malformed_probe_files_are_one_line(tmp_path, line, says):
    with pytest.raises(RankoneError) as e:
        load_probes(_probes(tmp_path, line))
    assert says in str(e.value)


def test_duplicate_and_empty_probe_files(tmp_path):
    with pytest.raises(RankoneError, match="already probed at"):
        load_probes(_probes(tmp_path, {"prompt": "a b", "expected": "c"}, {"prompt": "A  b", "expected": "d"}))
    with pytest.raises(RankoneError, match="holds no probes"):
        load_probes(_probes(tmp_path, ""))


def test_probes_tracked_over_time_drift_update_new(tmp_path):
    ps = load_probes(_probes(tmp_path, {"prompt": "p1 is", "expected": "A"}, {"prompt": "p2 is", "expected": "B"},
                             {"prompt": "p3 is", "expected": "C"}))
    last = {"p1 is": ProbeResult("t", "r", "p1 is", "A", "stable", [], True, "A"),
            "p2 is": ProbeResult("t", "r", "p2 is", "old", "stable", [], True, "old")}
    out = run_probes(ps.probes, lambda prompt, n: " X and more", last)
    assert [(o.passed, o.change) for o in out] == [(False, "drift"), (False, "update"), (False, "new")]
    assert run_probes(ps.probes[:1], lambda prompt, n: " a, then")[0].passed  # `says`: whole word, any case


# ---- triage ---------------------------------------------------------------------------------------


def _report(i, user, prompt, correction, trusted=False, subject=None, at="2026-01-01T00:00:00.000Z"):
    return Report(i, at, None if trusted else f"cmpl-{i}", f"trusted:{user}" if trusted else user, trusted, "wrong",
                  prompt, "old", correction, subject, "stable", "rk_x", [], "open", None, None)


P1, P2 = "Ann Lee was born in", "Bo Ray speaks"


def test_k_distinct_users_are_needed():
    pol = HealPolicy(k_users=3)
    two = [_report(1, "u1", P1, "Rome"), _report(2, "u2", P1, "rome "), _report(3, "u2", P1, "Rome")]  # u2 twice: one user
    v = triage(two, None, [], pol)
    assert [(x.action, x.rule, len(x.correction.users)) for x in v] == [("wait", "below_k", 2)]
    v = triage(two + [_report(4, "u3", P1, "ROME", subject="Ann Lee", at="2026-01-01T00:00:09.000Z"),
                      _report(5, "u4", P1, "Rome", at="2026-01-01T00:00:20.000Z")], None, [], pol)
    assert [(x.action, x.rule) for x in v] == [("accept", "k_users")]
    assert v[0].correction.ready_at == "2026-01-01T00:00:09.000Z"  # the third distinct user's report
    v = triage(two + [_report(4, "u3", P1, "ROME", subject="Ann Lee")], None, [], pol)
    c = v[0].correction
    assert (c.users, c.feedback_ids, c.subject, c.subject_from) == (["u1", "u2", "u3"], [1, 2, 3, 4], "Ann Lee", "report")


def test_trusted_reporters_and_trusted_only():
    one = [_report(1, "ops", P1, "Rome", trusted=True), _report(2, "u1", P2, "German"), _report(3, "u2", P2, "German"),
           _report(4, "u3", P2, "German")]
    v = {x.correction.prompt: x for x in triage(one, None, [], HealPolicy())}
    assert (v[P1].action, v[P1].rule, v[P1].correction.trusted) == ("accept", "trusted", ["reporter:ops"])
    assert v[P2].action == "accept"
    v = {x.correction.prompt: x for x in triage(one, None, [], HealPolicy(trusted_only=True))}
    assert (v[P1].action, v[P2].action) == ("accept", "wait")
    assert "only trusted sources count" in v[P2].reason
    v = {x.correction.prompt: x for x in triage(one, None, [], HealPolicy(trusted_reporters=["someone-else"]))}
    assert v[P1].action == "wait"  # a token reporter the policy does not trust is one user


def test_contested_corrections_are_skipped_and_a_trusted_source_wins():
    rs = [_report(i, f"u{i}", P1, "Rome") for i in range(3)] + [_report(10 + i, f"v{i}", P1, "Oslo") for i in range(3)]
    v = triage(rs, None, [], HealPolicy())
    assert sorted((x.action, x.rule) for x in v) == [("skip", "contested"), ("skip", "contested")]
    v = triage(rs + [_report(20, "ops", P1, "Oslo", trusted=True)], None, [], HealPolicy())
    assert sorted((x.action, x.correction.correction) for x in v) == [("accept", "Oslo"), ("wait", "Rome")]


def test_refusals_protected_facts_and_contradicted_probes(tmp_path):
    ps = load_probes(_probes(tmp_path, {"prompt": P1, "expected": "Paris", "protected": True},
                             {"prompt": P2, "expected": "French", "paraphrases": ["Bo Ray grew up speaking"]},
                             {"prompt": "Cy Dee plays", "expected": "chess", "subject": "Cy Dee", "protected": True}))
    rs = [_report(i, f"u{i}", P1, "Rome") for i in range(3)] + \
         [_report(10 + i, f"v{i}", "Bo Ray grew up speaking", "German") for i in range(3)]
    v = {x.correction.prompt: x for x in triage(rs, ps, [], HealPolicy())}
    assert (v[P1].action, v[P1].rule) == ("refuse", "protected")
    assert (v["Bo Ray grew up speaking"].action, v["Bo Ray grew up speaking"].rule) == ("refuse", "contradicts_probe")
    assert "contradicts the protected fact" in v[P1].reason and ps.probes[0].where in v[P1].reason
    # a correction about a protected fact's subject, on another prompt: refused once the subject is known
    x = triage([_report(30 + i, f"w{i}", "Cy Dee was born in", "Oslo", subject="Cy Dee") for i in range(3)], ps, [],
               HealPolicy())[0]
    assert x.action == "accept"
    r = refuse_by_subject(x, ps)
    assert r is not None and (r.action, r.rule) == ("refuse", "protected_subject")


def test_a_failing_probe_is_a_trusted_correction_and_overrules_reports(tmp_path):
    ps = load_probes(_probes(tmp_path, {"prompt": P1, "expected": "Paris", "subject": "Ann Lee", "protected": True}))
    failing = [ProbeOutcome(ps.probes[0], False, "Rome", "drift")]
    rs = [_report(1, "u1", P1, "Paris"), _report(2, "u2", P1, "Oslo")]
    v = sorted(triage(rs, ps, failing, HealPolicy()), key=lambda x: x.action)
    assert [(x.action, x.rule, x.correction.correction) for x in v] == [
        ("accept", "trusted", "Paris"), ("refuse", "contradicts_probe", "Oslo")]
    assert v[0].correction.feedback_ids == [1] and v[0].correction.trusted[0] == f"probe:{ps.probes[0].where}"
    assert refuse_by_subject(v[0], ps) is None  # restoring a protected fact is not editing it away


# ---- rollout decisions ----------------------------------------------------------------------------

CANARY = {"kind": "canary", "index": 1, "last": False, "canary": 5.0}
LAST = dict(CANARY, index=3, last=True, canary=100.0)
SHADOW = {"kind": "shadow", "index": 0, "last": False, "canary": 0.0}


def _evidence(c_req=60, c_err=0, s_req=1000, s_err=0, c_p95=0.2, s_p95=0.2, c_wrong=0, s_wrong=0, shadow=(40, 1),
              regress=(), protected=(), seconds=100.0):
    return {"window": {"after_seq": 0, "to_seq": 1, "seconds": seconds, "missed_events": 0},
            "canary": {"requests": c_req, "errors": c_err, "p95_s": c_p95, "users": 3, "wrong": c_wrong, "right": 0},
            "stable": {"requests": s_req, "errors": s_err, "p95_s": s_p95, "users": 40, "wrong": s_wrong, "right": 0},
            "shadow": {"unrelated": {"comparisons": shadow[0], "disagreements": shadow[1]}},
            "probes": {"n": 10, "regressions": list(regress), "protected_regressions": list(protected)}}


def test_binomial_tail_is_the_exact_sum():
    from math import comb

    for x, n, r in [(4, 38, 0.1), (9, 40, 0.1), (0, 10, 0.3), (10, 10, 0.5), (40, 200, 0.1)]:
        exact = sum(comb(n, k) * r**k * (1 - r) ** (n - k) for k in range(x, n + 1))
        assert binomial_p_above(x, n, r) == pytest.approx(min(1.0, exact), rel=1e-9)
    assert binomial_p_above(3, 3000, 0.1) == pytest.approx(1.0)  # no underflow on long windows
    assert binomial_p_above(1, 5, 0.0) == 0.0


def test_two_proportion_test():
    assert two_proportion_p(10, 50, 10, 1000) < 1e-6
    assert 0.4 < two_proportion_p(1, 100, 10, 1000) < 0.6
    assert two_proportion_p(0, 50, 0, 1000) == 1.0 and two_proportion_p(3, 0, 0, 10) == 1.0


@pytest.mark.parametrize("evidence, step, action, failed", [
    (_evidence(), CANARY, "advance", []),
    (_evidence(), LAST, "promote", []),
    (_evidence(c_req=10), CANARY, "wait", []),
    (_evidence(c_req=10, seconds=5000), CANARY, "pause", []),
    (_evidence(c_req=10, regress=["p"]), CANARY, "abort", ["probes"]),  # at once, without waiting for requests
    (_evidence(regress=["p"], protected=["p"]), CANARY, "abort", ["probes"]),
    (_evidence(c_err=6), CANARY, "abort", ["error_rate"]),
    (_evidence(c_err=1, s_err=10), CANARY, "advance", []),  # 1.7 % vs 1 %: within the allowed increase
    (_evidence(c_p95=0.9), CANARY, "abort", ["p95_latency"]),
    (_evidence(c_wrong=8, s_wrong=20), CANARY, "abort", ["wrong_feedback"]),
    (_evidence(c_wrong=2, s_wrong=30), CANARY, "advance", []),
    (_evidence(shadow=(40, 9)), CANARY, "abort", ["shadow"]),
    (_evidence(shadow=(40, 9)), SHADOW, "abort", ["shadow"]),
    (_evidence(shadow=(10, 0)), SHADOW, "wait", []),
    (_evidence(shadow=(10, 0), seconds=5000), SHADOW, "pause", []),
    (_evidence(shadow=(30, 1)), SHADOW, "advance", []),
    # above the 10 % limit but no evidence of it (the scenario's aborts): 4 of 38, 14 of 137
    (_evidence(shadow=(38, 4)), CANARY, "advance", []),
    (_evidence(shadow=(137, 14)), CANARY, "advance", []),
    (_evidence(shadow=(200, 40)), CANARY, "abort", ["shadow"]),
])
def test_decisions_from_recorded_metrics(evidence, step, action, failed):
    pol = HealPolicy()
    d = decide(evidence, pol, step)
    assert d.action == action, d.reason
    assert [c["check"] for c in d.checks if c["status"] == "fail"] == failed
    # replayable: the same decision from the evidence and the policy numbers the audit entry records
    from rankone.heal.rollout import POLICY_KEYS

    recorded = json.loads(json.dumps({"evidence": evidence, "policy": {k: getattr(pol, k) for k in POLICY_KEYS}}))
    assert decide(recorded["evidence"], recorded["policy"], step).to_dict() == d.to_dict()


def test_window_splits_canary_and_stable_by_patch_set_and_leaves_out_pins():
    w = Window(["r1"], ["r1", "s1"], after=10, started=0.0)
    w.add({"head": 20, "first": 5, "events": [
        {"seq": 9, "kind": "request", "arm": "stable", "patches": ["r1"], "status": 200, "latency_s": 1.0, "user": "x"},
        {"seq": 11, "kind": "request", "arm": "candidate", "patches": ["r1", "s1"], "status": 200, "latency_s": 0.1,
         "user": "a"},
        {"seq": 12, "kind": "request", "arm": "candidate", "patches": ["r1", "s1"], "status": 500, "user": "b"},
        {"seq": 13, "kind": "request", "arm": "stable", "patches": ["r1"], "status": 200, "latency_s": 0.2, "user": "c"},
        {"seq": 14, "kind": "request", "arm": "candidate", "patches": ["r1", "s1"], "status": 200, "latency_s": 0.1,
         "pin": "candidate", "user": "rankone-heal"},
        {"seq": 15, "kind": "request", "arm": "none", "patches": [], "status": 400},
        {"seq": 16, "kind": "shadow", "patches": ["r1", "s1"], "scope": "unrelated", "agree": False},
        {"seq": 17, "kind": "shadow", "patches": ["r1", "other"], "scope": "unrelated", "agree": False},
        {"seq": 18, "kind": "feedback", "arm": "candidate", "patches": ["r1", "s1"], "verdict": "wrong"},
        {"seq": 19, "kind": "feedback", "arm": "stable", "patches": ["r1"], "verdict": "right"}]})
    ev = w.evidence(3.0, None)
    assert ev["canary"] == {"requests": 2, "errors": 1, "p95_s": 0.1, "users": 2, "wrong": 1, "right": 0}
    assert ev["stable"] == {"requests": 1, "errors": 0, "p95_s": 0.2, "users": 1, "wrong": 0, "right": 1}
    assert ev["shadow"] == {"unrelated": {"comparisons": 1, "disagreements": 1}}
    w.add({"head": 40, "first": 30, "events": [{"seq": 30, "kind": "request", "arm": "stable", "patches": ["r1"],
                                                "status": 200, "latency_s": 0.3}]})
    assert w.evidence(4.0, None)["window"]["missed_events"] == 10  # the server's log turned over in between


# ---- the server client: retries against a real (tiny) HTTP server --------------------------------


class _Flaky:
    """A real HTTP server on 127.0.0.1 answering a scripted list of statuses, then 200."""

    def __init__(self, statuses):
        import http.server
        import threading

        script, seen = list(statuses), []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                seen.append(self.path)
                code = script.pop(0) if script else 200
                body = json.dumps({"model": "m"} if code == 200 else {"error": {"message": f"status {code}"}}).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.seen = seen
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_the_client_retries_errors_with_back_off_and_gives_up_in_one_line():
    from rankone.heal.client import ServerClient, ServerDown

    waits = []
    srv = _Flaky([503, 502, 429])
    try:
        c = ServerClient(srv.url, "tok", retry_initial_s=0.01, retry_max_s=0.02, retry_total_s=5, sleep=waits.append)
        assert c.status() == {"model": "m"} and c.retries == 3 and len(srv.seen) == 4
        assert waits == [0.01, 0.02, 0.02]  # doubling, capped at retry_max_s
        srv2 = _Flaky([404])
        try:
            with pytest.raises(RankoneError, match="refused GET /api/status: 404 status 404"):
                ServerClient(srv2.url, "tok", sleep=waits.append).status()  # a 4xx is not retried
        finally:
            srv2.close()
        srv3 = _Flaky([500] * 1000)
        try:
            with pytest.raises(ServerDown, match="did not answer GET /api/status for .* \\(last: 500 status 500\\)"):
                ServerClient(srv3.url, "tok", retry_initial_s=0.05, retry_max_s=0.05, retry_total_s=0.3).status()
        finally:
            srv3.close()
    finally:
        srv.close()
    with pytest.raises(RankoneError, match="must be an http"):
        ServerClient("127.0.0.1:8000", "tok")


# ---- the command: bad input is one line and exit 2, before any model loads ------------------------


def test_heal_command_bad_input(tmp_path, capsys, monkeypatch):
    from conftest import run_cli

    from rankone.lifecycle.registry import Registry

    reg = tmp_path / "r.db"
    Registry(reg).close()
    good = _probes(tmp_path, {"prompt": "a b", "expected": "c"})
    bad_probe = tmp_path / "bad.jsonl"
    bad_probe.write_text('{"prompt": "x"}\n')
    bad_policy = tmp_path / "p.json"
    bad_policy.write_text('{"k_users": "three"}')
    monkeypatch.delenv("RANKONE_ADMIN_TOKEN", raising=False)
    cases = [
        (["--registry", reg, "--probes", bad_probe, "--once"], "bad.jsonl:1: a probe needs a non-empty string 'expected'"),
        (["--registry", reg, "--probes", good, "--once", "--policy", bad_policy], "heal policy key k_users must be"),
        (["--registry", tmp_path / "none.db", "--probes", good, "--once"], "no registry at"),
        (["--registry", reg, "--probes", good, "--once", "--max-cycles", "2"], "--max-cycles goes with --watch"),
        (["--registry", reg, "--probes", good, "--once", "--server", "http://127.0.0.1:9"], "needs the server's admin token"),
    ]
    for argv, says in cases:
        code, out, err = run_cli(capsys, "heal", *argv)
        assert code == 2 and says in err and err.count("\n") == 1, (argv, err)
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "heal", "--registry", reg, "--probes", good)
    assert e.value.code == 2 and "one of the arguments --once --watch is required" in capsys.readouterr().err


def test_a_shadow_step_that_needs_no_comparisons_advances():
    d = decide(_evidence(shadow=(0, 0)), HealPolicy(shadow_min_comparisons=0), SHADOW)
    assert d.action == "advance" and d.checks == []
