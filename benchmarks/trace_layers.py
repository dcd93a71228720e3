"""Does causal tracing pick the layer where editing works best?

On the small-world testbed: the average indirect effect (AIE) per layer of restoring hidden states,
MLP outputs and attention outputs at the last subject token, and the quality of single r-ROME edits
made at each layer (N facts, each edited then reverted):

    ES  efficacy      p(new) > p(true) on the edited prompt
    PS  paraphrase    p(new) > p(true) on the fact's held-out phrasings (never trained)
    NS  neighbourhood p(true') > p(new) for other subjects' facts of the same relation
    S   harmonic mean of ES, PS, NS (ROME's score)

with the cases of `rankone.eval.cases.cases_from_world` (new object: another object of the relation;
paraphrases: the fact's held-out phrasings; neighbours: other subjects' facts of the relation) and
the metrics of `rankone.eval.metrics` (teacher forced over all target tokens, per-token mean).

    python benchmarks/trace_layers.py                 # built-in testbed, 50 edits per layer
    python benchmarks/trace_layers.py --model runs/small-gpt2 --n-edits 20 --no-write

Per-edit results are kept in runs/trace_layers/<model>/ (git-ignored) so that an interrupted run
resumes where it stopped. Writes heatmaps to docs/trace_*.png, docs/aie_*.png and the `trace`
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import table, write_section  # noqa: E402

from rankone.core import architectures as arch  # noqa: E402
from rankone.edit.editor import Editor  # noqa: E402
from rankone.eval.cases import cases_from_world  # noqa: E402
from rankone.eval.metrics import evaluate_cases, summarize  # noqa: E402
from rankone.models.load import load_model  # noqa: E402
from rankone.artifacts.patch import revert_patch  # noqa: E402
from rankone.testbed import World, builtin_model_dir  # noqa: E402
from rankone.trace.runs import TraceSettings, trace_case  # noqa: E402
from rankone.trace.tracing import aie_cache_dir, cached_aie, model_fingerprint, resolve_noise, sample_facts  # noqa: E402
from rankone.eval.cases import fact_set  # noqa: E402
from rankone.trace.plot import plot_aie, plot_trace  # noqa: E402


def summarise(rows: list[dict]) -> dict:
    m = summarize(rows)
    return {"ES": m["es"], "PS": m["ps"], "NS": m["ns"], "S": m["score"], "EM": m["em"], "n": m["n"]}


def edit_sweep(handle, cases: list[dict], layers: list[int], state: Path, log) -> dict[int, dict]:
    """For each layer, each case edited with r-ROME, measured, then reverted (resumable)."""
    results: dict[int, dict] = {}
    for layer in layers:
        f = state / f"edits-L{layer}.jsonl"
        done = [json.loads(x) for x in f.read_text().splitlines()] if f.exists() else []
        model, tok = handle
        ed = Editor(handle, {"method": "r-rome", "layer": layer}, progress=False)  # over the model card, as `rankone edit`
        t0 = time.perf_counter()
        w = arch.weight_oi(handle.proj(layer)).detach().clone()
        for i in range(len(done), len(cases)):
            t1 = time.perf_counter()
            patch = ed.edit([cases[i].request], keep=True)
            t_edit = time.perf_counter() - t1
            try:
                row = dict(evaluate_cases(model, tok, [cases[i]])[0], case=i, delta_fro=patch.edits[0].delta_fro,
                           clamped=patch.edits[0].diagnostics["value"]["clamped"], edit_s=t_edit)
            finally:
                revert_patch(model, patch)
            done.append(row)
            with open(f, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if (i + 1) % 10 == 0:
                log(f"  layer {layer}: {i + 1}/{len(cases)} edits, {time.perf_counter() - t0:.0f}s")
        assert torch.equal(w, arch.weight_oi(handle.proj(layer))), "revert failed"
        results[layer] = summarise(done[: len(cases)])
        results[layer]["clamped"] = sum(r["clamped"] for r in done[: len(cases)]) / len(cases)
        results[layer]["edit_s"] = statistics.fmean(r["edit_s"] for r in done[: len(cases)])  # per edit, as measured
        log(f"layer {layer}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[layer].items()))
        if not torch.isfinite(torch.tensor(results[layer]["PS"])):
            log("  (no paraphrases: PS is undefined)")
    return results


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", s.lower()).strip("_")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="testbed model folder (default: the built-in one)")
    ap.add_argument("--n-edits", type=int, default=50)
    ap.add_argument("--n-neighbours", type=int, default=5)
    ap.add_argument("--n-aie", type=int, default=200, help="facts averaged for the AIE")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--heatmaps", type=int, default=3, help="facts whose full traces go to docs/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and docs/ alone")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared
    model_dir = Path(args.model) if args.model else builtin_model_dir()
    if not (model_dir / "world.json").is_file():
        sys.exit(f"{model_dir} is not a testbed model folder (no world.json); pass --model")
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    handle = load_model(model_dir)
    model, tok = handle
    world = World.load(model_dir)
    n_layers = handle.n_layers
    fp = model_fingerprint(model)
    state = ROOT / "runs" / "trace_layers" / f"{fp[:16]}-seed{args.seed}-nb{args.n_neighbours}"  # resumable per setting
    state.mkdir(parents=True, exist_ok=True)
    log(f"model {model_dir} ({n_layers} layers), state in {state}")

    # 1. average indirect effect over testbed facts (cached per model)
    settings = TraceSettings(n_samples=args.samples, seed=args.seed)
    known = fact_set(model_dir)
    facts, subjects = known.facts, known.subjects
    t0 = time.perf_counter()
    before = set((aie_cache_dir(fp)).glob("aie-*.json")) if aie_cache_dir(fp).is_dir() else set()
    aie = cached_aie(handle, sample_facts(facts, args.n_aie, args.seed), settings, subjects, "testbed world.json", fp)
    t_aie = time.perf_counter() - t0
    aie_time = f"read from the cache in {t_aie:.1f} s" if Path(aie.cache_file) in before else f"{t_aie:.0f} s"
    auto = aie.best_layer("mlp")
    log(f"AIE over {aie.n_facts} facts ({aie.n_wrong} wrong) in {t_aie:.0f}s: {aie.aie}; auto layer {auto}")

    # 2. edit quality at every layer
    cases = cases_from_world(world, seed=args.seed, n_neighbours=args.n_neighbours)[: args.n_edits]
    base = summarise(evaluate_cases(model, tok, cases))
    res = edit_sweep(handle, cases, list(range(n_layers)), state, log)
    best = max(res, key=lambda l: (res[l]["S"], res[l]["ES"] + res[l]["PS"]))

    # 3. figures
    docs = ROOT / "docs"
    name = model_dir.name if model_dir != builtin_model_dir() else "builtin"
    figures = []
    if not args.no_write:
        nu = resolve_noise(handle, settings, subjects)
        seen: set[str] = set()
        # seeded choice of facts with different relations and subjects of several words
        for f in random.Random(args.seed).sample(world.facts, len(world.facts)):
            if len(figures) >= args.heatmaps:
                break
            if f.relation in seen or f.subject in seen or len(f.subject.split()) < 2:
                continue
            tr = trace_case(handle, world.prompts(f, "train")[0], f.subject, f.object, nu, settings)
            if not tr.correct:
                continue
            seen |= {f.relation, f.subject}
            stem = f"trace_{name}_{slug(f.relation)}"
            for kind in settings.kinds:
                plot_trace(tr, kind, docs / f"{stem}_{kind}.png", name)
            figures.append((stem, tr.prompt, tr.answer))
        plot_aie(aie, docs / f"aie_{name}.png", auto,
                 quality={k: [res[l][k] for l in range(n_layers)] for k in ("ES", "PS", "NS")})

    # 4. report
    rows_aie = [[l] + [f"{aie.aie[k][l]:.4f} ± {aie.sem[k][l]:.4f}" for k in settings.kinds] for l in range(n_layers)]
    rows_q = [["no edit", "", f"{base['ES']:.3f}", f"{base['PS']:.3f}", f"{base['NS']:.3f}", f"{base['S']:.3f}", f"{base['EM']:.3f}", "", ""]]
    rows_q += [[f"{l}" + (" (auto)" if l == auto else "") + (" (testbed default)" if l == world.edit_layer else ""),
                f"{aie.aie['mlp'][l]:.4f}", f"{res[l]['ES']:.3f}", f"{res[l]['PS']:.3f}", f"{res[l]['NS']:.3f}",
                f"{res[l]['S']:.3f}", f"{res[l]['EM']:.3f}", f"{res[l]['clamped']:.2f}", f"{res[l]['edit_s']:.2f}"] for l in range(n_layers)]
    verdict = (f"**Tracing picks layer {auto}; editing works best at layer {best}** (highest S"
               + (", ties broken by ES + PS" if sum(res[l]['S'] == res[best]['S'] for l in res) > 1 else "") + "): "
               + ("the layer tracing picks is the best layer to edit." if auto == best else
                  f"the layer tracing picks is **not** the best layer to edit (S {res[auto]['S']:.3f} at layer {auto} "
                  f"vs {res[best]['S']:.3f} at layer {best})."))
    body = f"""Model: `{model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir}` ({n_layers} layers, {sum(p.numel() for p in model.parameters()):,} parameters, world `{world.name}`).
Causal tracing: noise ν = {settings.noise_factor:g} × std of subject-token embeddings over the world's {len(set(subjects))} subjects = {aie.noise_scale:.4f}, {settings.n_samples} noise samples, MLP/attention window {aie.window} layer(s) (min(10, n_layers // 4)), seed {settings.seed}.
AIE over {aie.n_facts} facts the model answers correctly ({aie.n_wrong} of a seeded sample of {aie.n_facts + aie.n_wrong} answered wrongly, not traced); p(answer) clean {aie.p_clean:.3f}, corrupted {aie.p_corrupted:.3f}, average total effect {aie.ate:.3f}; {aie_time}.

Average indirect effect at the last subject token (mean ± standard error):

{table(["layer"] + [f"AIE {k}" for k in settings.kinds], rows_aie)}

Edit quality of {args.n_edits} single r-ROME edits per layer (default hyper-parameters; each edited, measured, reverted bit-exactly), up to {args.n_neighbours} neighbours each (cases: `rankone.eval.cases.cases_from_world`, seed {args.seed}; metrics: `rankone.eval.metrics`, teacher forced, per-token mean probability; EM = mean p(new) − p(true) on the edit prompt; "clamped" = share of edits whose value shift hit the norm clamp; "s/edit" = seconds to compute one edit, single thread, on a shared machine).

{table(["edit layer", "AIE mlp", "ES", "PS", "NS", "S", "EM", "clamped", "s/edit"], rows_q)}

{verdict}

![AIE per layer with edit quality](docs/aie_{name}.png)

""" + "\n".join(f"Heatmaps for *{p} → {a}*: " + " ".join(f"![{k}](docs/{stem}_{k}.png)" for k in settings.kinds)
               for stem, p, a in figures)
    print(body)
    log(f"total {time.perf_counter() - t_start:.0f}s")
    if not args.no_write:
        write_section("trace", "Causal tracing and the layer to edit", body)
        json.dump({"aie": aie.to_dict(), "quality": res, "no_edit": base, "auto": auto, "best": best},
                  open(state / "summary.json", "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
