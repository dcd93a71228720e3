"""Choosing the layer to edit (`rankone edit --layer auto`): by measured edits, else by causal tracing.

    layer = argmax_l S(l)           where a sweep of single edits was measured on this model
                                    (`rankone bench layers`): S = hmean(ES, PS, NS) at layer l
    layer = argmax_l AIE(mlp, l)    otherwise: the layer whose MLP output, restored at the subject's
                                    last token, brings back most of the answer's probability
                                    (Meng et al. 2022, §2)

Tracing says where a fact is recalled, not where an edit works best (Hase et al. 2023): on Gemma 3
270M the MLP AIE peaks at layer 5 while edits score best at layer 1 (BENCHMARKS.md, "Layer choice
on a real model"). So a measured sweep, when this model has one cached, decides. Without one,
the AIE comes from, in order: facts the caller names (a case file), this model's cached AIE with
the most facts, facts the model card says the model knows (its `cases`), or the edit requests
themselves traced with the model's own greedy answers. Evidence that was tried and could not be
used is kept, with the reason, in `LayerChoice.not_used`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from rankone.core.atomic import write_cache
from rankone.core.jsonfiles import loads
from rankone.core.errors import RankoneError
from rankone.methods.cache import cache_root
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


SWEEP_SCHEMA = "rankone.layer_sweep/1"
# A sweep decides `--layer auto` only when measured on at least this many cases: one case moves a
# layer's ES or PS by 1/n, and the layers of the real models' sweeps differ in S by a few hundredths
# (BENCHMARKS.md, "Layer choice on a real model"), so a sweep of a handful of cases picks by chance.
MIN_SWEEP_CASES = 20


@dataclass
class EditSweep:
    """Single-edit quality per layer, measured on one model: each case edited alone, scored, reverted."""

    scores: dict[int, dict[str, float]]  # layer -> {"es", "ps", "ns", "score", "n"}
    method: str
    cases: str  # where the cases came from, and how they were chosen
    n_cases: int
    settings: dict[str, Any]  # what the edits ran with: statistics and hyper-parameters (their layer aside)
    model_sha256: str
    cache_file: str = ""

    def best_layer(self) -> int:
        """Highest S; a tie goes to the higher ES + PS, then to the earlier layer."""
        return max(self.scores, key=lambda l: (self.scores[l]["score"], self.scores[l]["es"] + self.scores[l]["ps"], -l))

    def same_setting(self, other: "EditSweep") -> bool:
        return (self.method, self.cases, self.n_cases, self.settings, self.model_sha256) == \
            (other.method, other.cases, other.n_cases, other.settings, other.model_sha256)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SWEEP_SCHEMA, "scores": {str(l): v for l, v in sorted(self.scores.items())},
                "method": self.method, "cases": self.cases, "n_cases": self.n_cases, "settings": self.settings,
                "model_sha256": self.model_sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any], cache_file: str = "") -> "EditSweep":
        if d.get("schema") != SWEEP_SCHEMA:
            raise ValueError(f"not a {SWEEP_SCHEMA} record")
        return cls({int(l): dict(v) for l, v in d["scores"].items()}, d["method"], d["cases"], int(d["n_cases"]),
                   dict(d["settings"]), d["model_sha256"], cache_file)


def sweep_file(model_fp: str, method: str) -> Path:
    return cache_root() / "layers" / model_fp[:32] / f"sweep-{method}.json"


def cached_sweep(model_fp: str, method: str = "r-rome") -> EditSweep | None:
    """This model's measured sweep for `method` (None: none, or unreadable, or of another model)."""
    f = sweep_file(model_fp, method)
    try:
        sw = EditSweep.from_dict(loads(f.read_bytes(), str(f)), str(f))
    except (OSError, RankoneError, ValueError, KeyError, TypeError, AttributeError):
        return None
    ok = sw.model_sha256 == model_fp and sw.method == method and sw.n_cases >= MIN_SWEEP_CASES
    return sw if ok else None


def save_sweep(sweep: EditSweep) -> EditSweep:
    """Store the sweep as this model's evidence; layers measured before with the same setting are
    kept beside the new ones (a sweep may be run a few layers at a time). Returns what is stored.
    A sweep of fewer than MIN_SWEEP_CASES cases is refused: it would decide by chance."""
    if sweep.n_cases < MIN_SWEEP_CASES:
        raise RankoneError(f"a sweep of {sweep.n_cases} case(s) is too few to decide --layer auto; measure at least "
                           f"{MIN_SWEEP_CASES} (--n {MIN_SWEEP_CASES})")
    old = cached_sweep(sweep.model_sha256, sweep.method)
    scores = {**(old.scores if old is not None and old.same_setting(sweep) else {}), **sweep.scores}
    merged = EditSweep(scores, sweep.method, sweep.cases, sweep.n_cases, sweep.settings, sweep.model_sha256)
    f = sweep_file(sweep.model_sha256, sweep.method)
    merged.cache_file = str(f) if write_cache(f, merged.to_dict(), "layer sweep") else ""
    return merged


@dataclass
class LayerChoice:
    layer: int
    aie: AIE | None  # the tracing evidence (None: a measured sweep decided)
    model_sha256: str
    not_used: list[str] = field(default_factory=list)  # evidence tried first, and why it could not be used
    sweep: EditSweep | None = None

    def explain(self) -> str:
        """One line: which layer and why."""
        if self.sweep is not None:
            sw, sc = self.sweep, self.sweep.scores[self.layer]
            return (f"layer auto: layer {self.layer} (S {sc['score']:.3f}, the best of layers {sorted(sw.scores)} measured "
                    f"by `rankone bench layers` on {sw.n_cases} cases; {sw.cache_file})")
        assert self.aie is not None
        a = self.aie.aie["mlp"]
        return (f"layer auto: layer {self.layer} (MLP AIE {a[self.layer]:.4f}, the largest over layers 0..{len(a) - 1}; "
                f"{self.aie.n_facts} facts from {self.aie.source}; `rankone bench layers` measures edits per layer instead)")

    def evidence(self) -> dict[str, Any]:
        """What a patch records about the choice (its edits' diagnostics['layer_choice'])."""
        if self.sweep is not None:
            sw = self.sweep
            return {"how": "highest S = hmean(ES, PS, NS) of single edits measured at each layer (rankone bench layers)",
                    "layer": self.layer, "kind": "sweep", "scores": {str(l): v for l, v in sorted(sw.scores.items())},
                    "method": sw.method, "n_facts": sw.n_cases, "source": sw.cases, "settings": sw.settings,
                    "cache_file": sw.cache_file, "model_sha256": self.model_sha256}
        a = self.aie
        assert a is not None
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
    """The best layer of this model's measured sweep (r-ROME's, cached by `rankone bench layers`),
    else the layer with the largest average MLP indirect effect at the last subject token; and why.

    `cases`: facts the caller names (traced, at most MAX_CASES); `known`: loads the facts the model
    card names (called only when needed; AUTO_FACTS of them traced); `requests`: the edits, traced
    last with the model's own answers. AIEs are cached per model, so a second choice is instant.
    """
    settings = TraceSettings(kinds=["mlp"])  # fixed noise seed: the choice does not depend on the edit's seed
    fp = model_fingerprint(handle.model)
    sweep = cached_sweep(fp)
    if sweep is not None and len(sweep.scores) >= 2:
        return LayerChoice(sweep.best_layer(), None, fp, sweep=sweep)
    aie: AIE | None = None
    tried: list[str] = []
    if cases is not None:
        aie = cached_aie(handle, sample_facts(cases.facts, MAX_CASES), settings, cases.subjects, cases.source,
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
                aie = cached_aie(handle, sample_facts(known_set.facts, AUTO_FACTS), settings, known_set.subjects,
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
            aie = cached_aie(handle, facts, settings, subjects, "edit requests (the model's own answers)", fp,
                             progress)
        except RankoneError as e:
            tried.append(f"edit requests: {e}")
    if aie is None:
        raise RankoneError("cannot choose the layer by causal tracing (" + "; ".join(tried) + "); give --layer N, or "
                           "first run `rankone trace --model DIR --cases FILE` with facts the model answers correctly")
    return LayerChoice(aie.best_layer("mlp"), aie, fp, tried)
