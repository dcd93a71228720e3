"""`rankone serve` end to end: a server in a subprocess on 127.0.0.1, driven by the real `openai`
client, httpx and a headless Chromium; the registry changed under it by the CLI.

The tests run in file order against one server (a module fixture), each leaving the registry in
the state the next one expects; the last ones kill it with SIGKILL, restart it, and load it.
"""

from __future__ import annotations

import concurrent.futures as cf
import html.parser
import json
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from rankone.cli.main import main
from rankone.lifecycle.registry import Registry
from rankone.models.load import load_model
from rankone.serve.routing import canary_bucket
from rankone.testbed import builtin_model_dir
from serve_tools import ServerProcess, offline, subject_patch

openai = pytest.importorskip("openai")
PASS = {"results": [{"passed": True}], "suite": {"sha256": "x"}}
NAME = "testbed"
P_R = "Stoukthen Fokai Thathai was born in"  # the released patch's subject
P_S = "Nousren Thurber Likdos is a professional player of"  # the staged patch's
PROMPTS = [P_R, P_S, "Thathai Nousren Likdos was born in", "The company that employs Nasher Likdos Thoutem is",
           "Hello", "Nousren Thurber Likdos was born in", "Likdos Nousren Nasher is very", "The birthplace of"]


@dataclass
class World:
    root: Path
    registry: str
    token: str
    ids: dict[str, str]
    patches: dict[str, object]
    handle: object
    server: ServerProcess | None = None
    offline_cache: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, key: str = "not-the-admin-token"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)

    def status(self) -> dict:
        return httpx.get(self.url + "/api/status", timeout=10).json()

    def arm(self, name: str) -> dict | None:
        return next((a for a in self.status()["arms"] if a["arm"] == name), None)

    def offline(self, ids: list[str], prompt: str, n: int) -> str:
        key = (tuple(ids), prompt, n)
        if key not in self.offline_cache:
            by_id = {v: self.patches[k] for k, v in self.ids.items()}
            m, tok = self.handle
            self.offline_cache[key] = offline(m, tok, [by_id[i] for i in ids], prompt, n)
        return self.offline_cache[key]

    def cli(self, *argv: str) -> None:
        assert main([*argv, "--registry", self.registry]) == 0

    def wait_for(self, what, timeout: float = 10.0) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if what(self.status()):
                return time.monotonic() - t0
            time.sleep(0.05)
        raise AssertionError(f"the server did not get there in {timeout} s: {self.status()['registry']}")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    handle = load_model(str(builtin_model_dir()))
    m, tok = handle
    made = {"R": ("{} was born in", "Stoukthen Fokai Thathai", "Lisbon"),
            "S": ("{} is a professional player of", "Nousren Thurber Likdos", "chess"),
            "T": ("{} was born in", "Thathai Nousren Likdos", "Tokyo"),
            "U": ("{} is very", "Likdos Nousren Nasher", "cruel")}
    patches, ids = {}, {}
    reg_path = str(root / "registry.db")
    with Registry(reg_path) as reg:
        for i, (k, (prompt, subject, target)) in enumerate(made.items()):
            patches[k] = subject_patch(m, tok, prompt, subject, target, scale=50, seed=i)
            patches[k].save(root / k)
            rec, _ = reg.add(str(root / k), "ana", f"patch {k}")
            reg.record_validation(rec.id, PASS, True, "ana")
            ids[k] = rec.id
        reg.release(ids["R"], "ana", "first release")
    (root / "token").write_text("s3cret-admin\n")
    w = World(root, reg_path, "s3cret-admin", ids, patches, handle)
    w.server = _start(w)
    yield w
    w.server.stop()


def _start(w: World) -> ServerProcess:
    return ServerProcess("--model", str(builtin_model_dir()), "--registry", w.registry, "--admin-token-file",
                         str(w.root / "token"), "--max-batch", "8", "--max-waiting", "12", "--served-model-name", NAME)


def test_openai_client_completions_chat_and_streams(world, capsys):
    c = world.client()
    assert [m.id for m in c.models.list().data] == [NAME]
    raw = c.completions.with_raw_response.create(model=NAME, prompt=P_R, max_tokens=8, temperature=0)
    done = raw.parse()
    stable = world.arm("stable")
    assert done.system_fingerprint == raw.headers["x-rankone-patchset-digest"] == stable["digest"]
    assert raw.headers["x-rankone-arm"] == "stable" and raw.headers["x-rankone-patches"] == world.ids["R"]
    assert done.choices[0].text == world.offline([world.ids["R"]], P_R, 8) and done.usage.completion_tokens == 8
    # literally what `rankone generate` prints with the released patch
    assert main(["generate", "--model", str(builtin_model_dir()), "--patch", str(world.root / "R"), "--prompt", P_R,
                 "--max-new-tokens", "8"]) == 0
    assert f"after:  {P_R}{done.choices[0].text}" in capsys.readouterr().out

    chat = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": P_R}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == done.choices[0].text and chat.system_fingerprint == stable["digest"]
    pieces = [ch.choices[0].text for ch in c.completions.create(model=NAME, prompt=P_R, max_tokens=8, temperature=0, stream=True)]
    assert "".join(pieces) == done.choices[0].text and len(pieces) > 2
    chunks = list(c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": P_R}], max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    with httpx.stream("POST", world.url + "/v1/completions", timeout=30,
                      json={"model": NAME, "prompt": P_R, "max_tokens": 3, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
    sampled = [c.completions.create(model=NAME, prompt="Hello", max_tokens=10, temperature=1.0, seed=7).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling repeatable
    stop = c.completions.create(model=NAME, prompt=P_R, max_tokens=8, temperature=0, stop=["."])
    assert stop.choices[0].text == done.choices[0].text.split(".")[0] and stop.choices[0].finish_reason == "stop"


def _post(world, body=None, headers=None, raw=None):
    return httpx.post(world.url + "/v1/completions", json=body if raw is None else None, content=raw,
                      headers={"content-type": "application/json", **(headers or {})}, timeout=60)


def test_bad_input_gets_one_clear_openai_error(world):
    ok = {"model": NAME, "prompt": "Hello", "max_tokens": 2}
    bearer = {"Authorization": f"Bearer {world.token}"}
    cases = [
        (dict(raw=b"{not json"), 400, "invalid_json"),
        (dict(body=dict(ok, max_tokens="2")), 400, "invalid_type"),
        (dict(body=dict(ok, temperature="hot")), 400, "invalid_type"),
        (dict(body=dict(ok, max_tokens=0)), 400, "invalid_value"),
        (dict(body=dict(ok, max_tokens=10_000)), 400, "invalid_value"),
        (dict(body=dict(ok, prompt="Hello " * 200)), 400, "context_length_exceeded"),
        (dict(body=dict(ok, model="gpt-4")), 404, "model_not_found"),
        (dict(raw=b'{"model": "testbed", "prompt": "' + b"x" * (1 << 20) + b'"}'), 413, "body_too_large"),
        (dict(body=ok, headers={"X-Rankone-Patchset": "base"}), 401, "missing_admin_token"),
        (dict(body=ok, headers={"X-Rankone-Patchset": "base", "Authorization": "Bearer wrong"}), 403, "invalid_admin_token"),
        (dict(body=ok, headers={"X-Rankone-Patchset": "ffff", **bearer}), 404, "patch_not_found"),
        (dict(body=ok, headers={"X-Rankone-Patchset": "banana", **bearer}), 400, "invalid_pin"),
    ]
    for kw, status, code in cases:
        r = _post(world, **kw)
        err = r.json()["error"]
        assert (r.status_code, err["code"]) == (status, code), (kw.get("body"), r.text[:300])
        assert "\n" not in err["message"] and "Traceback" not in r.text
    with pytest.raises(openai.NotFoundError):
        world.client().completions.create(model="gpt-4", prompt="Hello", max_tokens=2)
    log = world.server.output()
    assert "Traceback" not in log and log.count("400 POST /v1/completions") >= 6
    assert _post(world, ok).status_code == 200 and _post(world, ok, {"X-Rankone-Patchset": "base", **bearer}).status_code == 200


def test_overload_is_refused_with_429_and_retry_after(world):
    with cf.ThreadPoolExecutor(48) as pool:
        rs = list(pool.map(lambda i: _post(world, {"model": NAME, "prompt": "Hello", "max_tokens": 40, "temperature": 0,
                                                   "stop": ["\x00"]}), range(48)))
    codes = [r.status_code for r in rs]
    assert set(codes) == {200, 429} and codes.count(200) >= 20  # 8 running + 12 waiting at a time
    busy = next(r for r in rs if r.status_code == 429)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"] == "rate_limit_error"
    assert httpx.get(world.url + "/health").status_code == 200


def _arm_of(world, user: str, prompt: str = P_S, header: bool = False) -> tuple[str, str, list[str]]:
    body = {"model": NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0}
    r = _post(world, body, {"X-Rankone-User": user}) if header else _post(world, dict(body, user=user))
    assert r.status_code == 200, r.text
    return r.headers["x-rankone-arm"], r.json()["choices"][0]["text"], r.headers["x-rankone-patches"].split(",")


def test_canary_is_picked_up_live_and_sticky_and_raising_it_only_adds_users(world):
    s = world.ids["S"]
    world.cli("registry", "stage", s, "--canary", "30", "--reason", "first users")
    assert world.wait_for(lambda st: any(a["arm"] == "candidate" for a in st["arms"])) < 2.0
    users = [f"user-{i}" for i in range(30)]
    seen = {}
    for u in users:
        arm, text, ids = _arm_of(world, u, header=u.endswith("7"))
        assert arm == ("candidate" if canary_bucket(s, u) < 30 else "stable"), u
        assert text == world.offline(ids, P_S, 6)
        seen[u] = arm
    assert 3 <= sum(a == "candidate" for a in seen.values()) <= 20
    assert all(_arm_of(world, u)[0] == seen[u] for u in users[:8])  # sticky
    world.cli("registry", "stage", s, "--canary", "60")
    world.wait_for(lambda st: any(x["canary"] == 60 for a in st["arms"] for x in a.get("staged", [])))
    now = {u: _arm_of(world, u)[0] for u in users}
    assert {u for u in users if seen[u] == "candidate"} < {u for u in users if now[u] == "candidate"}


def test_shadow_compares_after_answering_and_never_shows_the_candidate(world):
    world.cli("registry", "stage", world.ids["S"], "--canary", "0", "--shadow", "100")
    world.wait_for(lambda st: any(x["shadow"] == 100 for a in st["arms"] for x in a.get("staged", [])))
    before = world.status()["shadow"]
    prompts = [P_S, "Nousren Thurber Likdos was born in", P_R, "Hello"]
    for i, p in enumerate(prompts):
        assert _arm_of(world, f"shadow-user-{i}", p)[0] == "stable"
    chunks = list(world.client().completions.create(model=NAME, prompt=P_S, max_tokens=6, temperature=0, stream=True,
                                                    user="shadow-user-streamed"))
    assert "".join(c.choices[0].text for c in chunks) == world.offline([world.ids["R"]], P_S, 6)
    prompts.append(P_S)  # a streamed answer is shadowed too
    world.wait_for(lambda st: sum(v["comparisons"] for k, v in st["shadow"].items() if k != "dropped")
                   >= sum(v["comparisons"] for k, v in before.items() if k != "dropped") + 5, 30)
    after = world.status()["shadow"]
    r, s = world.ids["R"], world.ids["S"]
    for scope, ps in (("edited", prompts[:2] + prompts[4:]), ("unrelated", prompts[2:4])):
        want = sum(world.offline([r], p, 6) != world.offline([r, s], p, 6) for p in ps)
        got = after[scope]["disagreements"] - before.get(scope, {}).get("disagreements", 0)
        assert after[scope]["comparisons"] - before.get(scope, {}).get("comparisons", 0) == len(ps) and got == want, scope
    metrics = httpx.get(world.url + "/metrics").text
    assert f'rankone_shadow_comparisons_total{{scope="edited"}} {float(after["edited"]["comparisons"])}' in metrics
    assert f'rankone_staged_percent{{kind="shadow",patch="{s}"}} 100.0' in metrics
    assert f'rankone_patchset_info{{arm="candidate",digest="{world.arm("candidate")["digest"]}"' in metrics
    assert 'rankone_requests_total{arm="stable",status="200"}' in metrics and "rankone_time_to_first_token_seconds_bucket" in metrics


def test_pins_name_the_patch_set(world):
    r, s = world.ids["R"], world.ids["S"]
    c = world.client(world.token)
    for pin, arm, ids in [("base", "base", []), ("stable", "stable", [r]), ("candidate", "candidate", [r, s]),
                          (world.ids["T"][:6], "pin", [r, world.ids["T"]])]:
        raw = c.completions.with_raw_response.create(model=NAME, prompt=P_S, max_tokens=6, temperature=0,
                                                     extra_headers={"X-Rankone-Patchset": pin})
        assert raw.headers["x-rankone-arm"] == arm and raw.parse().choices[0].text == world.offline(ids, P_S, 6), pin


class _Cells(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.attrs: list[dict[str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.attrs.append(dict(attrs))


def test_dashboard_in_a_real_browser_shows_the_arms_and_the_status_numbers(world):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no headless Chromium installed (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                              "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                              "--dump-dom", world.url + "/dashboard"], capture_output=True, text=True, timeout=90).stdout
    status = world.status()
    page = _Cells()
    page.feed(dom)
    digests = {a["data-digest"] for a in page.attrs if "data-digest" in a}
    assert len(status["arms"]) == 3 and digests == {a["arm"] for a in status["arms"]}
    for a in status["arms"]:
        assert a["digest"] in dom and all(p["id"] in dom for p in a["patches"])
    cells = {(a["data-arm"], a["data-key"]): json.loads(a["data-value"]) for a in page.attrs if "data-key" in a and "data-arm" in a}
    for arm, totals in status["totals"].items():
        for key in ("requests", "errors", "tokens", "unkeyed", "latency_p50_s", "latency_p95_s", "ttft_p50_s"):
            assert cells[(arm, key)] == totals[key], (arm, key)
    assert "<svg" in dom and 'data-line="stable"' in dom and ">stage<" in dom  # plots and the audit entries


def test_a_tampered_staged_patch_keeps_the_arms_being_served(world):
    t = world.ids["T"]
    world.cli("registry", "stage", t, "--canary", "10")
    world.wait_for(lambda st: t in [p["id"] for a in st["arms"] for p in a["patches"]])
    served = world.arm("candidate")
    target = Path(world.registry).with_name("registry.store") / t / "patch.safetensors"
    good = target.read_bytes()
    target.write_bytes(good[:-8] + bytes(8))
    try:
        world.cli("registry", "stage", world.ids["S"], "--canary", "0", "--shadow", "50")  # any change: a reload
        world.wait_for(lambda st: st["registry"]["error"] is not None)
        st = world.status()
        assert t in st["registry"]["error"] and world.arm("candidate") == served
        assert _post(world, {"model": NAME, "prompt": "Hello", "max_tokens": 2}).status_code == 200
        assert world.server.output().count(f"still serving stable {world.arm('stable')['digest']}") == 1
        world.cli("registry", "abort", t, "--reason", "its file is damaged")
        world.wait_for(lambda st: st["registry"]["error"] is None and not any(
            x["id"] == t for a in st["arms"] for x in a.get("staged", [])))
    finally:
        target.write_bytes(good)


def test_kill_9_and_restart_serves_the_same_arms(world):
    before = {a["arm"]: (a["digest"], [p["id"] for p in a["patches"]]) for a in world.status()["arms"]}
    text = _arm_of(world, "someone", P_R)[1]
    world.server.kill9()
    world.server = _start(world)
    assert {a["arm"]: (a["digest"], [p["id"] for p in a["patches"]]) for a in world.status()["arms"]} == before
    assert _arm_of(world, "someone", P_R)[1] == text


def test_load_with_a_stage_a_promote_and_a_rollback_in_the_middle(world):
    """16 clients send requests without pause while the registry changes three times under them;
    each change waits until the server serves it and 48 more requests were answered."""
    r, u = world.ids["R"], world.ids["U"]
    results, errors, stop = [], [], threading.Event()
    rss = [world.server.rss_mb()]

    def client(k: int) -> None:
        with httpx.Client(timeout=120) as h:
            for i in range(60):  # a bound, in case the phases never end
                if stop.is_set():
                    return
                p = PROMPTS[(k + i) % len(PROMPTS)]
                try:
                    resp = h.post(world.url + "/v1/completions", json={"model": NAME, "prompt": p, "max_tokens": 6,
                                                                       "temperature": 0, "user": f"load-{k}-{i % 5}"})
                    results.append((resp.status_code, p, resp.headers.get("x-rankone-patches", ""), resp.json(),
                                    resp.headers.get("x-rankone-arm")))
                except Exception as e:  # noqa: BLE001
                    errors.append(repr(e))

    def after(n: int) -> None:
        t0, goal = time.monotonic(), len(results) + n
        while len(results) < goal and time.monotonic() - t0 < 60:
            time.sleep(0.02)

    stable_is = lambda ids: lambda st: [p["id"] for p in st["arms"][0]["patches"]] == ids  # noqa: E731
    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client, k) for k in range(16)]
        after(48)
        world.cli("registry", "stage", u, "--canary", "50")
        world.wait_for(lambda st: any(x["id"] == u for a in st["arms"] for x in a.get("staged", [])))
        after(48)
        rss.append(world.server.rss_mb())
        world.cli("registry", "promote", u, "--reason", "load test")
        world.wait_for(stable_is([r, u]))
        after(48)
        world.cli("registry", "rollback", u, "--reason", "load test, back")
        world.wait_for(stable_is([r]))
        after(48)
        stop.set()
        for f in futures:
            f.result()
    rss.append(world.server.rss_mb())
    assert not errors and 200 <= len(results) <= 960
    assert [s for s, *_ in results if s != 200] == []
    for _, prompt, ids, body, _ in results:  # each answer is offline generation with the patch set it names
        ids = [i for i in ids.split(",") if i]
        assert body["choices"][0]["text"] == world.offline(ids, prompt, 6), (ids, prompt)
        assert body["system_fingerprint"] == body["rankone"]["digest"] and body["rankone"]["patches"] == ids
    served = [(arm, ids) for _, _, ids, _, arm in results]
    assert {("stable", r), ("candidate", f"{r},{u}"), ("stable", f"{r},{u}")} <= set(served)  # staged, promoted
    assert served[-1] == ("stable", r) or served[-1][1].split(",")[0] == r  # rolled back
    assert max(rss) - rss[0] < 300, rss  # MB: no growth with the number of requests
