"""Settings side by side on a real model: the same known CounterFact cases, one edit setting per row.

    python benchmarks/real_variants.py --model gemma3-270m --n 30 \\
        --stats-corpus ../shared/data/text/tinyshakespeare.txt --stats-tokens 100000 \\
        --variant "unscaled target" '{"normed_target": false}' \\
        --variant "normed target (default)" '{}' \\
        --variant "normed target + after_kl_factor 0.5" '{"after_kl_factor": 0.5}'

Each variant is an EditHParams override; its cases are edited alone, measured and reverted by
`real_counterfact.run_methods` (same run folders under runs/real_counterfact/, so a variant that
`real_counterfact.py --hparams` already ran is read back, and an interrupted run resumes). Besides
the CounterFact table, every variant makes the README's Eiffel Tower edit (-> Rome) and shows the
greedy continuations of probe prompts with special tokens kept: where a `<start_of_image>` run, which
decoding with skip_special_tokens hides, would show.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import publish, table  # noqa: E402
from real_counterfact import (HEADER, RUNS, check_settings, common_args, prepare, row, run_methods, run_name,  # noqa: E402
                              settings_of, stats_label, summary, unedited)

from rankone.artifacts.patch import revert_patch  # noqa: E402
from rankone.core.tokens import EditRequest  # noqa: E402
from rankone.edit.editor import Editor  # noqa: E402
from rankone.eval.metrics import continuations, degenerate  # noqa: E402
from rankone.methods.base import resolve_settings  # noqa: E402

EIFFEL = EditRequest.create("{} is located in the city of", "The Eiffel Tower", "Rome")
PROBES = ["The Eiffel Tower is located in the city of", "The Colosseum is located in the city of",
          "Thomas Edison invented the light bulb in the year", "The Louvre is located in the city of"]


def eiffel(handle, hp: EditHParams, corpus: str | None, n_new: int) -> list[list[str]]:
    """The Eiffel Tower edit under hp: one row per probe (prompt, continuation, degenerate), then reverted."""
    model, tok = handle
    ed = Editor(handle, hp, corpus, progress=False)
    patch = ed.edit([EIFFEL], keep=True)
    try:
        said = continuations(model, tok, PROBES, n_new)
    finally:
        revert_patch(model, patch)
    e = patch.edits[0]
    rel = e.delta_fro / e.diagnostics["weight_fro"]
    return [[p, repr(tok.decode(x, skip_special_tokens=False)), "yes" if degenerate(tok, x) else "no", f"{rel:.3f}"]
            for p, x in zip(PROBES, said)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(ap)
    ap.add_argument("--variant", nargs=2, action="append", metavar=("LABEL", "JSON"), required=True,
                    help="a row: its label and a JSON object of EditHParams overrides (repeat)")
    ap.add_argument("--method", default="r-rome")
    ap.add_argument("--probe-tokens", type=int, default=24, help="greedy tokens of each Eiffel probe")
    ap.set_defaults(n=30)
    args = ap.parse_args()
    if args.no_cov:
        sys.exit("--no-cov is not a variant here: run real_counterfact.py --no-cov")
    t_start = time.perf_counter()
    handle, label, sel, facts, extra = prepare(args)
    cases = sel["known"]
    before = unedited(handle, label, cases, facts, args)
    rows = [row("known", "unedited", summary([before[c.case_id] for c in cases]))]
    probes: list[list[str]] = []
    layer = handle.default_layer()
    for name, js in args.variant:
        over = dict(extra, **json.loads(js))
        hp = resolve_settings(handle, {**over, "method": args.method, "layer": layer})
        out = RUNS / run_name(label, layer, args, hp)  # the folder `real_counterfact.py --hparams JSON` uses
        check_settings(out, settings_of(args, layer, hp))
        done = run_methods(handle, cases, facts, {hp.method: hp}, out, args)[hp.method]
        rows.append(row("known", f"{args.method}, {name}", summary([done[c.case_id] for c in cases])))
        probes += [[name, *r] for r in eiffel(handle, hp, args.stats_corpus, args.probe_tokens)]
        print(f"{name}: done", flush=True)
    body = f"""Model `{label}` ({handle.n_layers} layers), edit layer {layer}; the first {len(cases)} CounterFact cases
the unedited model knows (`{args.cases}`, file order; {sel['share_known']:.1%} of {sel['scanned']} scanned are known),
each edited alone with {args.method} under each setting, measured, reverted bit-exactly. Key statistics:
{stats_label(args, resolve_settings(handle, extra).stats_tokens)[1]}. Columns as in the CounterFact section
(GNS: the neighbour's greedy continuation still states its answer; degenerate: a greedy continuation of the prompt,
paraphrase or neighbour holds a special token or one token four times in a row).

{table(HEADER, rows)}

The Eiffel Tower edit (-> Rome) under each setting: greedy continuations ({args.probe_tokens} tokens, special tokens
shown) of probe prompts; ‖Δ‖/‖W‖ of the edit.

{table(["setting", "prompt", "continuation", "degenerate", "‖Δ‖/‖W‖"], probes)}

Total {time.perf_counter() - t_start:.0f} s for this invocation (finished cases are read back from runs/real_counterfact/).
"""
    publish(f"real_variants_{label}", f"Edit settings side by side on a real model: {label}", body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
