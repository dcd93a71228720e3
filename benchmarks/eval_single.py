"""Single edits the papers' way: ES, PS, NS, S, magnitudes, fluency for ROME, r-ROME and p-ROME.

Every case is edited alone on the base model, measured, and reverted bit-exactly. Cases are
kept only if the unedited model gives their true answer (first token, greedy); the count kept is
reported. Resumable: per-case results are appended to runs/eval_single/NAME/METHOD.jsonl and a
rerun skips the cases already there.

    python benchmarks/eval_single.py --model runs/small-gpt2 --cases runs/small-gpt2 --n 200 \\
        --name small --title "small world (GPT-2, 4 layers)"
    python benchmarks/eval_single.py --model runs/counterfact-gpt2 \\
        --cases ../shared/data/counterfact/counterfact-edit.json --n 200 --name counterfact
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, table, write_section  # noqa: E402

from rankone.eval.cases import load_cases  # noqa: E402
from rankone.eval.metrics import alignable, evaluate_cases, evaluate_single_edits, fluency, knows, summarize  # noqa: E402
from rankone.methods.base import resolve_settings  # noqa: E402
from rankone.models.load import load_model  # noqa: E402


def read_jsonl(p: Path) -> list[dict]:
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--methods", default="r-rome,p-rome,rome")
    ap.add_argument("--layer", type=int, default=None, help="default: the model's recorded edit layer")
    ap.add_argument("--hparams", default=None, help="JSON object of EditHParams overrides")
    ap.add_argument("--gen-tokens", type=int, default=50)
    ap.add_argument("--name", required=True, help="results go to runs/eval_single/NAME; section eval_single_NAME")
    ap.add_argument("--title", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    out = ROOT / "runs" / "eval_single" / args.name
    out.mkdir(parents=True, exist_ok=True)
    handle = load_model(args.model)
    model, tok = handle
    t0 = time.perf_counter()
    cases = load_cases(args.cases)
    n_loaded = len(cases)
    cases, bad = alignable(model, tok, cases)
    k = knows(model, tok, cases)
    known = [c for c, y in zip(cases, k) if y]
    cases = known[: args.n]
    print(f"{n_loaded} cases, {len(bad)} unalignable, {len(known)} known by the model; using {len(cases)}", flush=True)

    base_f = out / "before.json"
    if base_f.is_file() and json.loads(base_f.read_text())["case_ids"] == [c.case_id for c in cases]:
        before = json.loads(base_f.read_text())["summary"]
    else:
        per = evaluate_cases(model, tok, cases)
        if args.gen_tokens:
            for c, m in zip(cases, per):
                m["fluency"] = fluency(model, tok, c.generation_prompts, args.gen_tokens)[0]
        before = summarize(per)
        base_f.write_text(json.dumps({"case_ids": [c.case_id for c in cases], "summary": before}))

    extra = json.loads(args.hparams) if args.hparams else {}
    rows, results = [], {}
    for method in args.methods.split(","):
        hp = resolve_settings(handle, {**extra, "method": method, **({"layer": args.layer} if args.layer is not None else {})})
        f = out / f"{method}.jsonl"
        done = {r["case_id"]: r for r in read_jsonl(f)}
        todo = [c for c in cases if c.case_id not in done]
        print(f"{method}: {len(done)} done, {len(todo)} to do", flush=True)

        def save(m: dict, f: Path = f) -> None:
            with open(f, "a") as fh:
                fh.write(json.dumps(m) + "\n")

        evaluate_single_edits(handle, todo, hp, gen_tokens=args.gen_tokens, progress=True, on_result=save)
        got = {r["case_id"]: r for r in read_jsonl(f)}
        per = [got[c.case_id] for c in cases]
        s = summarize(per)
        results[method] = s
        secs = statistics.median(r["edit_seconds"] for r in per if r.get("edit_seconds") is not None)
        clamped = sum(bool(r.get("clamped")) for r in per) / len(per)
        rows.append([method, s["es"], s["ps"], s["ns"], s["score"], s["em"], s["pm"], s["nm"], s["top1_new"],
                     s.get("fluency", float("nan")), statistics.median(r["delta_fro"] for r in per), clamped, f"{secs:.1f}"])
        print(rows[-1], flush=True)
    rows.insert(0, ["unedited", before["es"], before["ps"], before["ns"], before["score"], before["em"], before["pm"],
                    before["nm"], before["top1_new"], before.get("fluency", float("nan")), "–", "–", "–"])
    layer = args.layer if args.layer is not None else "the model's recorded edit layer"
    body = f"""Model `{Path(args.model).name}`; cases `{args.cases}`: {n_loaded} loaded, {len(bad)} not alignable
with the tokenizer, **{len(known)} whose true answer the model gives** (first token, greedy); the first
{len(cases)} of those are edited, **one at a time** on the base model (measured, then reverted exactly).
Layer: {layer}; hyper-parameters: {json.dumps({k: v for k, v in hp.to_dict().items() if k not in ('method',)})}.

Metrics (`rankone.eval.metrics`): probabilities teacher-forced over all target tokens and compared as
per-token means (ROME's convention). ES = P[p(new) > p(true)] on the edit prompt, PS the same on
paraphrases, NS = P[p(true) > p(new)] on neighbourhood prompts, S = harmonic mean of ES, PS, NS;
EM/PM = mean p(new) − p(true), NM = mean p(true) − p(new); top-1 = greedy decoding gives the whole new
target on the edit prompt; fluency = ROME's weighted bi-/tri-gram entropy of {args.gen_tokens} sampled
tokens (top-5, seeded) from each case's generation prompts; "clamped" = share of edits whose value
shift hit the norm clamp.

{table(["method", "ES", "PS", "NS", "S", "EM", "PM", "NM", "top-1 new", "fluency", "‖Δ‖_F median", "clamped", "s/edit"], rows)}

Total {time.perf_counter() - t0:.0f} s for this invocation (cases already done are read back from runs/eval_single/{args.name}/).
"""
    print(body)
    write_section(f"eval_single_{args.name}", f"Single edits: ES, PS, NS, S, fluency — {args.title or args.name}", body)


if __name__ == "__main__":
    main()
