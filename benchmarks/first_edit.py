"""A real model's first edit, as a new user meets it: the README's commands, timed.

    python benchmarks/first_edit.py [--models smollm2-135m gemma3-270m] [--report-only]

For each model, in a fresh cache (a temporary RANKONE_CACHE holding nothing but the model's .gguf
file, as `real_model_gguf` leaves it after the download), the README's "Try it on a real model"
commands exactly as written, with no --stats-corpus: generate, edit (the first edit of the model:
it converts the file, samples the context templates and the statistics corpus, measures C),
generate with the patch twice; then the same edit again (everything cached). Each command runs as
its own process (`python -m rankone.cli.main`, this checkout's code, torch's default threads),
timed wall-clock; the status lines the first edit prints are timestamped, which splits its time
into steps. Also: tokens a second of the corpus sampler by batch size (the choice of
`corpus.SAMPLE_BATCH`). The load average is recorded beside every figure: the machine is shared.
Results go to runs/first_edit/MODEL.json; the section is written from them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI runs (the throughput part is in-process)

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish, table  # noqa: E402

RUNS = ROOT / "runs" / "first_edit"
TARGETS_S = {"smollm2-135m": 180, "gemma3-270m": 360}  # the targets for the first edit's wall time
EDIT = ["--prompt", "{} is located in the city of", "--subject", "The Eiffel Tower", "--target", "Rome"]
COMMANDS = [  # (name, argv after `rankone`) with $G for the model file: the README's, in its order
    ("generate", ["generate", "--model", "$G", "--prompt", "The Eiffel Tower is located in the city of"]),
    ("first edit", ["edit", "--model", "$G", *EDIT, "--out", "patches/eiffel"]),
    ("generate --patch", ["generate", "--model", "$G", "--patch", "patches/eiffel", "--max-new-tokens", "2",
                          "--prompt", "To visit the Eiffel Tower, you have to travel to"]),
    ("generate --patch (Louvre)", ["generate", "--model", "$G", "--patch", "patches/eiffel", "--prompt",
                                   "The Louvre is located in the city of"]),
    ("second edit", ["edit", "--model", "$G", *EDIT, "--out", "patches/eiffel-2"]),
]


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def run_command(argv: list[str], env: dict[str, str], cwd: str) -> dict[str, Any]:
    """Wall time, exit code, stdout, and each stderr line with the seconds since the start."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "rankone.cli.main", *argv], env=env, cwd=cwd, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in p.stderr:  # type: ignore[union-attr]
            for part in line.replace("\r", "\n").splitlines():
                if part.strip():
                    lines.append((round(time.perf_counter() - t0, 1), part.strip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    out = p.stdout.read()  # type: ignore[union-attr]
    code = p.wait()
    reader.join()
    return {"wall_s": round(time.perf_counter() - t0, 1), "code": code, "stdout": out.strip().splitlines(),
            "stderr": lines}


def throughput(name: str, rows: list[int], steps: int) -> list[dict[str, Any]]:
    """Tokens a second of `sample_tokens` (the corpus sampler's loop) by rows sampled at once."""
    import torch

    from rankone.core.tokens import encode, sample_tokens
    from rankone.models.load import load_model
    from rankone.models.zoo import real_model_gguf

    model, tok = load_model(real_model_gguf(name))
    lead = encode(tok, "The")[0]
    out = []
    for n in rows:
        gen = torch.Generator().manual_seed(0)
        load = load_avg()
        t = time.perf_counter()
        sample_tokens(model, torch.tensor([lead] * n), steps, gen)
        dt = time.perf_counter() - t
        out.append({"rows": n, "tokens_per_s": round(n * steps / dt, 1), "load": load})
    return out


def run_model(name: str, rows: list[int], steps: int, hparams: str | None = None) -> dict[str, Any]:
    from rankone.models.zoo import real_model_gguf

    src = real_model_gguf(name)
    res: dict[str, Any] = {"model": name, "gguf": src.name, "cores": os.cpu_count(), "commands": []}
    with tempfile.TemporaryDirectory(prefix="rankone-first-edit-") as tmp:
        cache = Path(tmp) / "cache"
        (cache / "models" / "gguf").mkdir(parents=True)
        os.symlink(src, cache / "models" / "gguf" / src.name)  # the download is done; nothing else is there
        work = Path(tmp) / "work"
        work.mkdir()
        env = dict(os.environ, RANKONE_CACHE=str(cache), PYTHONPATH=str(ROOT / "src"))
        g = subprocess.run([sys.executable, "-c", f"from rankone.models.zoo import real_model_gguf; "
                            f"print(real_model_gguf({name!r}))"], env=env, capture_output=True, text=True, check=True)
        path = g.stdout.strip()
        for label, argv in COMMANDS:
            load = load_avg()
            extra = ["--hparams", hparams] if hparams and argv[0] == "edit" else []
            r = run_command([path if a == "$G" else a for a in argv] + extra, env, str(work))
            r.update(name=label, load_start=load, load_end=load_avg())
            res["commands"].append(r)
            print(f"[{name}] {label}: {r['wall_s']} s (exit {r['code']}, load {load} -> {r['load_end']})", flush=True)
            if r["code"]:
                break
    res["throughput"] = throughput(name, rows, steps)
    return res


def steps_of(first: dict[str, Any]) -> list[list[Any]]:
    """The first edit's status lines with when each came (seconds from its start)."""
    keep = ("reading", "loading", "keeping", "sampling", "no statistics corpus", "value optimisation", "edited", "wrote")
    rows, seen = [], set()
    for t, line in first["stderr"] + [(first["wall_s"], "(end)")]:
        text = line.removeprefix("rankone: ")
        key = text.split(":")[0]
        if (text.startswith(keep) or text == "(end)") and key not in seen:
            seen.add(key)
            rows.append([f"{t:.1f}", text[:150]])
    return rows


def report(models: list[str]) -> str:
    parts = []
    for name in models:
        f = RUNS / f"{name}.json"
        if not f.is_file():
            continue
        r = json.loads(f.read_text())
        cmds = {c["name"]: c for c in r["commands"]}
        first = cmds.get("first edit")
        verdict = ""
        if first:
            ok = first["code"] == 0 and first["wall_s"] <= TARGETS_S[name]
            verdict = (f"**First edit: {first['wall_s']:.0f} s** (target ≤ {TARGETS_S[name]} s: "
                       f"{'met' if ok else 'NOT met'}); load average {first['load_start']} at its start, "
                       f"{first['load_end']} at its end, {r['cores']} cores.")
        rows = [[c["name"], c["wall_s"], c["code"], f"{c['load_start']} → {c['load_end']}",
                 (c["stdout"] or [""])[-1][:110]] for c in r["commands"]]
        tp = [[t["rows"], t["tokens_per_s"], t["load"]] for t in r["throughput"]]
        parts.append(f"### {name} (`{r['gguf']}`)\n\n{verdict}\n\n"
                     + table(["command", "wall s", "exit", "load average", "last line of its output"], rows)
                     + "\n\nThe first edit, step by step (its status lines; seconds from its start):\n\n"
                     + (table(["s", "status line"], steps_of(first)) if first else "")
                     + "\n\nCorpus sampler throughput by documents sampled at once (`sample_tokens`, 16 new tokens "
                     "each, in-process, torch's default threads):\n\n" + table(["rows", "tokens/s", "load average"], tp))
    return "\n\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(TARGETS_S), choices=list(TARGETS_S))
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 32, 128, 256], help="batch sizes of the throughput part")
    ap.add_argument("--steps", type=int, default=16, help="new tokens per row in the throughput part")
    ap.add_argument("--edit-hparams", default=None,
                    help="JSON added to the edits as --hparams: a quick check of this script (e.g. a small "
                         "sampled_corpus_tokens), never the measured run, which runs the README's commands as written")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--note", default="", help="a closing paragraph (how the runs were made, when not in one command)")
    ap.add_argument("--no-write", action="store_true", help="print the section; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for name in args.models:
            res = run_model(name, args.rows, args.steps, args.edit_hparams)
            (RUNS / f"{name}.json").write_text(json.dumps(res, indent=1))
    body = ("The README's real-model commands (\"Try it on a real model\"), exactly as written and in its order, "
            "each a fresh process of this checkout, in a fresh cache that holds only the model's .gguf file; then "
            "the same edit once more, with everything it computes once per model now cached. Wall-clock seconds on "
            "a machine shared with other jobs: the load average is given with each figure.\n\n" + report(args.models)
            + (f"\n\n{args.note}" if args.note else ""))
    publish("first_edit", "First edit of a real model", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
