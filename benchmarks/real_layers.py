"""Which layer to edit on a real model: single-edit quality per layer, beside causal tracing.

    python benchmarks/real_layers.py --model smollm2-135m --layers 1 3 5 7 10 --n 30

At each layer the first N cases the unedited model knows (P(true) > P(new) on the prompt) are
edited one at a time with --method, measured and reverted, by `real_counterfact.run_methods` (same
run folders under runs/real_counterfact/, so a CounterFact run at one of these layers is reused
and an interrupted sweep resumes). Where this model has a cached AIE (`rankone trace --model M
--cases FILE --kinds mlp`, kept under ~/.cache/rankone/trace), the table gives the average indirect
effect of the MLP at the last subject token per layer, and docs/layers_NAME.png plots it beside
S, PS and NS. The verdict compares the best layer by S with the default layer (the card's, else
n_layers // 8) and with the layer the AIE picks. The sweep is stored as the model's measured layer
evidence (`trace.layer_choice.save_sweep`, as `rankone bench layers` does), which `rankone edit
--layer auto` prefers to tracing from then on; --no-save leaves it out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, publish, table  # noqa: E402
from real_counterfact import (_where, check_settings, common_args, prepare, run_methods, run_name, settings_of,  # noqa: E402
                              stats_label, summary, unedited, RUNS)

from rankone.methods.base import resolve_settings  # noqa: E402
from rankone.trace.layer_choice import EditSweep, save_sweep  # noqa: E402
from rankone.trace.plot import plot_aie  # noqa: E402
from rankone.trace.tracing import best_cached_aie, model_fingerprint  # noqa: E402

TOLERANCE = 0.03  # the default layer and --layer auto must be within this S of the best layer


def verdict(res: dict[int, dict], sweep: EditSweep, default: int, auto: int | None, stored: bool) -> str:
    best = sweep.best_layer()  # the rule --layer auto applies to a stored sweep
    out = [f"**Best layer by S: {best}** (S {res[best]['score']:.3f})."]
    for what, layer in (("default layer", default), ("AIE's layer (`--layer auto` where no sweep is stored)", auto)):
        if layer is None:
            out.append(f"No cached AIE for this model: trace it to compare the {what}.")
        elif layer not in res:
            out.append(f"The {what} {layer} was not swept.")
        else:
            gap = res[best]["score"] - res[layer]["score"]
            ok = "within" if gap <= TOLERANCE else "**not** within"
            out.append(f"The {what} {layer}: S {res[layer]['score']:.3f}, {gap:.3f} below the best ({ok} {TOLERANCE}).")
    if stored:
        out.append(f"With this sweep stored, `--layer auto` edits layer {best}.")
    return " ".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(ap)
    ap.add_argument("--layers", type=int, nargs="+", required=True, help="layers to edit, e.g. 1 3 5 7 10")
    ap.add_argument("--method", default="r-rome")
    ap.add_argument("--no-save", action="store_true", help="do not store the sweep as the model's layer evidence")
    ap.set_defaults(n=30)
    args = ap.parse_args()
    t_start = time.perf_counter()
    handle, label, sel, facts, extra = prepare(args)
    cases = sel["known"]
    n_layers = handle.n_layers
    bad = [l for l in args.layers if not 0 <= l < n_layers]
    if bad:
        sys.exit(f"layers {bad} are out of range: {label} has layers 0..{n_layers - 1}")
    print(f"{label}: {len(cases)} known cases ({sel['share_known']:.1%} of {sel['scanned']} scanned); "
          f"layers {args.layers}", flush=True)
    base = unedited(handle, label, cases, facts, args)
    before = summary([base[c.case_id] for c in cases])
    res: dict[int, dict] = {}
    for layer in args.layers:
        hp = resolve_settings(handle, {**extra, "method": args.method, "layer": layer})
        out = RUNS / run_name(label, layer, args, hp)
        check_settings(out, settings_of(args, layer, hp))
        done = run_methods(handle, cases, facts, {hp.method: hp}, out, args)[hp.method]
        res[layer] = summary([done[c.case_id] for c in cases])
        s = res[layer]
        print(f"layer {layer}: ES {s['es']:.3f} PS {s['ps']:.3f} NS {s['ns']:.3f} S {s['score']:.3f} GS {s['gs']:.3f}",
              flush=True)

    fp = model_fingerprint(handle.model)
    sweep = EditSweep({l: {k: res[l][k] for k in ("es", "ps", "ns", "score", "n")} for l in res}, args.method,
                      f"{_where(args.cases)}: the first {len(cases)} known (over-new)", len(cases),
                      {"stats": stats_label(args, hp.stats_tokens)[1],
                       **{k: v for k, v in hp.to_dict().items() if k not in ("layer", "method")}}, fp)
    stored = not args.no_save and args.method == "r-rome" and len(res) >= 2  # what --layer auto reads
    if stored:
        print(f"stored as the model's layer evidence: {save_sweep(sweep).cache_file}", flush=True)
    aie = best_cached_aie(fp, "mlp")
    auto = aie.best_layer("mlp") if aie is not None else None
    default = handle.default_layer()
    name = f"{label}-{args.method}-{stats_label(args, hp.stats_tokens)[0]}"
    figure = ""
    if aie is not None and not args.no_write:
        quality = {k: [res[l][key] if l in res else float("nan") for l in range(n_layers)]
                   for k, key in (("S", "score"), ("PS", "ps"), ("NS", "ns"))}
        plot_aie(aie, ROOT / "docs" / f"layers_{name}.png", auto, quality=quality,
                 title=f"{label}: AIE of the MLP ({aie.n_facts} facts) and {args.method} edit quality")
        figure = f"\n![AIE and edit quality per layer](docs/layers_{name}.png)\n"
    aie_col = (lambda l: f"{aie.aie['mlp'][l]:.4f} ± {aie.sem['mlp'][l]:.4f}") if aie is not None else (lambda l: "–")
    rows = [["unedited", "–", before["es"], before["ps"], before["ns"], before["score"], before["gs"], before["gps"],
             f"{before['os']:.3f} ({before['n_os']})", "–"]]
    rows += [[f"{l}" + (" (default)" if l == default else "") + (" (AIE)" if l == auto else ""), aie_col(l),
              res[l]["es"], res[l]["ps"], res[l]["ns"], res[l]["score"], res[l]["gs"], res[l]["gps"], f"{res[l]['os']:.3f} ({res[l]['n_os']})",
              f"{res[l]['delta_median']:.3g}"] for l in sorted(args.layers)]
    traced = (f"AIE: {aie.n_facts} facts the model answers correctly, {aie.settings.get('n_samples', '?')} noise "
              f"samples, window {aie.window}, from `{aie.cache_file}`." if aie is not None else
              "No cached AIE for this model (run `rankone trace --model M --cases FILE --kinds mlp` first).")
    given = {k: v for k, v in extra.items() if k != "stats_tokens"}
    changed = f" but {json.dumps(given)}" if given else ""
    if given.get("v_steps_max") == hp.v_steps:
        changed += " (the value loop as it was before it could go past v_steps)"
    body = f"""Model `{label}` ({n_layers} layers); {len(cases)} known CounterFact cases (P(true) > P(new); the first of
`{args.cases}`), each edited alone with {args.method} at each layer, measured, reverted. Key statistics:
{stats_label(args, hp.stats_tokens)[1]}. Metrics as in the CounterFact section (GS / GPS: generation-based success on
the prompt / paraphrase; OS: the subject's other facts). Hyper-parameters: the defaults{changed}. {traced}

{table(["layer", "AIE mlp", "ES", "PS", "NS", "S", "GS", "GPS", "OS (cases)", "‖Δ‖_F median"], rows)}

{verdict(res, sweep, default, auto, stored)}
{figure}
Total {time.perf_counter() - t_start:.0f} s for this invocation (finished edits are read back from runs/real_counterfact/).
"""
    publish(f"real_layers_{name}", f"Layer choice on a real model: {name}", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
