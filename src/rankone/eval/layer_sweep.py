"""Which layer edits best, measured (`rankone bench layers`; what `rankone edit --layer auto` reads).

    for each candidate layer l:   each of n cases the model knows is edited alone at l, scored, reverted
    S(l) = hmean(ES(l), PS(l), NS(l))          (ROME's single-edit protocol, `evaluate_single_edits`)
    best = argmax_l S(l)                        (`EditSweep.best_layer`)

Causal tracing is cheaper but answers another question (where the fact is recalled): on Gemma 3
270M its layer scored 0.083 S below the best measured one. `rankone bench layers` stores the
result per model fingerprint (`trace.layer_choice.save_sweep`), so one run serves every later
`--layer auto`; eval only measures (it never imports trace).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rankone.core.errors import RankoneError
from rankone.eval.cases import Case
from rankone.eval.metrics import evaluate_single_edits, summarize
from rankone.eval.protocol import select_cases
from rankone.methods.hparams import EditHParams
from rankone.models.handle import ModelHandle

Log = Callable[[str], None]


@dataclass
class LayerScores:
    scores: dict[int, dict[str, float]]  # layer -> {"es", "ps", "ns", "score", "n"}
    method: str
    cases: str  # where the cases came from and how they were chosen
    n_cases: int
    settings: dict[str, Any]  # what the edits ran with, their layer aside


def sweep_layers(
    handle: ModelHandle, cases: Sequence[Case], layers: Sequence[int], hparams: EditHParams, n: int,
    known_only: bool | str = "over-new", stats_corpus: Any = None, source: str = "", progress: bool = False,
    log: Log | None = None,
) -> LayerScores:
    """Single-edit ES/PS/NS/S of the first n usable cases at each layer. The model is given back
    exactly as it was."""
    model, tok = handle
    n_layers = handle.n_layers
    bad = [l for l in layers if not 0 <= int(l) < n_layers]
    if bad:
        raise RankoneError(f"layers {bad} are out of range: this model has layers 0..{n_layers - 1}")
    if len(set(layers)) < 2:
        raise RankoneError("a sweep compares layers: give at least two, e.g. --layers 1 2 3 4")
    chosen, _ = select_cases(model, tok, cases, known_only, limit=n)
    if len(chosen) < n:
        raise RankoneError(f"only {len(chosen)} usable case(s) in {source or 'the cases'}, {n} asked; lower --n")
    hp = hparams.over(handle)
    scores: dict[int, dict[str, float]] = {}
    for layer in sorted(set(int(l) for l in layers)):
        after = evaluate_single_edits(handle, None, chosen, hp.replace(layer=layer), stats_corpus, gen_tokens=0,
                                      progress=progress)
        s = summarize(after)
        scores[layer] = {k: float(s[k]) for k in ("es", "ps", "ns", "score")} | {"n": len(after)}
        if log is not None:
            log(f"layer {layer}: ES {s['es']:.3f} PS {s['ps']:.3f} NS {s['ns']:.3f} S {s['score']:.3f}")
    rule = "greedy" if known_only is True else (known_only or "all")
    how = f"{source or 'cases'}: the first {len(chosen)} " + ("usable" if rule == "all" else f"known ({rule})")
    settings = {"stats": str(stats_corpus) if stats_corpus else "the model's default corpus",
                **{k: v for k, v in hp.to_dict().items() if k not in ("layer", "method")}}
    return LayerScores(scores, hp.method, how, len(chosen), settings)
