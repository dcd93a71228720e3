"""Heatmaps of causal traces and plots of average indirect effects, in the style of ROME's Figure 1.

Only matplotlib's object API with the Agg canvas is used (no pyplot, no global backend switch),
so plotting works headless and never disturbs a user's own matplotlib session. Files are
written atomically.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

from rankone.core.atomic import write_bytes
from rankone.trace.runs import CaseTrace
from rankone.trace.tracing import AIE

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
COLOURS = {"hidden": "#6a51a3", "mlp": "#238b45", "attn": "#cb181d"}
NAMES = {"hidden": "single restored layer", "mlp": "MLP", "attn": "Attn"}


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=150)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    write_bytes(path, buf.getvalue())


def token_labels(trace: CaseTrace) -> list[str]:
    """Prompt tokens for the y axis, the subject's marked with '*' (as in the paper)."""
    first, last = trace.subject_range
    return [repr(t.strip() or t)[1:-1] + ("*" if first <= i <= last else "") for i, t in enumerate(trace.tokens)]


def plot_trace(trace: CaseTrace, kind: str, path: str | os.PathLike, model_name: str = "") -> None:
    """One heatmap: tokens (rows) × layers (columns), colour = p(answer) with that state restored."""
    scores = trace.scores[kind]  # [n_positions, n_layers]
    labels = [token_labels(trace)[i] for i in trace.positions]
    n_layers = len(scores[0])
    fig = _figure((max(3.5, 0.35 * n_layers + 1.8), 0.28 * len(labels) + 1.4))
    ax = fig.add_subplot(1, 1, 1)
    img = ax.pcolor(scores, cmap=CMAPS[kind], vmin=min(trace.p_corrupted, min(map(min, scores))),
                    vmax=max(trace.p_clean, max(map(max, scores))))
    ax.invert_yaxis()
    ax.set_yticks([0.5 + i for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=8)
    step = max(1, n_layers // 10)
    ax.set_xticks([0.5 + i for i in range(0, n_layers, step)])
    ax.set_xticklabels([str(i) for i in range(0, n_layers, step)], fontsize=8)
    what = {"hidden": "state", "mlp": "MLP", "attn": "Attn"}[kind]
    ax.set_title(f"Impact of restoring {what} after corrupted input", fontsize=9)
    on = f" within {model_name}" if model_name else ""
    if kind == "hidden":
        ax.set_xlabel(f"single restored layer{on}", fontsize=8)
    elif trace.window == 1:
        ax.set_xlabel(f"single restored {what} layer{on}", fontsize=8)
    else:
        ax.set_xlabel(f"center of interval of {trace.window} restored {what} layers", fontsize=8)
    cb = fig.colorbar(img, ax=ax)
    cb.ax.tick_params(labelsize=7)
    cb.set_label(f"p({trace.answer_token.strip()})", fontsize=8)
    _save(fig, path)


def plot_aie(aie: AIE, path: str | os.PathLike, chosen: int | None = None, title: str = "",
             quality: dict[str, Sequence[float]] | None = None) -> None:
    """AIE per layer at the last subject token, one line per kind (± standard error).

    chosen: a layer to mark (the one `--layer auto` picks); quality: optional per-layer edit
    metrics (e.g. {"ES": [...], "PS": [...]}, NaN at layers not measured; up to three) drawn on a
    second axis to compare against.
    """
    fig = _figure((5.2, 3.0))
    ax = fig.add_subplot(1, 1, 1)
    n = len(next(iter(aie.aie.values())))
    xs = list(range(n))
    for kind, ys in aie.aie.items():
        err = aie.sem.get(kind, [0.0] * n)
        label = "hidden state" if kind == "hidden" else f"{NAMES[kind]} (window {aie.window})"
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=3, capsize=2, color=COLOURS[kind], label=label)
    if chosen is not None:
        ax.axvline(chosen, color="grey", ls="--", lw=1, label=f"--layer auto: {chosen}")
    ax.set_xticks(xs)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("average indirect effect on p(answer)", fontsize=8)
    ax.set_title(title or f"Average indirect effect at the last subject token ({aie.n_facts} facts)", fontsize=9)
    ax.tick_params(labelsize=7)
    handles, labels = ax.get_legend_handles_labels()
    if quality:
        ax2 = ax.twinx()
        for (name, ys), style in zip(quality.items(), (":", "-.", "--")):
            pts = [(x, y) for x, y in zip(xs, ys) if y == y]  # NaN: a layer the sweep did not edit
            ax2.plot([x for x, _ in pts], [y for _, y in pts], ls=style, color="black", lw=1, marker="x", ms=3,
                     label=f"edit {name}")
        ax2.set_ylabel("edit quality (fraction)", fontsize=8)
        ax2.set_ylim(-0.03, 1.03)
        ax2.tick_params(labelsize=7)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    fig.legend(handles, labels, fontsize=6, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 0.0), frameon=False)
    _save(fig, path)
