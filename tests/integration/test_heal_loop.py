"""Feedback and `rankone heal` end to end: a real `rankone serve` in a subprocess on 127.0.0.1, the
`openai` client and httpx as its users, heal in this process (and once in a subprocess, killed).

The tests run in file order against one server and one registry, each leaving the state the
next one expects: reports, a dry run, a heal that releases, a server that is down, a heal
killed mid-rollout and resumed.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from rankone.cli.main import main
from rankone.heal.rollout import decide
from rankone.lifecycle.feedback import FeedbackLog
from rankone.lifecycle.registry import Registry
from rankone.testbed import builtin_model_dir
from serve_tools import SRC, ServerProcess

openai = pytest.importorskip("openai")
NAME = "testbed"
P1 = "Thoutem Nousren was born in"  # answers Dublin; three users say Lisbon
P2 = "Thurber Fokai was born in"  # corrected later, by the heal that is killed (no name piece shared with the traffic)
PROTECTED = "Thathai Nasher Thoutem speaks"  # a protected probe
RIGHT = "Posdrom Stoukthen Thathai speaks"  # the model already answers what its reporters say
TRAFFIC = ["Thathai Nasher Thoutem is a professional player of", "Likdos Nousren Nasher was born in",
           "Thathai Nasher Thoutem was born in", "Posdrom Stoukthen Thathai speaks", P1]
POLICY = {"k_users": 3, "quiet_s": 0, "shadow_percent": 100, "shadow_min_comparisons": 3, "canary_steps": [50, 100],
          "canary_shadow_percent": 50, "min_requests": 4, "poll_s": 0.3, "step_timeout_s": 300, "max_p95_ratio": 3,
          "p95_slack_s": 2.0, "retry_initial_s": 0.2, "retry_max_s": 1.0, "retry_total_s": 30, "watch_interval_s": 1,
          # on this 4-layer toy, whose names share their pieces, a batch edit at layer 0 moves other
          # names' answers (the shadow check aborts it: measured); one rank-one edit per fact does not
          "method_many": "r-rome"}


@dataclass
class World:
    root: Path
    registry: str
    server: ServerProcess
    answers: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="not-a-token", max_retries=0, timeout=60)

    def ask(self, user: str | None, prompt: str, n: int = 4):
        kw = {"user": user} if user is not None else {}
        return self.client().completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, **kw)

    def report(self, body: dict, headers: dict | None = None) -> httpx.Response:
        return httpx.post(self.url + "/v1/feedback", json=body, headers=headers or {}, timeout=30)

    def wrong(self, user: str, prompt: str, correction: str, **extra) -> httpx.Response:
        r = self.ask(user, prompt)
        return self.report({"id": r.id, "verdict": "wrong", "correction": correction, **extra})

    def heal(self, *extra: str, policy: dict | None = None) -> int:
        pol = self.root / "policy.json"
        pol.write_text(json.dumps(dict(POLICY, **(policy or {}))))
        return main(["heal", "--registry", self.registry, "--probes", str(self.root / "probes.jsonl"), "--policy", str(pol),
                     "--admin-token-file", str(self.root / "token"), *extra])

    def dump(self) -> list[str]:
        with sqlite3.connect(self.registry) as db:
            return list(db.iterdump())


class Traffic:
    """One client thread asking the traffic prompts as 20 users, greedily, until stopped."""

    def __init__(self, world: World) -> None:
        self.world, self.stop, self.failed, self.n = world, threading.Event(), [], 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        c = self.world.client()
        while not self.stop.is_set():
            self.n += 1
            try:
                c.completions.create(model=NAME, prompt=TRAFFIC[self.n % len(TRAFFIC)], max_tokens=3, temperature=0,
                                     user=f"t{self.n % 20}")
            except Exception as e:  # noqa: BLE001 - counted, asserted on
                self.failed.append(repr(e))

    def __enter__(self) -> "Traffic":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    reg = str(root / "registry.db")
    Registry(reg).close()
    (root / "token").write_text("s3cret-admin-token\n")
    (root / "reporters.json").write_text(json.dumps({"ops": "ops-token-123"}))
    probes = [{"prompt": PROTECTED, "expected": "Arabic", "protected": True},
              {"prompt": "Thathai Nasher Thoutem is a professional player of", "expected": "volleyball"}]
    (root / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    server = ServerProcess("--model", str(builtin_model_dir()), "--registry", reg, "--admin-token-file", str(root / "token"),
                           "--feedback-tokens-file", str(root / "reporters.json"), "--feedback-per-minute", "5",
                           "--served-model-name", NAME)
    w = World(root, reg, server)
    yield w
    w.server.stop()


def test_feedback_intake_and_its_errors(world):
    r = world.ask("ann", P1)
    assert r.choices[0].text.strip().startswith("Dublin")
    ok = world.report({"id": r.id, "verdict": "wrong", "correction": " Lisbon "})
    assert ok.status_code == 200 and ok.json()["reporter"] == "ann", ok.text
    no_user = world.ask(None, P1)
    other = world.ask("bob", P1)
    cases = [
        (dict(body={"id": r.id, "verdict": "wrong", "correction": "Oslo"}), 409, "duplicate_report"),
        (dict(body={"id": "cmpl-nope", "verdict": "wrong", "correction": "Oslo"}), 404, "unknown_id"),
        (dict(body={"id": other.id, "verdict": "wrong", "correction": "  "}), 400, "empty_correction"),
        (dict(body={"id": other.id, "verdict": "wrong"}), 400, "empty_correction"),
        (dict(body={"id": other.id, "verdict": "maybe", "correction": "Oslo"}), 400, "invalid_type"),
        (dict(body={"id": other.id, "verdict": "right", "correction": "Oslo"}), 400, "invalid_value"),
        (dict(body={"id": other.id, "verdict": "wrong", "correction": "Oslo", "user": "carl"}), 400, "unknown_field"),
        (dict(body={"id": 7, "verdict": "wrong", "correction": "Oslo"}), 400, "invalid_type"),
        (dict(body={"id": other.id, "verdict": "wrong", "correction": "Oslo", "subject": "Carl"}), 400, "invalid_value"),
        (dict(body={"id": no_user.id, "verdict": "wrong", "correction": "Oslo"}), 400, "no_user"),
        (dict(body={"id": other.id, "verdict": "wrong", "correction": "Oslo"}, headers={"X-Rankone-User": "eve"}), 403,
         "not_your_response"),
        (dict(body={"verdict": "wrong", "prompt": P1, "correction": "Oslo"}), 401, "missing_token"),
        (dict(body={"verdict": "wrong", "prompt": P1, "correction": "Oslo"}, headers={"Authorization": "Bearer nope"}),
         403, "invalid_token"),
        (dict(body={"verdict": "wrong", "correction": "Oslo"}, headers={"Authorization": "Bearer ops-token-123"}), 400,
         "invalid_value"),
    ]
    for kw, status, code in cases:
        resp = world.report(kw["body"], kw.get("headers"))
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), (kw, resp.text)
        assert "Traceback" not in resp.text and "\n" not in resp.json()["error"]["message"]
    for raw, code in ((b"{not json", "invalid_json"), (b"[1]", "invalid_json")):
        resp = httpx.post(world.url + "/v1/feedback", content=raw, headers={"content-type": "application/json"})
        assert (resp.status_code, resp.json()["error"]["code"]) == (400, code)
    # per-user rate limit: 5 a minute
    codes = [world.wrong("spammer", P2, f"X{i}").status_code for i in range(6)]
    assert codes == [200] * 5 + [429]
    late = world.wrong("spammer", P2, "X9")
    assert late.headers["retry-after"].isdigit() and late.json()["error"]["type"] == "rate_limit_error"
    # the rest of the scenario's reports
    for u in ("bob", "cid"):
        assert world.wrong(u, P1, "Lisbon", subject="Thoutem Nousren" if u == "bob" else None).status_code == 200
    assert world.wrong("eve", "Thathai Nasher Thoutem was born in", "Mars").status_code == 200  # poison: one user
    for u in ("m1", "m2", "m3"):  # three users against a protected fact
        assert world.wrong(u, PROTECTED, "Hebrew").status_code == 200
    for u in ("r1", "r2", "r3"):  # what the model already says
        assert world.wrong(u, RIGHT, world.ask("x", RIGHT).choices[0].text.split()[0].strip(".,")).status_code == 200
    trusted = world.report({"verdict": "wrong", "prompt": "Likdos Nousren Nasher was born in", "correction": "Toronto",
                            "subject": "Likdos Nousren Nasher"}, {"Authorization": "Bearer ops-token-123"})
    assert trusted.status_code == 200 and trusted.json()["reporter"] == "trusted:ops"
    right = world.ask("dan", "Hello")
    assert world.report({"id": right.id, "verdict": "right"}).status_code == 200
    # stored, with the answer and the arm; counted per arm; the events behind heal's windows
    with FeedbackLog(world.registry) as fb:
        rows = {(x.reporter, x.correction): x for x in fb.reports(None, None)}
    ann = rows[("ann", "Lisbon")]
    assert (ann.prompt, ann.arm, ann.answer.strip()[:6], ann.request_id) == (P1, "stable", "Dublin", r.id)
    assert rows[("trusted:ops", "Toronto")].trusted and rows[("trusted:ops", "Toronto")].request_id is None
    st = httpx.get(world.url + "/api/status").json()
    assert st["feedback"]["stable"]["right"] == 1 and st["feedback"]["stable"]["wrong"] >= 13
    assert st["heal"]["open"][0]["users"] == 3 and {o["prompt"] for o in st["heal"]["open"]} >= {P1, PROTECTED}
    assert 'rankone_feedback_reports_total{arm="stable",verdict="wrong"}' in httpx.get(world.url + "/metrics").text
    page = httpx.get(world.url + "/dashboard").text
    assert 'id="heal-open"' in page and 'id="feedback"' in page
    assert httpx.get(world.url + "/api/events").status_code == 401
    ev = httpx.get(world.url + "/api/events", params={"after": 0}, headers={"Authorization": "Bearer s3cret-admin-token"})
    kinds = {e["kind"] for e in ev.json()["events"]}
    assert kinds == {"request", "feedback"} and "prompt" not in ev.json()["events"][0]


def test_dry_run_prints_the_plan_and_changes_nothing(world, capsys):
    before = world.dump()
    assert world.heal("--server", world.url, "--once", "--dry-run") == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run, nothing changed")
    assert f"{P1!r} -> 'Lisbon' (subject 'Thoutem Nousren', report)" in out
    assert "[protected]" in out and "[already_right]" in out and "[below_k]" in out
    assert "would propose one patch of 2 correction(s) (r-rome)" in out
    assert world.dump() == before


def test_heal_once_triages_refuses_and_releases(world, capsys):
    with Traffic(world) as t:
        assert world.heal("--server", world.url, "--once") == 0
    out = capsys.readouterr().out
    assert t.failed == [] and t.n > 10
    assert "released" in out, out
    assert world.ask("zoe", P1).choices[0].text.strip().startswith("Lisbon")
    assert world.ask("zoe", "Likdos Nousren Nasher was born in").choices[0].text.strip().startswith("Toronto")
    assert world.ask("zoe", PROTECTED).choices[0].text.strip().startswith("Arabic")
    with Registry(world.registry, create=False) as reg:
        (rec,) = reg.released()
        assert rec.added_by == "heal" and "feedback #" in rec.reason and rec.n_edits >= 1
        log = reg.log()
        assert reg.check().ok
    actions = [e.action for e in log]
    assert actions.count("heal-refuse") == 1 and actions.count("heal-drop") == 1
    assert actions[-1] == "promote" and actions.count("heal-decide") == 3  # shadow, 50 %, 100 %
    refuse = next(e for e in log if e.action == "heal-refuse")
    assert "contradicts the protected fact" in refuse.reason and refuse.details["evidence"]["protected"] is True
    for e in log:  # every decision replays from the evidence it recorded
        if e.action == "heal-decide":
            assert decide(e.details["evidence"], e.details["policy"], e.details["step"]).action == e.details["decision"]
    with FeedbackLog(world.registry) as fb:
        status = {(x.reporter, x.prompt): x.status for x in fb.reports(None, "wrong")}
    assert status[("ann", P1)] == "acted" and status[("trusted:ops", "Likdos Nousren Nasher was born in")] == "acted"
    assert status[("m1", PROTECTED)] == "refused" and status[("r1", RIGHT)] == "dropped"
    assert status[("eve", "Thathai Nasher Thoutem was born in")] == "open"  # one user is never enough
    time.sleep(2.5)  # the server reads the heal view at most every 2 s
    view = httpx.get(world.url + "/api/status").json()["heal"]
    assert view["patches"][0]["state"] == "released" and any(r["action"] == "heal-refuse" for r in view["refusals"])
    assert [d["decision"] for d in view["decisions"]] == ["promote", "advance", "advance"]


def test_a_server_that_is_down_is_retried_then_nothing_changes(world, capsys):
    for u in ("k1", "k2", "k3"):
        assert world.wrong(u, P2, "Oslo", subject="Thurber Fokai").status_code == 200
    before = world.dump()
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens there
    t0 = time.monotonic()
    code = world.heal("--server", f"http://127.0.0.1:{port}", "--once", "--model", str(builtin_model_dir()),
                      policy={"retry_total_s": 2})
    err = capsys.readouterr().err
    assert code == 2 and 0.5 < time.monotonic() - t0 < 60  # it retried (back-off from 0.2 s) before giving up
    assert err.count("\n") == 1 and f"the server at http://127.0.0.1:{port} did not answer" in err
    assert world.dump() == before


def test_heal_killed_mid_rollout_resumes_from_the_registry(world):
    pol = world.root / "policy-slow.json"
    pol.write_text(json.dumps(dict(POLICY, min_requests=8)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    log = open(world.root / "heal.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "rankone.cli.main", "heal", "--registry", world.registry, "--probes",
                             str(world.root / "probes.jsonl"), "--policy", str(pol), "--admin-token-file",
                             str(world.root / "token"), "--server", world.url, "--watch"], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 300:  # until it has staged the new patch: then nothing more happens without traffic
            with Registry(world.registry, create=False) as reg:
                staged = reg.staged()
            if staged:
                break
            assert proc.poll() is None, (world.root / "heal.log").read_text()
            time.sleep(0.5)
        assert staged, (world.root / "heal.log").read_text()
        time.sleep(2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    with Registry(world.registry, create=False) as reg:
        assert reg.check().ok
        pid = reg.staged()[0].id
        assert reg.get(pid).state == "staged"
    with Traffic(world):
        assert world.heal("--server", world.url, "--once") == 0
    with Registry(world.registry, create=False) as reg:
        assert reg.get(pid).state == "released" and reg.check().ok
        acts = [e.action for e in reg.log(pid)]
    assert "heal-resume" in acts and acts[-1] == "promote"
    assert world.ask("zoe", P2).choices[0].text.strip().startswith("Oslo")
    assert world.ask("zoe", P1).choices[0].text.strip().startswith("Lisbon")  # the first heal's fact is kept


def test_a_harmful_patch_staged_by_hand_is_aborted_at_its_first_canary_step(world, capsys):
    from rankone.models.load import load_model
    from serve_tools import subject_patch

    m, tok = load_model(str(builtin_model_dir()))
    probe = "Thathai Nasher Thoutem is a professional player of"  # a probe: volleyball
    bad = subject_patch(m, tok, "{} is a professional player of", "Thathai Nasher Thoutem", "chess", scale=50)
    bad.save(world.root / "bad")
    with Registry(world.registry, create=False) as reg:
        rec, _ = reg.add(world.root / "bad", "ana", "a bad patch")
        reg.record_validation(rec.id, {"results": [], "suite": {"sha256": "x"}}, True, "ana")
        reg.stage(rec.id, 50, 0, "ana", "by hand")
    t0 = time.monotonic()
    while rec.id not in json.dumps(httpx.get(world.url + "/api/status").json()["arms"]) and time.monotonic() - t0 < 30:
        time.sleep(0.2)  # until the server serves it (it follows the registry)
    pinned = httpx.post(world.url + "/v1/completions", json={"model": NAME, "prompt": probe, "max_tokens": 3,
                                                             "temperature": 0}, timeout=60,
                        headers={"X-Rankone-Patchset": rec.id, "Authorization": "Bearer s3cret-admin-token"})
    assert not pinned.json()["choices"][0]["text"].strip().startswith("volleyball")  # it is harmful
    assert world.heal("--server", world.url, "--once") == 0  # not adopted: a person's rollout is theirs
    with Registry(world.registry, create=False) as reg:
        assert reg.get(rec.id).state == "staged"
    with Traffic(world):
        assert world.heal("--server", world.url, "--once", policy={"adopt_staged": True}) == 0
    out = capsys.readouterr().out
    with Registry(world.registry, create=False) as reg:
        assert reg.get(rec.id).state == "aborted" and reg.check().ok
        (d,) = [e for e in reg.log(rec.id) if e.action == "heal-decide"]
    assert d.details["decision"] == "abort" and d.details["step"]["index"] == 1 and d.details["step"]["canary"] == 50
    probes = d.details["evidence"]["probes"]  # the subject's other, protected fact falls too
    assert probe in probes["regressions"] and probes["protected_regressions"] == [PROTECTED]
    assert decide(d.details["evidence"], d.details["policy"], d.details["step"]).action == "abort"
    assert "aborted" in out
    t0 = time.monotonic()
    while rec.id in json.dumps(httpx.get(world.url + "/api/status").json()["arms"]) and time.monotonic() - t0 < 30:
        time.sleep(0.2)  # until the server has dropped it (it follows the registry within a second)
    assert world.ask("zoe", probe).choices[0].text.strip().startswith("volleyball")
