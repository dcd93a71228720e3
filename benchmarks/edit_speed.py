"""Seconds per edit (key, value optimisation, solve) and key-statistics throughput.

    python benchmarks/edit_speed.py [--model DIR] [--n 20] [--threads 2]

Statistics are computed once into a fresh cache (that pass gives the tokens/s figure), then every
edit finds them cached, as in normal use. The value loop is timed with and without replaying the
cached hidden states below the edited layer, to show what that saves.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import table, write_section  # noqa: E402

from rankone.edit.editor import Editor  # noqa: E402
from rankone.methods.hparams import EditHParams  # noqa: E402
from rankone.models.load import load_model  # noqa: E402
from rankone.methods.stats import collect_mom2  # noqa: E402
from rankone.core.tokens import EditRequest  # noqa: E402


def requests_from_world(model_dir: Path, n: int, seed: int = 0) -> list[EditRequest]:
    world = json.loads((model_dir / "world.json").read_text())
    rel = {r["id"]: r for r in world["relations"]}
    rng = random.Random(seed)
    out = []
    for f in rng.sample(world["facts"], n):
        r = rel[f["relation"]]
        new = rng.choice([o for o in r["objects"] if o != f["object"]])
        out.append(EditRequest.create(r["phrasings"][0], f["subject"], new))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="testbed model folder (default: the built-in one)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    if args.model is None:
        from rankone.testbed import builtin_model_dir

        args.model = str(builtin_model_dir())
    d = Path(args.model)
    handle = load_model(d)
    model, tok = handle
    layer = handle.default_layer()
    corpus = handle.stats_corpus()

    t0 = time.perf_counter()
    _, count = collect_mom2(model, tok, [layer], corpus, n_tokens=10**9, progress=False)
    stats_s = time.perf_counter() - t0

    reqs = requests_from_world(d, args.n)
    deep = model.config.num_hidden_layers - 2  # a layer with layers below it to replay
    rows, summary = [], {}
    with tempfile.TemporaryDirectory() as cache:
        for at in sorted({layer, deep}):
            for fast in (True, False):
                ed = Editor(model, tok, EditHParams(layer=at, fast_value=fast), stats_corpus=corpus, cache_dir=cache, progress=False)
                ed.stats(at), ed.templates()  # computed once per model and layer, as in normal use
                times = []
                for r in reqs:
                    t = time.perf_counter()
                    _, info = ed.compute(r)
                    times.append(dict(info["timing"], total_s=time.perf_counter() - t))
                med = {k: statistics.median(x[k] for x in times) for k in times[0]}
                summary[(at, fast)] = med
                rows.append([at, "replay below layer" if fast else "full forward", f"{med['key_s'] * 1e3:.1f}",
                             f"{med['value_s'] * 1e3:.1f}", f"{med['solve_s'] * 1e3:.2f}", f"{med['total_s'] * 1e3:.1f}"])
    n_params = sum(p.numel() for p in model.parameters())
    body = (
        f"Model: `{d.name}` ({model.config.model_type}, {n_params:,} parameters, {model.config.num_hidden_layers} layers), "
        f"edited layer {layer}, {args.n} r-ROME edits with the paper's defaults (20 steps, 21 context templates), "
        f"statistics cached, torch threads = {args.threads}; load average at the start "
        f"{load:.1f} on {os.cpu_count()} cores (other work was running: figures are upper bounds).\n\n"
        + table(["layer", "value loop", "key ms", "value ms", "solve ms", "total ms / edit (median)"], rows)
        + f"\n\nKey statistics: {count:,} tokens in {stats_s:.2f} s = **{count / stats_s:,.0f} tokens/s** "
        f"(one pass, layer {layer}).\n"
        f"At layer {deep}, replaying cached hidden states below the edited layer makes the value loop "
        f"{summary[(deep, False)]['value_s'] / summary[(deep, True)]['value_s']:.2f}× faster (same δ, tested in "
        f"tests/unit/test_rome.py); at layer 0 there is nothing below to replay.\n"
    )
    print(body)
    write_section("edit_speed", "Edit speed (issue 2)", body)


if __name__ == "__main__":
    main()
