"""Causal tracing over many facts (Meng et al. 2022, §2): the noise scale and the average indirect effect.

    ν = noise_factor · σ, σ = std of the embeddings of subject tokens (cached per embedding weights)
    AIE(kind, layer) = mean over facts of IE at the subject's last token (cached per model)

The clean, corrupted and restored runs on one prompt (`trace_case`, `TraceSettings`) are
`rankone.trace.runs`; the layer choice built on the AIE is `rankone.trace.layer_choice`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence, TypeVar

import torch

from rankone.core import architectures as arch
from rankone.core.atomic import write_cache
from rankone.core.jsonfiles import loads
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import model_sha256, tensor_sha256
from rankone.methods.cache import cache_root
from rankone.models.handle import ModelHandle
from rankone.core.tokens import encode, token_span
from rankone.trace.runs import TraceSettings, default_window, trace_case

log = logging.getLogger(__name__)
SCHEMA = "rankone.trace.tracing/1"


# ---- noise scale ----------------------------------------------------------------------------


@torch.no_grad()
def subject_embedding_std(handle: ModelHandle, subjects: Sequence[str]) -> float:
    """σ: the standard deviation of all elements of the subjects' token embeddings (paper's recipe)."""
    tok = handle.tokenizer
    embed = arch.get_module(handle.model, handle.spec.embed)
    d = int(embed.weight.shape[-1])
    dev = next(embed.parameters()).device
    rows = []
    for s in dict.fromkeys(subjects):  # unique, in order
        ids, offsets = encode(tok, s)
        first, last = token_span(tok, s, 0, len(s), offsets)
        rows.append(embed(torch.tensor(ids[first:last + 1], device=dev)).float().reshape(-1, d).cpu())
    if not rows:
        raise RankoneError("no subjects to measure the noise scale on; give cases or an explicit noise scale")
    return float(torch.cat(rows).std())


def noise_sigma(handle: ModelHandle, subjects: Sequence[str]) -> float:
    """σ, cached per (embedding weights, subject set) under <cache>/trace/noise-*.json."""
    emb = arch.get_module(handle.model, handle.spec.embed).weight
    subj = sorted(set(subjects))
    key = {"schema": SCHEMA, "embed": tensor_sha256(emb),
           "subjects": hashlib.sha256("\0".join(subj).encode()).hexdigest()}
    f = cache_root() / "trace" / f"noise-{_digest(key)}.json"
    try:
        d = loads(f.read_bytes(), str(f))
        if d.get("key") == key and isinstance(d.get("sigma"), float):
            return d["sigma"]
    except (OSError, RankoneError):
        pass
    sigma = subject_embedding_std(handle, subj)
    write_cache(f, {"key": key, "sigma": sigma, "n_subjects": len(subj)}, "noise scale")
    return sigma


def resolve_noise(handle: ModelHandle, settings: TraceSettings, subjects: Sequence[str]) -> float:
    """ν for these settings: the absolute scale if given, else noise_factor × σ(subjects)."""
    if settings.noise_scale is not None:
        return float(settings.noise_scale)
    return settings.noise_factor * noise_sigma(handle, subjects)


# ---- average indirect effect ------------------------------------------------------------------


@dataclass
class AIE:
    """Average indirect effect per layer at the subject's last token, over the correct facts."""

    aie: dict[str, list[float]]  # kind -> [n_layers]
    sem: dict[str, list[float]]  # standard error of each mean
    n_facts: int  # traced (answered correctly)
    n_wrong: int
    ate: float  # average total effect, mean p_clean − p_corrupted
    p_clean: float
    p_corrupted: float
    window: int
    noise_scale: float
    settings: dict[str, Any]
    wrong: list[dict[str, str]] = field(default_factory=list)  # the cases not traced, and why
    skipped: list[dict[str, str]] = field(default_factory=list)  # facts the tokenizer cannot align, and why
    source: str = ""
    cache_file: str = ""

    def best_layer(self, kind: str = "mlp") -> int:
        if kind not in self.aie:
            raise RankoneError(f"no {kind} indirect effects were traced; trace with kind {kind!r}")
        v = self.aie[kind]
        return max(range(len(v)), key=v.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AIE":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class SubjectPrompt(NamedTuple):
    """What tracing needs of a fact: a prompt, its subject and the true answer (None: the model's own)."""

    prompt: str  # with {} for the subject, or the subject written in
    subject: str
    answer: str | None


T = TypeVar("T")


def sample_facts(facts: Sequence[T], n: int, seed: int = 0) -> list[T]:
    """At most n facts: all of them, or a seeded sample kept in their order (n ≤ 0: all)."""
    if n <= 0 or len(facts) <= n:
        return list(facts)
    keep = sorted(random.Random(seed).sample(range(len(facts)), n))
    return [facts[i] for i in keep]


def average_indirect_effect(
    handle: ModelHandle, facts: Sequence[SubjectPrompt], noise_scale: float,
    settings: TraceSettings | None = None, progress: Callable[[int, int], None] | None = None,
) -> AIE:
    s = settings or TraceSettings()
    n_layers = handle.n_layers
    ies: dict[str, list[torch.Tensor]] = {k: [] for k in s.kinds}
    clean, corr, wrong, skipped = [], [], [], []
    for i, (prompt, subject, answer) in enumerate(facts):
        try:
            tr = trace_case(handle, prompt, subject, answer, noise_scale, s, positions="subject_last")
        except RankoneError as e:  # one unalignable fact (subject inside a token) must not end a long run
            skipped.append({"prompt": prompt, "subject": subject, "why": str(e)})
            tr = None
        if progress is not None:
            progress(i + 1, len(facts))
        if tr is None:
            continue
        if not tr.correct:
            wrong.append({"prompt": tr.prompt, "answer": tr.answer, "predicted": tr.predicted})
            continue
        clean.append(tr.p_clean)
        corr.append(tr.p_corrupted)
        for k in s.kinds:
            ies[k].append(tr.indirect_effect(k)[0])  # [n_layers]
    if not clean:
        raise RankoneError(f"the model answers none of the {len(facts)} facts correctly, so there is nothing to trace; "
                           "give facts the model knows (--cases FILE with prompt, subject and its true answer)")
    mean = {k: torch.stack(v).mean(0) for k, v in ies.items()}
    sem = {k: (torch.stack(v).std(0, unbiased=True) / len(v) ** 0.5 if len(v) > 1 else torch.zeros(n_layers))
           for k, v in ies.items()}
    return AIE(
        aie={k: [round(float(a), 6) for a in v] for k, v in mean.items()},
        sem={k: [round(float(a), 6) for a in v] for k, v in sem.items()},
        n_facts=len(clean), n_wrong=len(wrong), ate=sum(clean) / len(clean) - sum(corr) / len(corr),
        p_clean=sum(clean) / len(clean), p_corrupted=sum(corr) / len(corr),
        window=s.window or default_window(n_layers), noise_scale=noise_scale, settings=s.to_dict(), wrong=wrong,
        skipped=skipped,
    )


# ---- AIE cache, per model --------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter: an edited model is a different model."""
    return model_sha256(model)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def facts_sha256(facts: Sequence[SubjectPrompt]) -> str:
    return hashlib.sha256(json.dumps([list(f) for f in facts]).encode()).hexdigest()


def aie_cache_dir(model_fp: str) -> Any:
    return cache_root() / "trace" / model_fp[:32]


def cached_aie(
    handle: ModelHandle, facts: Sequence[SubjectPrompt], settings: TraceSettings,
    noise_subjects: Sequence[str], source: str = "", model_fp: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AIE:
    """The AIE of these facts and settings: from <cache>/trace/<model>/aie-*.json, else computed and saved."""
    fp = model_fp or model_fingerprint(handle.model)
    key = {"schema": SCHEMA, "model": fp, "facts": facts_sha256(facts), "settings": settings.to_dict(),
           "noise_subjects": hashlib.sha256("\0".join(sorted(set(noise_subjects))).encode()).hexdigest()}
    f = aie_cache_dir(fp) / f"aie-{_digest(key)}.json"
    try:
        d = loads(f.read_bytes(), str(f))
        if d.get("key") == key:
            a = AIE.from_dict(d["aie"])
            a.cache_file = str(f)
            return a
    except (OSError, RankoneError, KeyError, TypeError):
        pass
    nu = resolve_noise(handle, settings, noise_subjects)
    a = average_indirect_effect(handle, facts, nu, settings, progress)
    a.source = source
    a.cache_file = str(f) if write_cache(f, {"key": key, "aie": a.to_dict()}, "average indirect effect") else ""
    return a


def best_cached_aie(model_fp: str, kind: str = "mlp") -> AIE | None:
    """The cached AIE of this model with the most traced facts that has `kind` (None if none).

    Any case set counts: a `rankone trace --cases FILE` run is what `edit --layer auto` reuses.
    """
    best: AIE | None = None
    d = aie_cache_dir(model_fp)
    for f in sorted(d.glob("aie-*.json")) if d.is_dir() else []:
        try:
            rec = loads(f.read_bytes(), str(f))
            if rec["key"]["model"] != model_fp:
                continue
            a = AIE.from_dict(rec["aie"])
        except (OSError, RankoneError, KeyError, TypeError):
            continue
        # without noise every effect is zero: such a record says nothing about layers
        if kind in a.aie and a.noise_scale > 0 and (best is None or a.n_facts > best.n_facts):
            a.cache_file = str(f)
            best = a
    return best
