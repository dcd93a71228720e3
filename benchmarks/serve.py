"""Serving: throughput, latency and time to first token of `rankone serve`.

    python benchmarks/serve.py [--model smollm2-135m] [--clients 1 4 16] [--requests 4] [--max-tokens 32]
                               [--threads N] [--no-write] [--note TEXT] [--report-only]

On one model (default SmolLM2-135M, the cached folder of `rankone.models.zoo.real_model_dir`),
for 1, 4 and 16 concurrent clients, each sending `--requests` greedy requests one after another
(prompts from a fixed list, `--max-tokens` new tokens, streamed so the client sees its first
token), it measures tokens/s, p50/p95 latency and p50/p95 time to first token for:

  (a) the engine in this process on the merged model, no HTTP (the upper bound of (b));
  (b) `rankone serve`, the stable arm;
  (c) a canary carrying 10 rank-one patches (one per layer, random factors: the cost of a delta
      does not depend on its numbers) as deltas, at 100 %;
  (d) the same 10 patches in shadow at 100 %: every request re-run on the candidate after answering
      (in time no request needs; samples that find the shadow queue full are skipped and counted).

plus (a') transformers' own `generate` (greedy, KV cache), one request at a time, for reference,
and the choice the engine makes for rows of different arms: one batch with per-row deltas
against one batch per arm, timed on decode steps of 16 rows (8 stable, 8 candidate).

Targets: (b) ≥ 0.9 × (a) at 1 client; (c) ≥ 0.95 × (b); (b) at 16 clients ≥ 3 × (b)
at 1 client; (d) adds no latency to the answer it returns. The server runs in its own process
(as users run it); the clients are this process's threads. For each client count the four run
one after another (the load of a shared machine moves): the 10 patches are staged at canary
100 % for (c), then at canary 0 % and shadow 100 % for (b), whose requests pin the stable arm
(pinned requests are never shadowed), and (d), whose requests are routed. The load average is
recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _report import publish, table  # noqa: E402
from serve_tools import ServerProcess  # noqa: E402

from rankone.artifacts.patch import Patch, make_edit  # noqa: E402
from rankone.core import architectures as arch  # noqa: E402
from rankone.core.util import utcnow  # noqa: E402
from rankone.lifecycle.registry import Registry  # noqa: E402
from rankone.models.load import load_model  # noqa: E402
from rankone.serve.batch import Batch, Runner, left_padded  # noqa: E402
from rankone.serve.deltas import row_deltas  # noqa: E402
from rankone.serve.engine import Engine, GenRequest  # noqa: E402
from rankone.serve.metrics import percentile  # noqa: E402
from rankone.serve.patchsets import Arms, Staged  # noqa: E402
from rankone.serve.routing import Router  # noqa: E402

PROMPTS = ["The Eiffel Tower is located in the city of", "The capital of Japan is", "Water boils at a temperature of",
           "The first person to walk on the moon was", "Shakespeare wrote the play", "The largest ocean on Earth is the",
           "Photosynthesis is the process by which", "The currency of the United Kingdom is the",
           "Mount Everest is located in", "The chemical symbol for gold is", "The Great Wall of China was built to",
           "A triangle has three sides and", "The speed of light is about", "Leonardo da Vinci painted the",
           "The Amazon river flows through", "In computer science, a compiler is"]
PASS = {"results": [], "suite": {"sha256": "benchmark: speed only"}}


def model_dir(name: str) -> Path:
    if name == "builtin":
        from rankone.testbed import builtin_model_dir

        return builtin_model_dir()
    from rankone.models.zoo import real_model_dir

    return real_model_dir(name)


def random_patches(handle, n: int, seed: int = 0) -> list[Patch]:
    """n one-edit rank-one patches, one per layer spread over the model (random factors, small norm)."""
    layers = handle.n_layers
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        layer = (i * layers) // n
        path = handle.spec.proj.format(layer)
        w = arch.weight_oi(arch.get_module(handle.model, path)).detach().clone()
        B, A = torch.randn(w.shape[0], 1, generator=g) * 1e-3, torch.randn(1, w.shape[1], generator=g)
        e, _ = make_edit(w, B, A, module=path, layer=layer, method="r-rome", hparams={}, seed=i,
                         request={"prompt": "{} is", "subject": f"Subject {i}", "target": "x"})
        out.append(Patch([e], base={"model_type": handle.model.config.model_type, "n_layers": layers}, created_at=utcnow()))
    return out


def summarise(rows: list[tuple[float, float, int]], wall: float) -> dict[str, float]:
    lat, ttft, tokens = [r[1] for r in rows], [r[0] for r in rows], sum(r[2] for r in rows)
    return {"tok_s": tokens / wall, "p50": percentile(lat, 0.5), "p95": percentile(lat, 0.95),
            "ttft50": percentile(ttft, 0.5), "ttft95": percentile(ttft, 0.95), "n": len(rows), "tokens": tokens}


def closed_loop(one, clients: int, requests: int) -> dict[str, float]:
    """`clients` threads, each sending `requests` requests one after another; one() -> (ttft, latency, tokens)."""
    rows: list[tuple[float, float, int]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(requests):
            r = one(PROMPTS[(k * requests + i) % len(PROMPTS)], f"user-{k}")
            with lock:
                rows.append(r)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return summarise(rows, time.perf_counter() - t0)


def http_one(url: str, name: str, max_tokens: int, pin: str | None = None):
    headers = {"X-Rankone-Patchset": pin, "Authorization": "Bearer benchmark"} if pin else {}

    def one(prompt: str, user: str) -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first, n = None, 0
        with httpx.stream("POST", url + "/v1/completions", timeout=600, headers=headers,
                          json={"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                "stream": True, "stream_options": {"include_usage": True}, "user": user}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: {") and first is None and '"text": ""' not in line:
                    first = time.perf_counter() - t0
                if '"usage"' in line and '"completion_tokens"' in line:
                    n = int(line.split('"completion_tokens": ')[1].split(",")[0].split("}")[0])
        return (first if first is not None else time.perf_counter() - t0), time.perf_counter() - t0, n
    return one


def engine_one(engine: Engine, tok, max_tokens: int):
    def one(prompt: str, user: str) -> tuple[float, float, int]:
        done, box = threading.Event(), {}
        t0 = time.perf_counter()

        def sink(ev):
            if ev[0] == "text" and "ttft" not in box:
                box["ttft"] = time.perf_counter() - t0
            elif ev[0] in ("done", "error"):
                box["n"] = ev[1]["completion_tokens"] if ev[0] == "done" else 0
                done.set()
        engine.submit(GenRequest(tok(prompt)["input_ids"], prompt, max_tokens, sink, stop=[]))
        done.wait()
        lat = time.perf_counter() - t0
        return box.get("ttft", lat), lat, box["n"]
    return one


def hf_generate(handle, requests: int, max_tokens: int) -> dict[str, float]:
    model, tok = handle
    rows = []
    t_all = time.perf_counter()
    for i in range(requests):
        ids = torch.tensor([tok(PROMPTS[i % len(PROMPTS)])["input_ids"]])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.eos_token_id)
        lat = time.perf_counter() - t0
        rows.append((float("nan"), lat, int(out.shape[1] - ids.shape[1])))
    s = summarise(rows, time.perf_counter() - t_all)
    s["ttft50"] = s["ttft95"] = None
    return s


def arm_mixing(handle, patches: list[Patch], rows: int = 16, steps: int = 16) -> dict[str, float]:
    """ms per decode step: one batch of `rows` with per-row deltas on half of them, against one
    batch per arm (the stable half alone, then the candidate half with deltas on every row)."""
    model, tok = handle
    runner = Runner(model)
    arms = Arms("fp", (), tuple(Staged(f"p{i}", 100, 0, p) for i, p in enumerate(patches)), torch.float32, "cpu")
    stable, cand = arms.stable, arms.candidate
    prompts = [tok(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(rows)]

    def prefill(idx: list[int], sets):
        ids, mask = left_padded([prompts[i] for i in idx], 0)
        with row_deltas(model, sets):
            logits, kv = runner.step(ids, mask, None)
        b = Batch()
        b.join(kv, mask)
        return b, logits.argmax(-1)

    def decode(b: Batch, last, sets) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([b.mask, torch.ones(b.size, 1, dtype=torch.long)], 1)
            with row_deltas(model, sets):
                logits, b.kv = runner.step(last[:, None], mask, b.kv)
            b.mask, last = mask, logits.argmax(-1)
        return time.perf_counter() - t0

    half = rows // 2
    mixed = [stable] * half + [cand] * (rows - half)
    b, last = prefill(list(range(rows)), mixed)
    t_shared = decode(b, last, mixed)
    b1, l1 = prefill(list(range(half)), [stable] * half)
    b2, l2 = prefill(list(range(half, rows)), [cand] * (rows - half))
    t_split = decode(b1, l1, [stable] * half) + decode(b2, l2, [cand] * (rows - half))
    return {"shared_ms": 1000 * t_shared / steps, "per_arm_ms": 1000 * t_split / steps}


def wait_status(url: str, pred, timeout: float = 30) -> dict:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = httpx.get(url + "/api/status", timeout=10).json()
        if pred(st):
            return st
        time.sleep(0.1)
    raise RuntimeError("the server did not reach the expected state")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="a zoo name (smollm2-135m, gemma3-270m) or builtin")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice), server and (a) alike")
    ap.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md as it is")
    ap.add_argument("--note", default="", help="a paragraph of interpretation appended to the section")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: rewrite the section as the last run wrote it, with --note appended")
    args = ap.parse_args()
    title = f"Serving: rankone serve on {args.model}"
    if args.report_only:
        publish("serve", title, measured_body("serve") + (f"\n\nNote: {args.note}" if args.note else ""), write=not args.no_write)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = model_dir(args.model)
    handle = load_model(str(folder))
    patches = random_patches(handle, 10)
    load0 = os.getloadavg()[0]
    res: dict[tuple[str, int], dict] = {}
    res[("a'", 1)] = hf_generate(handle, args.requests, args.max_tokens)
    mixing = arm_mixing(handle, patches)
    engine = Engine(handle.model, handle.tokenizer, Arms("fp", (), (), torch.float32, "cpu"), Router(None), max_batch=16)
    with tempfile.TemporaryDirectory() as tmp:
        reg_path, token = str(Path(tmp) / "registry.db"), Path(tmp) / "admin.token"
        token.write_text("benchmark")
        ids = []
        with Registry(reg_path) as reg:
            for i, p in enumerate(patches):
                p.save(Path(tmp) / f"p{i}")
                rec, _ = reg.add(str(Path(tmp) / f"p{i}"), "benchmark", "speed only")
                reg.record_validation(rec.id, PASS, True, "benchmark")
                ids.append(rec.id)

        def stage(canary: float, shadow: float) -> None:
            with Registry(reg_path) as reg:
                for pid in ids:
                    reg.stage(pid, canary=canary, shadow=shadow, actor="benchmark")
            wait_status(server.url, lambda st: any(a.get("staged") and all(x["canary"] == canary and x["shadow"] == shadow
                                                                         for x in a["staged"]) for a in st["arms"]))

        server = ServerProcess("--model", str(folder), "--registry", reg_path, "--max-batch", "16", "--max-waiting", "64",
                               "--served-model-name", "bench", "--admin-token-file", str(token), threads=args.threads)
        engine.start()
        shadows = (0, 0)  # shadow comparisons and skipped shadow runs so far
        try:
            one = {"a": engine_one(engine, handle.tokenizer, args.max_tokens),
                   "b": http_one(server.url, "bench", args.max_tokens, pin="stable"),  # no shadow: pins are not sampled
                   "c": http_one(server.url, "bench", args.max_tokens),
                   "d": http_one(server.url, "bench", args.max_tokens)}
            for c in args.clients:  # the four side by side for each client count: the shared machine's load moves
                for config in ("a", "c", "b", "d"):
                    if config == "c":
                        stage(100, 0)
                    elif config == "b":
                        stage(0, 100)
                    closed_loop(one[config], 1, 1)  # warm
                    res[(config, c)] = closed_loop(one[config], c, args.requests)
                    if config == "d":  # its shadow runs finish before the next measurement starts
                        st = wait_status(server.url, lambda st: st["engine"]["shadow_waiting"] == 0
                                         and st["engine"]["shadow_running"] == 0 and st["engine"]["running"] == 0, 600)
                        total = sum(v["comparisons"] for k, v in st["shadow"].items() if k != "dropped")
                        res[(config, c)]["shadow"] = f"{total - shadows[0]} ({st['shadow']['dropped'] - shadows[1]} skipped)"
                        shadows = (total, st["shadow"]["dropped"])
        finally:
            engine.stop()
            server.stop()
    order = {"a": 0, "a'": 1, "b": 2, "c": 3, "d": 4}
    res = dict(sorted(res.items(), key=lambda kv: (order[kv[0][0]], kv[0][1])))
    publish("serve", title, report(args, res, mixing, load0, os.getloadavg()[0]) + (f"\n\nNote: {args.note}" if args.note else ""),
            write=not args.no_write)


def measured_body(name: str) -> str:
    """The figures of a section as its last run wrote them (its header and any note left out)."""
    import re

    from _report import BENCH

    m = re.search(rf"<!-- {name}:begin -->\n.*?\nMachine: [^\n]*\n\n(.*?)\n<!-- {name}:end -->", BENCH.read_text(), re.S)
    if m is None:
        raise SystemExit(f"BENCHMARKS.md has no section {name!r} yet: run the benchmark first")
    body = m.group(1)
    return body.split("\n\nNote: ")[0]


def report(args, res, mixing, load0: float, load1: float) -> str:
    names = {"a": "(a) engine in process, merged model", "a'": "(a') transformers generate, one at a time",
             "b": "(b) rankone serve, stable (pinned)", "c": "(c) canary: 10 rank-one patches as deltas, 100 %",
             "d": "(d) shadow: 10 patches, 100 %"}
    ms = lambda v: "-" if v is None else f"{1000 * v:.0f}"  # noqa: E731
    rows = [[names[k], c, f"{r['tok_s']:.1f}", ms(r["p50"]), ms(r["p95"]), ms(r["ttft50"]), ms(r["ttft95"]),
             r["n"], r.get("shadow", "")] for (k, c), r in res.items()]
    body = [f"{args.requests} greedy requests per client, {args.max_tokens} new tokens each, streamed; torch threads: "
            f"{args.threads or torch.get_num_threads()}; load average {load0:.1f} before, {load1:.1f} after "
            "(the machine is shared).", "",
            table(["configuration", "clients", "tokens/s", "p50 ms", "p95 ms", "TTFT p50 ms", "TTFT p95 ms",
                   "requests", "shadow runs (skipped: queue full)"], rows), ""]
    t = lambda k, c: res[(k, c)]["tok_s"] if (k, c) in res else float("nan")  # noqa: E731
    lo, hi = min(args.clients), max(args.clients)
    checks = [("(b) ≥ 0.9 × (a), 1 client", t("b", lo) / t("a", lo), 0.9),
              *[(f"(c) ≥ 0.95 × (b), {c} client(s)", t("c", c) / t("b", c), 0.95) for c in args.clients],
              (f"(b) at {hi} clients ≥ 3 × at {lo}", t("b", hi) / t("b", lo), 3.0)]
    body += ["| target | ratio | met |", "|---|---|---|"]
    body += [f"| {name} | {v:.2f} | {'yes' if v >= goal else 'NO'} |" for name, v, goal in checks]
    d_b = [(c, res[("d", c)]["p50"] / res[("b", c)]["p50"]) for c in args.clients if ("d", c) in res]
    body += ["", "Shadow (d): p50 latency of the returned answers against (b): "
             + ", ".join(f"{c} client(s) ×{r:.2f}" for c, r in d_b) + ".",
             "", f"Rows of two arms in one decode step of 16 rows (8 stable, 8 candidate with the 10 patches): one "
             f"shared batch with per-row deltas {mixing['shared_ms']:.1f} ms per step, one batch per arm "
             f"{mixing['per_arm_ms']:.1f} ms ({'shared' if mixing['shared_ms'] <= mixing['per_arm_ms'] else 'per arm'} "
             "is faster; the engine shares the batch)."]
    return "\n".join(body)


if __name__ == "__main__":
    main()
