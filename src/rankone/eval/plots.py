"""Figures and the Markdown summary of sequential-editing runs (matplotlib, Agg backend).

In the style of the r-ROME paper's figures: ‖Δ‖_F of each update against the edit index (log
scale, methods overlaid); the evaluation metrics against the number of edits; and the mechanism
behind ROME's disabling edits, the distribution of the three denominators k_oᵀC⁻¹k̄ (ROME),
k̄ᵀC⁻¹k̄ (r-ROME) and k_oᵀC⁻¹k_o (p-ROME) over the same requests.
"""

from __future__ import annotations

import io
import math
import os
import statistics
import zlib
from pathlib import Path
from typing import Any, Sequence

from rankone.core.atomic import write_bytes
from rankone.core.util import mean, median

COLOURS = {"rome": "tab:red", "r-rome": "tab:blue", "p-rome": "tab:green", "r-rome-bare": "tab:cyan", "r-rome-2key": "tab:olive", "memit": "tab:purple", "alphaedit": "tab:orange"}
SPARE_COLOURS = ("tab:brown", "tab:pink", "tab:gray")
Runs = dict[str, list[dict[str, Any]]]  # label -> JSONL records of one run


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    write_bytes(path, buf.getvalue())
    return Path(path)


def _colour(label: str) -> str:
    """A method's own colour; another label (a variant, e.g. "alphaedit@0.05") one of the colours
    no method uses, the same one every time."""
    key = label.split()[0].split("/")[-1]
    return COLOURS.get(key) or SPARE_COLOURS[zlib.crc32(key.encode()) % len(SPARE_COLOURS)]


def plot_delta_norms(runs: Runs, path: str | os.PathLike, title: str = "") -> Path:
    """‖Δ‖_F of every update against the edit index; refused updates marked with ×."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, recs in runs.items():
        ed = [r for r in recs if r["type"] == "edit" and r.get("delta_fro") is not None]
        ok = [r for r in ed if r["accepted"]]
        ax.plot([r["i"] for r in ok], [r["delta_fro"] for r in ok], ".", ms=3, alpha=0.7, label=label, color=_colour(label))
        bad = [r for r in ed if not r["accepted"] and r["delta_fro"] > 0]
        if bad:
            ax.plot([r["i"] for r in bad], [r["delta_fro"] for r in bad], "x", ms=7, color=_colour(label),
                    label=f"{label}: refused by the guard ({len(bad)})")
    ax.set_yscale("log")
    ax.set_xlabel("edit number")
    ax.set_ylabel("‖Δ‖_F of the update")
    ax.set_title(title or "Norm of each sequential update")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


PANELS = [
    ("es_newest", "ES of the newest edits"), ("retention_es", "retention of earlier edits (ES)"),
    ("probe_top1", "never-edited facts (top-1)"), ("ns", "neighbourhood score NS"),
    ("fluency", "fluency (n-gram entropy)"), ("w_dist", "‖W − W₀‖_F"),
    ("perplexity", "held-out perplexity"), ("retention_kept", "retention of edits that worked"),
    ("retention_ps", "paraphrases of earlier edits (PS)"), ("gs", "generation-based success (fixed sample)"),
]


def plot_metrics(runs: Runs, path: str | os.PathLike, title: str = "") -> Path:
    """Each evaluation metric against the number of edits, methods overlaid."""
    plt = _plt()
    panels = [(k, t) for k, t in PANELS if any(r.get(k) is not None for recs in runs.values() for r in recs
                                                 if r["type"] == "eval")]
    cols = 2
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(10, 2.8 * rows), squeeze=False)
    for ax, (key, name) in zip(axes.flat, panels):
        for label, recs in runs.items():
            ev = [r for r in recs if r["type"] == "eval" and r.get(key) is not None]
            ax.plot([r["n"] for r in ev], [r[key] for r in ev], "-", lw=1.5, label=label, color=_colour(label))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("number of edits", fontsize=8)
        ax.grid(alpha=0.3)
        if key in ("w_dist", "perplexity"):
            ax.set_yscale("log")
        elif key not in ("fluency",):
            ax.set_ylim(-0.03, 1.03)
            ax.axhline(0.9, color="grey", lw=0.6, ls=":")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(title or "Sequential editing", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_denominators(runs: Runs, path: str | os.PathLike, title: str = "") -> Path:
    """Distribution of the denominators over the run's requests, and of ROME's ratio to r-ROME's.

    Each update records all three, whichever method wrote it; the left panel pools the runs.
    """
    plt = _plt()
    ed = [r for recs in runs.values() for r in recs if r["type"] == "edit" and r.get("denom_mean_mean") is not None]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.6))
    series = [("denom_bare_mean", "ROME  k_oᵀC⁻¹k̄", "tab:red"), ("denom_mean_mean", "r-ROME  k̄ᵀC⁻¹k̄", "tab:blue"),
              ("denom_bare_bare", "p-ROME  k_oᵀC⁻¹k_o", "tab:green")]
    vals = [v for k, _, _ in series for r in ed if (v := r.get(k)) is not None and v > 0]
    if vals:
        lo, hi = math.log10(min(vals)), math.log10(max(vals))
        bins = [10 ** (lo + (hi - lo + 1e-9) * i / 40) for i in range(41)]
        for k, name, c in series:
            xs = [r[k] for r in ed if r.get(k) is not None]
            neg = sum(1 for x in xs if x <= 0)
            a1.hist([x for x in xs if x > 0], bins=bins, alpha=0.45, color=c,
                    label=name + (f" ({neg} ≤ 0)" if neg else ""))
        a1.set_xscale("log")
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

        # a short log axis: label 1-2-5 steps plainly, and no minor-tick labels (they collide)
        a1.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        a1.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        a1.xaxis.set_minor_formatter(NullFormatter())
    a1.set_xlabel("denominator")
    a1.set_ylabel("updates")
    a1.legend(fontsize=7)
    a1.set_title("denominators of the update", fontsize=10)
    ratio = [r["denom_bare_mean"] / r["denom_mean_mean"] for r in ed if r["denom_mean_mean"]]
    a2.hist(ratio, bins=40, color="tab:purple", alpha=0.7)
    a2.axvline(1.0, color="k", lw=0.6)
    a2.set_xlabel("k_oᵀC⁻¹k̄ / k̄ᵀC⁻¹k̄  (ROME ÷ r-ROME)")
    a2.set_title(f"ratio (min {min(ratio):.3g}, median {statistics.median(ratio):.3g})" if ratio else "ratio",
                 fontsize=10)
    cos = [r["key_cosine"] for r in ed if r.get("key_cosine") is not None]
    a3.hist(cos, bins=40, color="tab:gray", alpha=0.8)
    a3.set_xlabel("cosine(k̄, k_o)")
    a3.set_title(f"key cosine (mean {statistics.mean(cos):.3f})" if cos else "key cosine", fontsize=10)
    fig.suptitle(title or "Why ROME's updates can blow up: the denominator", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def plot_runs(runs: Runs, out_dir: str | os.PathLike, prefix: str = "", title: str = "") -> list[Path]:
    """The figures for a set of runs, into out_dir; the denominators only where a run has them
    (the batch methods, MEMIT and AlphaEdit, have none)."""
    d = Path(out_dir)
    t = f" — {title}" if title else ""
    figs = [plot_delta_norms(runs, d / f"{prefix}delta_norms.png", "‖Δ‖_F per sequential edit" + t),
            plot_metrics(runs, d / f"{prefix}metrics.png", "Metrics against the number of edits" + t)]
    if any(r.get("denom_mean_mean") is not None for recs in runs.values() for r in recs):
        figs.append(plot_denominators(runs, d / f"{prefix}denominators.png", "Denominators of the rank-one update" + t))
    return figs
# ---- the summary ------------------------------------------------------------------------------


def first_below(evals: Sequence[dict[str, Any]], key: str, level: float = 0.9) -> int | None:
    """The first evaluation point (number of edits) where `key` is below `level` (None: never)."""
    for r in evals:
        if r.get(key) is not None and r["n"] > 0 and r[key] < level:
            return int(r["n"])
    return None


def summarize_run(settings: dict[str, Any], recs: Sequence[dict[str, Any]], level: float = 0.9) -> dict[str, Any]:
    edits = [r for r in recs if r["type"] == "edit"]
    evals = [r for r in recs if r["type"] == "eval"]
    acc = [r for r in edits if r["accepted"]]
    norms = sorted(r["delta_fro"] for r in acc if r.get("delta_fro") is not None)
    base, last = (evals[0] if evals else {}), (evals[-1] if evals else {})
    out: dict[str, Any] = {
        "method": settings.get("method"), "layer": settings.get("layer"), "layers": settings.get("layers"),
        "batch_size": settings.get("config", {}).get("batch_size", 1), "n_attempted": len(edits),
        "n_accepted": len(acc), "n_refused": len(edits) - len(acc),
        "refusals": [f"edit {r['i']}: {r.get('reason')}" for r in edits if not r["accepted"]][:20],
        "delta_fro_median": median(norms), "delta_fro_max": norms[-1] if norms else None,
        "n_spikes": sum(1 for r in acc if r.get("flags")),
        "spikes": [r["i"] for r in acc if r.get("flags")][:50],
        "fluency_collapses": [f for r in evals for f in r.get("flags", [])][:20],
        "es_immediate": mean([r["es"] for r in acc]),
        "denominator_min": min((r["denominator"] for r in edits if r.get("denominator") is not None), default=None),
        "key_cosine_mean": mean([r.get("key_cosine") for r in edits]),
        "seconds_per_edit": mean([r["seconds"] for r in edits]),
    }
    for k in ("retention_es", "retention_kept", "retention_top1", "probe_top1", "ns", "es_newest"):
        out[f"first_below_{k}"] = first_below(evals, k, level)
    for k in ("fluency", "perplexity", "ns", "probe_top1", "w_dist"):
        out[f"{k}_start"], out[f"{k}_end"] = base.get(k), last.get(k)
    for k in ("retention_es", "retention_kept", "retention_top1", "es_newest", "retention_ps", "gs", "gps"):
        out[f"{k}_end"] = last.get(k)
    out["w_dist_layers_end"] = last.get("w_dist_layers")  # a batch method's window: layer -> ‖W − W₀‖_F
    out["wall_seconds"] = sum(r.get("seconds") or 0.0 for r in recs)  # edits and evaluations, summed from the records
    out["level"] = level
    return out


def _f(x: Any, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) >= 100 else f"{x:.{nd}f}"
    return str(x)


def _at(x: Any) -> str:
    return "never" if x is None else str(x)


def _where(s: dict[str, Any]) -> str:
    """'layer 3', or for a batch method 'layers 1–3, batches of 100'."""
    if not s.get("layers"):
        return f"layer {s['layer']}"
    ls = s["layers"]
    return (f"layers {ls[0]}–{ls[-1]}" if len(ls) > 1 else f"layer {ls[0]}") + f", batches of {s.get('batch_size', 1)}"


def summary_markdown(summaries: Sequence[dict[str, Any]]) -> str:
    """A Markdown table comparing methods' runs."""
    rows = [
        ("edits attempted / written / refused", lambda s: f"{s['n_attempted']} / {s['n_accepted']} / {s['n_refused']}"),
        ("‖Δ‖_F median / max", lambda s: f"{_f(s['delta_fro_median'])} / {_f(s['delta_fro_max'])}"),
        ("‖Δ‖ spikes (> factor × running median)", lambda s: str(s["n_spikes"])),
        ("fluency collapses", lambda s: str(len(s["fluency_collapses"]))),
        ("ES right after each edit (mean)", lambda s: _f(s["es_immediate"])),
        ("ES of newest edits: first below 0.9 at", lambda s: _at(s["first_below_es_newest"])),
        ("retention of earlier edits (ES): first below 0.9 at", lambda s: _at(s["first_below_retention_es"])),
        ("retention of edits that worked: first below 0.9 at", lambda s: _at(s["first_below_retention_kept"])),
        ("never-edited facts (top-1): first below 0.9 at", lambda s: _at(s["first_below_probe_top1"])),
        ("NS: first below 0.9 at", lambda s: _at(s["first_below_ns"])),
        ("retention ES / kept / top-1 at the end", lambda s: f"{_f(s['retention_es_end'])} / {_f(s['retention_kept_end'])} / {_f(s['retention_top1_end'])}"),
        ("PS of earlier edits at the end", lambda s: _f(s.get("retention_ps_end"))),
        ("generation-based success (prompt / paraphrase) at the end",
         lambda s: f"{_f(s.get('gs_end'))} / {_f(s.get('gps_end'))}"),
        ("never-edited top-1 start → end", lambda s: f"{_f(s['probe_top1_start'])} → {_f(s['probe_top1_end'])}"),
        ("NS start → end", lambda s: f"{_f(s['ns_start'])} → {_f(s['ns_end'])}"),
        ("fluency start → end", lambda s: f"{_f(s['fluency_start'])} → {_f(s['fluency_end'])}"),
        ("perplexity start → end", lambda s: f"{_f(s['perplexity_start'])} → {_f(s['perplexity_end'])}"),
        ("‖W − W₀‖_F at the end", lambda s: _f(s["w_dist_end"])),
        ("‖W − W₀‖_F per layer at the end", lambda s: ", ".join(f"L{k} {_f(v)}" for k, v in
                                                                (s.get("w_dist_layers_end") or {}).items()) or "–"),
        ("smallest denominator", lambda s: _f(s["denominator_min"])),
        ("key cosine k̄·k_o (mean)", lambda s: _f(s["key_cosine_mean"])),
        ("seconds per edit", lambda s: _f(s["seconds_per_edit"], 2)),
        ("wall time of the run (edits + evaluations)", lambda s: f"{s.get('wall_seconds', 0) / 3600:.2f} h"),
    ]
    head = "| | " + " | ".join(f"{s.get('label') or s['method']} ({_where(s)})" for s in summaries) + " |"
    lines = [head, "|---|" + "---|" * len(summaries)]
    lines += [f"| {name} | " + " | ".join(fn(s) for s in summaries) + " |" for name, fn in rows]
    return "\n".join(lines)


def report(run_dirs: dict[str, str | os.PathLike], out_dir: str | os.PathLike, title: str = "",
           prefix: str = "", upto: int | None = None) -> dict[str, Any]:
    """Figures, summary.json and summary.md for runs (label -> run folder) into out_dir; with
    `upto`, each run as it stood after its first `upto` edits (to compare runs at one point)."""
    import json

    from rankone.core.atomic import write_json
    from rankone.eval.sequential import read_run

    runs, sums = {}, []
    for label, d in run_dirs.items():
        settings, recs = read_run(d)
        if upto is not None:
            recs = [r for r in recs if (r["i"] < upto if r["type"] == "edit" else r.get("n", 0) <= upto)]
        runs[label] = recs
        sums.append(dict(summarize_run(settings, recs), label=label, folder=str(d)))
    figs = plot_runs(runs, out_dir, prefix, title)
    md = (f"# Sequential editing{': ' + title if title else ''}\n\n{summary_markdown(sums)}\n\n"
          + "".join(f"![{f.stem}]({f.name})\n\n" for f in figs))
    write_bytes(Path(out_dir) / f"{prefix}summary.md", md.encode())
    write_json(Path(out_dir) / f"{prefix}summary.json", {"runs": sums, "figures": [str(f) for f in figs]})
    return {"summaries": sums, "figures": figs, "markdown": md, "json": json.dumps(sums)}
