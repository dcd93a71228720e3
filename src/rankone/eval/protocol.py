"""The before/after evaluation protocol behind `rankone eval`.

    1. cases the tokenizer cannot align are dropped (and, with known_only, those whose true answer
       the unedited model does not give), then the first n are kept, the facts a patch edits first;
    2. the unedited model is measured: ES/EM, PS/PM, NS/NM, S per case, fluency of the generation
       prompts, and optionally held-out perplexity and few-shot GLUE;
    3. either the patches are applied (fit-checked before any measuring), the model measured again
       and the patches reverted, or every case is edited alone, measured and reverted exactly
       (the papers' single-edit protocol);
    4. the summary is given for all cases, and for edited / not edited cases when a patch edits
       only some of them.

Nothing here prints; `rankone eval` prints the report's tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from rankone.artifacts.patch import Patch, apply_patch
from rankone.core.errors import RankoneError
from rankone.core.progress import track
from rankone.eval.cases import Case, edited_by
from rankone.eval.glue import glue_suite
from rankone.eval.metrics import alignable, evaluate_cases, evaluate_single_edits, fluency, knows, summarize
from rankone.methods.base import resolve_settings
from rankone.methods.settings import MethodSettings
from rankone.models.generation import perplexity
from rankone.models.handle import ModelHandle


@dataclass
class EvalSettings:
    norm: str = "mean"  # "mean" (ROME: per-token mean log-prob) or "sum" (whole target)
    gen_tokens: int = 50  # tokens generated per generation prompt for fluency (0: skip)
    ppl_text: str | None = None  # held-out text for perplexity
    glue_dir: str | None = None  # folder with GLUE subsets for few-shot scores
    glue_shots: int = 4
    glue_n: int | None = 100


@dataclass
class EvalReport:
    mode: str  # "patch" or "edit-each (METHOD)"
    hparams: dict[str, Any] | None  # with edit-each: the hyper-parameters used
    selection: dict[str, Any]  # what select_cases dropped and why
    cases: list[Case]
    before: list[dict[str, Any]]  # per-case metrics of the unedited model
    after: list[dict[str, Any]]  # per-case metrics after the edit(s); "edited" says whether the case was
    extra_before: dict[str, Any]  # perplexity, GLUE
    extra_after: dict[str, Any]
    # with patches: per case, does a patch edit rewrite the same fact (same subject and prompt),
    # perhaps towards another target ("edited" in `after` is the exact request)
    same_fact: list[bool] = field(default_factory=list)

    @property
    def n_edited(self) -> int:
        return sum(bool(m["edited"]) for m in self.after)

    def groups(self) -> dict[str, list[bool]]:
        """'all', and 'edited' / 'not edited' when only some of the cases were edited."""
        g = {"all": [True] * len(self.cases)}
        if 0 < self.n_edited < len(self.cases):
            g["edited"] = [bool(m["edited"]) for m in self.after]
            g["not edited"] = [not m["edited"] for m in self.after]
        return g

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        return {g: {"before": summarize([b for b, k in zip(self.before, keep) if k]),
                    "after": summarize([a for a, k in zip(self.after, keep) if k])} for g, keep in self.groups().items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "hparams": self.hparams, "selection": self.selection, "n_cases": len(self.cases),
            "n_edited": self.n_edited, "summary": self.summary(), "before": self.extra_before, "after": self.extra_after,
            "per_case": [{"case_id": c.case_id, "request": c.request.to_dict(), "target_true": c.target_true,
                          "before": b, "after": a} for c, b, a in zip(self.cases, self.before, self.after)],
        }


def select_cases(model: Any, tok: Any, cases: Sequence[Case], known_only: bool | str = False,
                 limit: int | None = None, chunk: int = 256) -> tuple[list[Case], dict[str, Any]]:
    """The cases fit for evaluating edits: alignable by the tokenizer and, with known_only, those
    the model knows (True or "greedy": the true answer is its greedy answer; "over-new": P(true) >
    P(new), see `knows`). With a limit, the cases are read in file order only until that many are
    found. Info says how many were read and dropped, and why."""
    for c in cases:
        c.check_editable()
    rule = ("greedy" if known_only is True else known_only) or None
    ok: list[Case] = []
    why: list[str] = []
    n_read = n_known = 0
    step = chunk if limit else max(1, len(cases))  # without a limit: all cases in one go
    for i in range(0, len(cases), step):
        part, bad = alignable(model, tok, cases[i:i + step])
        n_read += len(part) + len(bad)
        why += bad
        if rule:
            part = [c for c, y in zip(part, knows(model, tok, part, rule=rule)) if y]
            n_known += len(part)
        ok += part
        if limit and len(ok) >= limit:
            break
    info: dict[str, Any] = {"n_loaded": len(cases), "n_read": n_read, "n_unalignable": len(why), "unalignable": why[:10]}
    if rule:
        info.update(n_known=n_known, known_rule=rule)
    if not ok:
        raise RankoneError("no usable cases left" + (" (the model knows none of the true answers)" if rule else ""))
    return (ok[:limit] if limit else ok), info


def measure(model: Any, tok: Any, cases: Sequence[Case], settings: EvalSettings, label: str = "",
            progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-case metrics (and fluency) of the model as it is now, and perplexity / GLUE when asked."""
    per = evaluate_cases(model, tok, cases, settings.norm, desc=f"scoring ({label})" if progress else "")
    if settings.gen_tokens > 0:
        for c, m in track(list(zip(cases, per)), f"fluency ({label})", "cases", enabled=progress):
            m["fluency"] = fluency(model, tok, c.generation_prompts, settings.gen_tokens)[0]
    extra: dict[str, Any] = {}
    if settings.ppl_text:
        extra["perplexity"] = perplexity(model, tok, settings.ppl_text)
    if settings.glue_dir:
        extra["glue"] = glue_suite(model, tok, settings.glue_dir, shots=settings.glue_shots, n=settings.glue_n)
    return per, extra


def evaluate_before_after(
    handle: ModelHandle, cases: Sequence[Case], patches: Sequence[Patch] = (),
    hparams: MethodSettings | Mapping[str, Any] | str | None = None,
    stats_corpus: Any = None, settings: EvalSettings | None = None, known_only: bool = False, n: int | None = None,
    progress: bool = False,
) -> EvalReport:
    """Measure, edit (the patches, else each case alone with the settings `hparams` resolves to, as
    for the Editor), measure again, revert. The model is given back exactly as it was."""
    settings = settings or EvalSettings()
    model, tok = handle
    if patches:
        apply_patch(model, list(patches), handle.spec).revert()  # a patch for another model fails here, before measuring
    chosen, info = select_cases(model, tok, cases, known_only)
    info["n_usable"] = len(chosen)
    if patches and n:  # the cases a patch edits (the same fact, any target) first: --n never leaves them out
        same = edited_by(chosen, [f for p in patches for f in p.facts()])[1]
        chosen = [c for c, s in zip(chosen, same) if s] + [c for c, s in zip(chosen, same) if not s]
    chosen = chosen[:n] if n else chosen
    before, extra_b = measure(model, tok, chosen, settings, "before", progress)
    hp: MethodSettings | None = None
    same_fact: list[bool] = []
    if patches:
        applied = apply_patch(model, list(patches), handle.spec)
        try:
            after, extra_a = measure(model, tok, chosen, settings, "after", progress)
        finally:
            applied.revert()
        exact, same_fact = edited_by(chosen, [f for p in patches for f in p.facts()])
        for m, x in zip(after, exact):
            m["edited"] = x
        mode = "patch"
    else:
        hp = resolve_settings(handle, hparams)
        after = evaluate_single_edits(handle, chosen, hp, stats_corpus, settings.norm, settings.gen_tokens,
                                      progress=progress)
        for m in after:
            m["edited"] = True
        extra_a = {}
        mode = f"edit-each ({hp.method})"
    return EvalReport(mode, hp.to_dict() if hp else None, info, chosen, before, after, extra_b, extra_a, same_fact)
