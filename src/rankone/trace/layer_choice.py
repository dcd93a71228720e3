"""Choosing the layer to edit by causal tracing (`rankone edit --layer auto`).

    layer = argmax_l AIE(mlp, l)    the layer whose MLP output, restored at the subject's last token,
                                    brings back most of the answer's probability (Meng et al. 2022, §2)

Evidence comes from, in order: facts the caller names (a case file), this model's cached AIE with
the most facts, facts the model card says the model knows (its `cases`), or the edit requests
themselves traced with the model's own greedy answers. Evidence that was tried and could not be
used is kept, with the reason, in `LayerChoice.not_used`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rankone.core.errors import RankoneError
from rankone.trace import MAX_CASES
from rankone.core.tokens import EditRequest
from rankone.models.handle import ModelHandle
from rankone.trace.runs import TraceSettings
from rankone.trace.tracing import AIE, SubjectPrompt, best_cached_aie, cached_aie, model_fingerprint, sample_facts

AUTO_FACTS = 100  # facts the model card names, traced for --layer auto

Progress = Callable[[int, int], None]


@dataclass
class FactSet:
    """Facts to trace, the subjects that set the noise scale, and where they came from."""

    facts: list[SubjectPrompt]
    subjects: list[str]
    source: str


@dataclass
class LayerChoice:
    layer: int
    aie: AIE
    model_sha256: str
    not_used: list[str] = field(default_factory=list)  # evidence tried first, and why it could not be used

    def evidence(self) -> dict[str, Any]:
        """What a patch records about the choice (its edits' diagnostics['layer_choice'])."""
        a = self.aie
        d = {
            "how": "largest average indirect effect of restoring MLP outputs at the last subject token (causal tracing)",
            "layer": self.layer, "kind": "mlp", "aie": a.aie["mlp"], "sem": a.sem.get("mlp", []),
            "n_facts": a.n_facts, "n_wrong": a.n_wrong, "window": a.window, "noise_scale": a.noise_scale,
            "settings": a.settings, "source": a.source, "cache_file": a.cache_file, "model_sha256": self.model_sha256,
        }
        if self.not_used:
            d["not_used"] = list(self.not_used)
        return d


def choose_layer(handle: ModelHandle, requests: Sequence[EditRequest], cases: FactSet | None = None,
                 known: Callable[[], FactSet | None] | None = None, progress: Progress | None = None) -> LayerChoice:
    """The layer with the largest average MLP indirect effect at the last subject token, and why.

    `cases`: facts the caller names (traced, at most MAX_CASES); `known`: loads the facts the model
    card names (called only when needed; AUTO_FACTS of them traced); `requests`: the edits, traced
    last with the model's own answers. AIEs are cached per model, so a second choice is instant.
    """
    settings = TraceSettings(kinds=["mlp"])  # fixed noise seed: the choice does not depend on the edit's seed
    model, tok = handle
    with handle.scope():
        fp = model_fingerprint(model)
        aie: AIE | None = None
        tried: list[str] = []
        if cases is not None:
            aie = cached_aie(model, tok, sample_facts(cases.facts, MAX_CASES), settings, cases.subjects, cases.source,
                             fp, progress)
        if aie is None:
            aie = best_cached_aie(fp)
            if aie is not None and not aie.source:
                aie.source = "cache"
        known_set: FactSet | None = None
        if aie is None and known is not None:
            try:
                known_set = known()
                if known_set is not None and known_set.facts:
                    aie = cached_aie(model, tok, sample_facts(known_set.facts, AUTO_FACTS), settings, known_set.subjects,
                                     known_set.source, fp, progress)
            except RankoneError as e:
                tried.append(f"{known_set.source if known_set else 'the model card facts'}: {e}")
        if aie is None:
            facts = [SubjectPrompt(r.prompt, r.subject, None) for r in requests]
            if not facts:
                raise RankoneError("--layer auto needs edit requests, facts the model knows (a case file or its model "
                                   "card's cases) or a traced case file to choose a layer from")
            subjects = [f.subject for f in facts] + (known_set.subjects if known_set else [])
            try:
                aie = cached_aie(model, tok, facts, settings, subjects, "edit requests (the model's own answers)", fp,
                                 progress)
            except RankoneError as e:
                tried.append(f"edit requests: {e}")
        if aie is None:
            raise RankoneError("cannot choose the layer by causal tracing (" + "; ".join(tried) + "); give --layer N, or "
                               "first run `rankone trace --model DIR --cases FILE` with facts the model answers correctly")
    return LayerChoice(aie.best_layer("mlp"), aie, fp, tried)
