"""Self-healing on live traffic (issue 26): facts change in the world, users say so, `rankone heal`
fixes the model with nobody typing a command.

    python benchmarks/heal_scenario.py [--model smollm2-135m] [--cases ../shared/data/counterfact/counterfact-edit.json]
        [--stats-corpus ../shared/data/text/tinyshakespeare.txt] [--facts 200] [--changed 40] [--users 50]
        [--out runs/heal_scenario] [--max-minutes 110] [--no-write] [--report-only] [--note TEXT]

`rankone serve` serves the model from an empty registry; `rankone heal --watch` runs beside it
from the start. This process is only the world and its users, through the `openai` client (and
httpx for POST /v1/feedback, which the client lacks):

  - `--facts` CounterFact facts the unedited model knows (its greedy answer on the prompt starts
    with the true object), asked by `--users` simulated users on their prompts and paraphrases
    (`--clients` threads, at most `--rate` requests/s, bounded by `--max-requests` and `--max-minutes`);
  - `--changed` of them change in the world (their `target_new` becomes the truth): each is
    reported `wrong` with the new answer by 3 or 4 distinct users; for `--no-subject` of them no
    report names the subject, for the rest some do;
  - poisoned reports: `--poison-single` corrections by one user each, and `--poison-protected`
    corrections of protected facts, each by 3 users;
  - users also report a wrong answer to a main prompt with probability `--report-prob`;
  - once heal has released its patch, a deliberately harmful patch (AlphaEdit rewriting `--bad`
    probed facts to wrong answers) is forced onto a 5 % canary, past the gates.

Measured on the released model (greedy, through the server): changed facts fixed on the prompt and
on the paraphrase; poisoned corrections applied; unreported facts whose answer (first word)
changed; held-out perplexity before/after; time from the last report to the release; failed
requests; whether the bad candidate was aborted, at which step, and how many users it reached;
the audit log's story of one fact. Targets: ≥ 0.9 fixed, 0 poisoned, ≥ 0.95 unchanged,
perplexity within 5 %, 0 failed requests, the bad candidate aborted at its first canary step.

Resumable: everything lives in `--out` (the registry, facts, the request log); a rerun restarts
the server and heal (heal resumes from the registry) and sends only the reports not yet sent.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _report import publish, shown, table  # noqa: E402
from serve_tools import SRC, ServerProcess  # noqa: E402

NAME = "smollm2"
TOKEN = "heal-scenario-admin-token"


def model_dir(name: str) -> Path:
    if Path(name).is_dir():
        return Path(name)
    from rankone.models.zoo import real_model_dir

    return real_model_dir(name)


def _save(path: Path, obj: Any) -> None:
    from rankone.core.atomic import write_json

    write_json(path, obj)


# ---- preparing the world ------------------------------------------------------------------------


def known_facts(handle: Any, cases: list[dict[str, Any]], n: int, batch: int = 32) -> list[dict[str, Any]]:
    """The first n cases whose greedy answer on the prompt starts with the true object (batched
    generation to scan, then confirmed one by one with `greedy`, exactly as heal and the gates read)."""
    import torch

    from rankone.models.generation import greedy, says

    tok, model = handle.tokenizer, handle.model
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    out = []
    for i in range(0, len(cases), batch):
        chunk = cases[i:i + batch]
        enc = tok([c["prompt"] for c in chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
        for c, row in zip(chunk, gen[:, enc["input_ids"].shape[1]:]):
            if says(tok.decode(row, skip_special_tokens=True), c["ground_truth"]) and \
                    says(greedy(model, tok, c["prompt"], 3), c["ground_truth"]):
                out.append(c)
        print(f"  scanned {min(i + batch, len(cases))} cases: {len(out)} known", flush=True)
        if len(out) >= n:
            return out[:n]
    raise SystemExit(f"only {len(out)} of the cases are known by the model; lower --facts")


def prepare(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Facts, roles, probes, policy, held-out text, the bad patch and an empty registry (once)."""
    world_f = out / "world.json"
    if world_f.exists():
        return json.loads(world_f.read_text())
    import torch

    from rankone.core.tokens import EditRequest
    from rankone.edit.editor import Editor
    from rankone.lifecycle.registry import Registry
    from rankone.models.generation import greedy, perplexity
    from rankone.models.load import load_model

    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    handle = load_model(str(model_dir(args.model)))
    cases = json.loads(Path(args.cases).read_text())
    print(f"finding {args.facts} facts the model knows ...", flush=True)
    facts = known_facts(handle, cases, args.facts)
    rng = random.Random(args.seed)
    idx = list(range(len(facts)))
    rng.shuffle(idx)
    take = lambda n: [idx.pop() for _ in range(n)]  # noqa: E731
    roles = {"changed": take(args.changed), "protected": take(args.protected), "bad": take(args.bad),
             "probed": take(args.probe_sample), "poison_single": take(args.poison_single)}
    roles["no_subject"] = roles["changed"][: args.no_subject]
    protected_poison = roles["protected"][: args.poison_protected]
    heldout = Path(args.stats_corpus).read_text(encoding="utf-8", errors="replace")[-args.heldout_chars:]
    (out / "heldout.txt").write_text(heldout)
    print("the unedited model's answers ...", flush=True)
    base = [{"prompt": greedy(handle.model, handle.tokenizer, f["prompt"], 4),
             "para": greedy(handle.model, handle.tokenizer, f["rephrase_prompt"], 4)} for f in facts]
    ppl = perplexity(handle.model, handle.tokenizer, heldout)
    probes = [{"prompt": facts[i]["prompt"], "expected": facts[i]["ground_truth"], "subject": facts[i]["subject"],
               "protected": True} for i in roles["protected"]]
    probes += [{"prompt": facts[i]["prompt"], "expected": facts[i]["ground_truth"], "subject": facts[i]["subject"]}
               for i in roles["bad"] + roles["probed"]]
    (out / "probes.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    policy = {
        "_what": "the scenario's heal policy (benchmarks/heal_scenario.py)",
        "k_users": 3, "quiet_s": args.quiet_s, "max_wait_s": 900, "adopt_staged": True, "recompute_missed": False,
        "stats_corpus": str(Path(args.stats_corpus).resolve()), "heldout_text": "heldout.txt",
        "heldout_chars": args.heldout_chars, "hparams": {m: {"stats_tokens": args.stats_tokens}
                                                          for m in ("alphaedit", "r-rome")},
        "probe_sample": args.probe_sample + args.bad, "max_probe_regressions": args.max_probe_regressions,
        "shadow_percent": 50, "shadow_min_comparisons": 30, "canary_steps": [5, 25, 100], "canary_shadow_percent": 20,
        "min_requests": args.min_requests, "step_timeout_s": 1800, "poll_s": 3, "watch_interval_s": 10,
        **json.loads(args.policy_extra)}
    _save(out / "policy.json", policy)
    print(f"the harmful patch: {args.bad} probed facts rewritten ...", flush=True)
    bad = Editor(handle, {"method": "alphaedit", "stats_tokens": args.stats_tokens}, args.stats_corpus, progress=False)
    patch = bad.edit([EditRequest.create(facts[i]["prompt"], facts[i]["subject"], facts[i]["target_new"])
                      for i in roles["bad"]], author="scenario", reason="a deliberately harmful update")
    patch.save(out / "bad_patch", overwrite=True)
    Registry(out / "registry.db").close()
    (out / "token").write_text(TOKEN + "\n")
    world = {"facts": facts, "roles": roles, "protected_poison": protected_poison, "base": base, "ppl_before": ppl,
             "model": str(model_dir(args.model))}
    _save(world_f, world)
    return world


# ---- users ----------------------------------------------------------------------------------------


class Users:
    """The simulated users: background traffic and scheduled reports, through the openai client."""

    def __init__(self, args: argparse.Namespace, out: Path, world: dict[str, Any], url: str) -> None:
        import openai

        self.args, self.out, self.world, self.url = args, out, world, url
        self.facts = world["facts"]
        self.truth = [f["ground_truth"] for f in self.facts]
        for i in world["roles"]["changed"]:
            self.truth[i] = self.facts[i]["target_new"]
        self.users = [f"u{k:02d}" for k in range(args.users)]
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="not-the-admin-token", max_retries=0, timeout=120)
        self.http = httpx.Client(timeout=60)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.log = open(out / "requests.jsonl", "a")
        self.sent = {json.loads(x)["key"] for x in (out / "reports.jsonl").read_text().splitlines()} \
            if (out / "reports.jsonl").exists() else set()
        self.reports_log = open(out / "reports.jsonl", "a")
        self.queue = self._schedule()
        self.rng = random.Random(args.seed + 1)
        self.n = sum(1 for _ in open(out / "requests.jsonl"))
        self.next_t = time.monotonic()
        self.t0 = time.time()

    def _schedule(self) -> list[dict[str, Any]]:
        """Every scheduled report: (key, user, fact, correction, subject), in a seeded order."""
        rng = random.Random(self.args.seed + 2)
        w, out = self.world, []
        for i in w["roles"]["changed"]:
            f = self.facts[i]
            for k, u in enumerate(rng.sample(self.users, rng.choice([3, 4]))):
                give = i not in w["roles"]["no_subject"] and (k == 0 or rng.random() < 0.5)
                out.append({"key": f"changed:{i}:{u}", "user": u, "fact": i, "correction": f["target_new"],
                            "subject": f["subject"] if give else None, "kind": "changed"})
        for i in w["roles"]["poison_single"]:
            out.append({"key": f"poison:{i}", "user": rng.choice(self.users), "fact": i,
                        "correction": self.facts[i]["target_new"], "subject": None, "kind": "poison_single"})
        for i in w["protected_poison"]:
            for u in rng.sample(self.users, 3):
                out.append({"key": f"protected:{i}:{u}", "user": u, "fact": i, "correction": self.facts[i]["target_new"],
                            "subject": self.facts[i]["subject"], "kind": "poison_protected"})
        rng.shuffle(out)
        spread = self.args.report_minutes * 60
        for k, r in enumerate(out):
            r["due"] = spread * k / max(1, len(out))
        return [r for r in out if r["key"] not in self.sent]

    def _ask(self, user: str, prompt: str) -> tuple[Any, dict[str, Any]]:
        t = time.time()
        rec: dict[str, Any] = {"t": t, "user": user, "prompt": prompt}
        try:
            raw = self.client.completions.with_raw_response.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0,
                                                                   user=user)
            r = raw.parse()
            rec.update(ok=True, id=r.id, text=r.choices[0].text, patches=raw.headers.get("x-rankone-patches", ""),
                       arm=raw.headers.get("x-rankone-arm"), latency=time.time() - t)
            return r, rec
        except Exception as e:  # noqa: BLE001 - a failed request is what this benchmark counts
            rec.update(ok=False, error=f"{type(e).__name__}: {' '.join(str(e).split())[:200]}")
            return None, rec
        finally:
            with self.lock:
                self.n += 1
                self.log.write(json.dumps(rec) + "\n")
                self.log.flush()

    def _report(self, r: Any, correction: str, subject: str | None) -> int:
        body = {"id": r.id, "verdict": "wrong", "correction": correction} | ({"subject": subject} if subject else {})
        try:
            return self.http.post(self.url + "/v1/feedback", json=body).status_code
        except httpx.HTTPError:
            return 0

    def _pace(self) -> None:
        with self.lock:
            self.next_t = max(self.next_t + 1.0 / self.args.rate, time.monotonic())
            wait = self.next_t - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def _one(self) -> None:
        due = None
        with self.lock:
            if self.queue and self.queue[0]["due"] <= time.time() - self.t0:
                due = self.queue.pop(0)
        if due is not None:
            from rankone.models.generation import says

            f = self.facts[due["fact"]]
            r, rec = self._ask(due["user"], f["prompt"])
            code = self._report(r, due["correction"], due["subject"]) if r is not None and \
                not says(r.choices[0].text, due["correction"]) else None
            with self.lock:
                self.reports_log.write(json.dumps(dict(due, t=time.time(), status=code)) + "\n")
                self.reports_log.flush()
            return
        i = self.rng.randrange(len(self.facts))
        main = self.rng.random() < 0.7
        f = self.facts[i]
        user = self.rng.choice(self.users)
        r, rec = self._ask(user, f["prompt"] if main else f["rephrase_prompt"])
        if r is not None and main and self.rng.random() < self.args.report_prob:
            from rankone.models.generation import says

            if not says(r.choices[0].text, self.truth[i]):
                code = self._report(r, self.truth[i], None)
                with self.lock:
                    self.reports_log.write(json.dumps({"key": f"bg:{self.n}", "user": user, "fact": i, "t": time.time(),
                                                       "correction": self.truth[i], "kind": "background",
                                                       "status": code}) + "\n")
                    self.reports_log.flush()

    def run(self) -> None:
        def worker() -> None:
            while not self.stop.is_set() and self.n < self.args.max_requests:
                self._pace()
                self._one()
        self.threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.args.clients)]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=180)
        self.log.close()
        self.reports_log.close()
        self.http.close()


# ---- the run --------------------------------------------------------------------------------------


def _registry_state(out: Path) -> dict[str, Any]:
    from rankone.lifecycle.feedback import FeedbackLog
    from rankone.lifecycle.registry import Registry

    k = json.loads((out / "policy.json").read_text()).get("k_users", 3)
    with FeedbackLog(out / "registry.db") as fb:
        most = fb.open_by_fact(limit=1)  # the open correction with the most distinct users
    with Registry(out / "registry.db", create=False) as reg:
        recs = reg.list()
    return {"heal": [(r.id, r.state) for r in recs if r.added_by == "heal"],
            "bad": [(r.id, r.state) for r in recs if r.added_by == "scenario"],
            "actionable": bool(most) and most[0]["users"] >= k}


def _start_heal(args: argparse.Namespace, out: Path, url: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = open(out / "heal.log", "a")
    return subprocess.Popen([sys.executable, "-m", "rankone.cli.main", "heal", "--registry", str(out / "registry.db"),
                             "--probes", str(out / "probes.jsonl"), "--policy", str(out / "policy.json"),
                             "--server", url, "--admin-token-file", str(out / "token"), "--model", args.model_dir,
                             "--watch"], stdout=log, stderr=subprocess.STDOUT, env=env)


def inject_bad(out: Path) -> str:
    """The harmful patch, registered and forced past the gates onto a 5 % canary (by the scenario, not heal)."""
    from rankone.lifecycle.registry import Registry

    with Registry(out / "registry.db", create=False) as reg:
        rec, _ = reg.add(out / "bad_patch", actor="scenario", reason="a deliberately harmful update (the scenario's)")
        if rec.state == "proposed":
            reg.record_validation(rec.id, {"results": [], "suite": {"sha256": "none"}, "forced": True}, True,
                                  actor="scenario", reason="forced past the gates to show the automatic abort")
        if rec.state in ("proposed", "validated"):
            reg.stage(rec.id, 5, 0, actor="scenario", reason="forced onto the canary to show the automatic abort")
        return rec.id


def run(args: argparse.Namespace, out: Path, world: dict[str, Any]) -> dict[str, Any]:
    args.model_dir = world["model"]
    server = ServerProcess("--model", world["model"], "--registry", str(out / "registry.db"), "--admin-token-file",
                           str(out / "token"), "--served-model-name", NAME, "--max-batch", "16", "--max-waiting", "256",
                           threads=args.threads)
    heal = users = None
    t_start = time.time()
    phases: dict[str, Any] = json.loads((out / "phases.json").read_text()) if (out / "phases.json").exists() else {}
    try:
        heal = _start_heal(args, out, server.url)
        users = Users(args, out, world, server.url)
        users.run()
        deadline = t_start + args.max_minutes * 60
        while time.time() < deadline:  # until heal has released (or given up on) the changed facts
            st = _registry_state(out)
            in_flight = any(s in ("proposed", "validated", "staged") for _, s in st["heal"])
            # done: a heal patch out, none in flight, and no correction with K users still open (a
            # rejected patch's corrections are reopened and retried in halves)
            if st["heal"] and not in_flight and not st["actionable"] and not users.queue:
                break
            if heal.poll() is not None:
                raise SystemExit(f"rankone heal exited with {heal.returncode}; see {out / 'heal.log'}")
            time.sleep(5)
        phases.setdefault("healed_at", time.time())
        # the harmful candidate gets its own --bad-minutes: once no heal patch is on the canary (it
        # would share the candidate arm), it is forced onto a 5 % canary for heal to guard
        deadline = time.time() + args.bad_minutes * 60
        while time.time() < deadline and "bad" not in phases \
                and any(s == "staged" for _, s in _registry_state(out)["heal"]):
            time.sleep(3)
        st = _registry_state(out)
        if any(s == "released" for _, s in st["heal"]) and "bad" not in phases \
                and not any(s == "staged" for _, s in st["heal"]):
            phases["bad"] = inject_bad(out)
            phases["bad_at"] = time.time()
            _save(out / "phases.json", phases)
        while time.time() < deadline and phases.get("bad"):
            if any(s in ("released", "aborted", "rolled_back") for _, s in _registry_state(out)["bad"]):
                break
            time.sleep(3)
        _save(out / "phases.json", phases)
    finally:
        if users is not None:
            users.close()
        if heal is not None and heal.poll() is None:
            heal.send_signal(signal.SIGINT)
            try:
                heal.wait(timeout=120)
            except subprocess.TimeoutExpired:
                heal.kill()
    try:
        return measure(args, out, world, server.url)
    finally:
        server.stop()


def measure(args: argparse.Namespace, out: Path, world: dict[str, Any], url: str) -> dict[str, Any]:
    import openai

    from rankone.models.generation import says

    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=3, timeout=120)
    facts = world["facts"]
    ans = [{"prompt": c.completions.create(model=NAME, prompt=f["prompt"], max_tokens=4, temperature=0,
                                           user="measure").choices[0].text,
            "para": c.completions.create(model=NAME, prompt=f["rephrase_prompt"], max_tokens=4, temperature=0,
                                         user="measure").choices[0].text} for f in facts]
    _save(out / "answers_after.json", ans)
    roles = world["roles"]
    reports = [json.loads(x) for x in (out / "reports.jsonl").read_text().splitlines()]
    reported = {r["fact"] for r in reports if r.get("status") == 200}
    changed = roles["changed"]
    fixed_p = [i for i in changed if says(ans[i]["prompt"], facts[i]["target_new"])]
    fixed_pp = [i for i in changed if says(ans[i]["para"], facts[i]["target_new"])]
    poisoned = [i for i in roles["poison_single"] + world["protected_poison"]
                if says(ans[i]["prompt"], facts[i]["target_new"])]
    unreported = [i for i in range(len(facts)) if i not in reported and i not in changed]
    first = lambda t: (t.strip().split() or [""])[0].strip(".,;:!?\"'").lower()  # noqa: E731
    moved = [i for i in unreported if first(ans[i]["prompt"]) != first(world["base"][i]["prompt"])]
    reqs = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    failed = [r for r in reqs if not r["ok"]]
    registry = _audit(out)
    return {"n_facts": len(facts), "changed": len(changed), "fixed_prompt": len(fixed_p), "fixed_para": len(fixed_pp),
            "fixed_both": len(set(fixed_p) & set(fixed_pp)), "no_subject": roles["no_subject"],
            "no_subject_fixed": len([i for i in roles["no_subject"] if i in fixed_p]),
            "para_known_before": sum(says(world["base"][i]["para"], facts[i]["ground_truth"]) for i in range(len(facts))),
            "poisoned_applied": len(poisoned), "poisoned_total": len(roles["poison_single"]) + len(world["protected_poison"]),
            "unreported": len(unreported), "unreported_moved": len(moved),
            "moved_examples": [(facts[i]["prompt"], world["base"][i]["prompt"], ans[i]["prompt"]) for i in moved[:5]],
            "requests": len(reqs), "failed": len(failed), "failed_examples": [r["error"] for r in failed[:3]],
            "reports_sent": sum(r.get("status") == 200 for r in reports),
            "reports_refused": {str(k): sum(r.get("status") == k for r in reports) for k in (400, 404, 409, 429)},
            "bad_users": sorted({r["user"] for r in reqs if r["ok"] and registry.get("bad_id")
                                 and registry["bad_id"] in (r.get("patches") or "")}),
            "ppl_before": world["ppl_before"], "ppl_after": _ppl_after(args, out, world), **registry}


def _ppl_after(args: argparse.Namespace, out: Path, world: dict[str, Any]) -> float:
    import torch

    from rankone.artifacts.patch import apply_patch
    from rankone.lifecycle.registry import Registry
    from rankone.models.generation import perplexity
    from rankone.models.load import load_model

    torch.set_num_threads(args.threads)
    handle = load_model(world["model"])
    with Registry(out / "registry.db", create=False) as reg:
        apply_patch(handle.model, [reg.load_patch(r.id) for r in reg.released()])
    return perplexity(handle.model, handle.tokenizer, (out / "heldout.txt").read_text())


def _audit(out: Path) -> dict[str, Any]:
    """The registry's story: the heal patch, its timings, the bad candidate's fate, one fact's history."""
    from rankone.lifecycle.registry import Registry

    with Registry(out / "registry.db", create=False) as reg:
        log = reg.log()
        heal = [r for r in reg.list() if r.added_by == "heal"]
        bad = [r for r in reg.list() if r.added_by == "scenario"]
    db = sqlite3.connect(out / "registry.db")
    db.row_factory = sqlite3.Row
    fb = [dict(r) for r in db.execute("SELECT id, at, reporter, prompt, correction, subject, status, patch_id, note "
                                      "FROM feedback ORDER BY id")]
    db.close()
    rel = next((r for r in heal if r.state == "released"), None)
    res: dict[str, Any] = {"heal_patches": [(r.id, r.state, r.n_edits) for r in heal],
                           "actions": {a: sum(e.action == a for e in log) for a in sorted({e.action for e in log})}}
    if rel is not None:
        acted = [f for f in fb if f["patch_id"] == rel.id]
        promote = next(e for e in log if e.patch_id == rel.id and e.action == "promote")
        last = max(f["at"] for f in acted) if acted else None
        res.update(released=rel.id, released_edits=rel.n_edits, last_report_at=last, released_at=promote.at,
                   report_to_release_s=_secs(last, promote.at) if last else None,
                   heal_steps=[(e.seq, e.at, e.action, (e.reason or "")[:160]) for e in log
                               if e.patch_id == rel.id])
        fact = acted[0]["prompt"] if acted else None
        res["story"] = {"prompt": fact, "reports": [(f["id"], f["at"], f["reporter"], f["correction"], f["status"])
                                                    for f in fb if f["prompt"] == fact],
                        "audit": [(e.seq, e.at, e.actor, e.action, (e.reason or "")[:140]) for e in log
                                  if e.seq <= promote.seq and (e.patch_id == rel.id or fact in json.dumps(e.details))]}
    if bad:
        b = bad[0]
        dec = [e for e in log if e.patch_id == b.id and e.action == "heal-decide"]
        res.update(bad_id=b.id, bad_state=b.state, bad_decisions=[(e.details["step"]["kind"], e.details["step"]["index"],
                                                                   e.details["decision"], (e.reason or "")[:200])
                                                                  for e in dec])
    res["skipped"] = [(f["prompt"], f["note"]) for f in fb if f["status"] == "skipped"][:10]
    res["feedback_status"] = {s: sum(f["status"] == s for f in fb) for s in sorted({f["status"] for f in fb})}
    return res


def _secs(a: str, b: str) -> float:
    from datetime import datetime

    t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()  # noqa: E731
    return t(b) - t(a)


# ---- the report -----------------------------------------------------------------------------------


def report(args: argparse.Namespace, out: Path, r: dict[str, Any], world: dict[str, Any]) -> str:
    ch = r["changed"]
    rows = [
        ["changed facts fixed on the prompt", f"{r['fixed_prompt']}/{ch} = {r['fixed_prompt'] / ch:.2f}", "≥ 0.9"],
        ["changed facts fixed on the paraphrase", f"{r['fixed_para']}/{ch} = {r['fixed_para'] / ch:.2f}", "(≥ 0.9 with the prompt)"],
        ["poisoned corrections applied", f"{r['poisoned_applied']} of {r['poisoned_total']}", "0"],
        ["unreported facts whose answer changed", f"{r['unreported_moved']}/{r['unreported']} "
         f"(unchanged {1 - r['unreported_moved'] / max(1, r['unreported']):.3f})", "≥ 0.95 unchanged"],
        ["held-out perplexity before → after", f"{r['ppl_before']:.2f} → {r['ppl_after']:.2f} "
         f"({r['ppl_after'] / r['ppl_before'] - 1:+.1%})", "within 5 %"],
        ["time from the last report to release", f"{r['report_to_release_s']:.0f} s" if r.get("report_to_release_s")
         else "no release", "-"],
        ["requests that failed (whole run)", f"{r['failed']} of {r['requests']}", "0"],
        ["bad candidate", f"{r.get('bad_state', 'not injected')}" + (
            f" at {r['bad_decisions'][-1][0]} step {r['bad_decisions'][-1][1]}" if r.get("bad_decisions") else ""),
         "aborted at its first canary step"],
        ["users who got an answer from the bad candidate", str(len(r["bad_users"])), "-"],
    ]
    story = r.get("story") or {}
    lines = [f"Model `{shown(world['model'])}`, served by `rankone serve`; `rankone heal --watch` beside it from the "
             f"start; {args.users} simulated users through the `openai` client asking about {r['n_facts']} CounterFact facts "
             f"the model knows (greedy answer on the prompt; {r['para_known_before']} also on the paraphrase), "
             f"{r['requests']} requests in all. {ch} facts changed, each reported by 3–4 users "
             f"({len(r['no_subject'])} with no subject in any report); {r['poisoned_total']} poisoned corrections; "
             f"{r['reports_sent']} reports accepted by the server. Policy: `{shown(out / 'policy.json')}`.", "",
             table(["measure", "figure", "target"], rows), "",
             f"Changed facts without a subject fixed: {r['no_subject_fixed']} of {len(r['no_subject'])}. "
             f"Feedback by final status: {r['feedback_status']}. Audit actions: {r['actions']}."]
    if r.get("heal_steps"):
        lines += ["", f"Heal's patch {r['released']} ({r['released_edits']} edits), from proposal to release:", ""]
        lines += [f"- #{s} {at} `{a}`: {why}" for s, at, a, why in r["heal_steps"]]
    if r.get("bad_decisions"):
        lines += ["", "The bad candidate's decisions:", ""] + [f"- {k} step {i}: **{d}**: {why}"
                                                              for k, i, d, why in r["bad_decisions"]]
    if story:
        reps = story["reports"]
        lines += ["", f"One fact's story, {story['prompt']!r}, from its first report to its release:", ""]
        lines += [f"- report #{i} at {at} by {who}: {corr!r} (now {st})" for i, at, who, corr, st in reps[:6]]
        if len(reps) > 6:
            lines.append(f"- {len(reps) - 6} more reports, the last at {reps[-1][1]} "
                         f"({', '.join(sorted({x[4] for x in reps[6:]}))})")
        lines += [f"- audit #{s} {at} {actor} `{a}`: {why}" for s, at, actor, a, why in story["audit"]]
    skipped = dict(r["skipped"])  # one line per prompt
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{p!r}: {n}" for p, n in skipped.items())]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--cases", default=str(Path(__file__).resolve().parents[2] / "shared/data/counterfact/counterfact-edit.json"))
    ap.add_argument("--stats-corpus", default=str(Path(__file__).resolve().parents[2] / "shared/data/text/tinyshakespeare.txt"))
    ap.add_argument("--stats-tokens", type=int, default=100_000)
    ap.add_argument("--facts", type=int, default=200)
    ap.add_argument("--changed", type=int, default=40)
    ap.add_argument("--no-subject", type=int, default=4)
    ap.add_argument("--protected", type=int, default=5)
    ap.add_argument("--poison-single", type=int, default=5)
    ap.add_argument("--poison-protected", type=int, default=5)
    ap.add_argument("--bad", type=int, default=10)
    ap.add_argument("--probe-sample", type=int, default=20)
    ap.add_argument("--max-probe-regressions", type=int, default=2)
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--rate", type=float, default=1.5,
                    help="requests per second, all users together: below what the server answers, so that shadow runs "
                         "(which use only idle time) happen")
    ap.add_argument("--report-prob", type=float, default=0.2)
    ap.add_argument("--report-minutes", type=float, default=4.0)
    ap.add_argument("--quiet-s", type=float, default=60.0)
    ap.add_argument("--min-requests", type=int, default=50)
    ap.add_argument("--max-requests", type=int, default=40_000)
    ap.add_argument("--max-minutes", type=float, default=110.0, help="for heal's work on the reports")
    ap.add_argument("--bad-minutes", type=float, default=25.0, help="then for the harmful candidate's rollout")
    ap.add_argument("--heldout-chars", type=int, default=20_000)
    ap.add_argument("--policy-extra", default="{}", help="JSON merged into the heal policy (small runs)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/heal_scenario")
    ap.add_argument("--name", default="heal_scenario")
    ap.add_argument("--note", default="")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    os.environ.setdefault("RANKONE_CACHE", str((out / "cache").resolve()))
    os.environ["HF_HUB_OFFLINE"] = "1"
    res_f = out / "results.json"
    if args.report_only or res_f.exists():
        res, world = json.loads(res_f.read_text()), json.loads((out / "world.json").read_text())
    else:
        world = prepare(args, out)
        res = run(args, out, world)
        _save(res_f, res)
    publish(args.name, "Self-healing: reports to a released patch on live traffic, SmolLM2-135M",
            report(args, out, res, world), write=not args.no_write)


if __name__ == "__main__":
    main()
