"""Causal tracing (Meng et al. 2022, §2): which hidden states carry a fact from subject to answer.

Three runs of the model on one prompt, reading p(answer) = the probability of the answer's first
token at the last position:

    clean      as is; every block output h_i^(l), MLP output m_i^(l), attention output a_i^(l) kept
    corrupted  Gaussian noise ε ~ N(0, ν²) added to the subject's token embeddings,
               ν = noise_factor · σ, σ = std of the embeddings of subject tokens (3σ in the paper)
    restored   corrupted, but some states put back to their clean values: one block output
               (kind "hidden"), or the MLP / attention outputs of a window of layers around l
               (kinds "mlp", "attn"), at one token

    total effect    TE = p_clean − p_corrupted
    indirect effect IE(kind, token, layer) = p_restored − p_corrupted
    AIE(kind, layer) = mean over facts of IE at the subject's last token

Every (kind, token, layer) restoration is a group of `n_samples` rows sharing the same seeded
noise, and many groups go through the model in one batch: hooks replace, for each group's rows
only, the restored positions by their clean values. Hooks live only inside context managers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from . import architectures as arch
from .atomic import write_json
from .errors import RankoneError
from .fingerprint import tensor_sha256, tensors_sha256
from .hooks import map_output
from .stats import cache_root
from .tokens import EditRequest, encode, join_target, token_span

log = logging.getLogger(__name__)
KINDS = ("hidden", "mlp", "attn")
SCHEMA = "rankone.trace/1"
Site = tuple[str, int]  # (module path, token position) whose clean output is put back


def default_window(n_layers: int) -> int:
    """MLP/attention restoration window: the paper's 10 of 48 layers (≈ n/4.8), at most 10.

    min(10, max(1, n_layers // 4)): 1 for a 4-layer testbed, 3 for 12 layers, 7 for 28, 10 for 48+.
    """
    return min(10, max(1, n_layers // 4))


def window_layers(center: int, window: int, n_layers: int) -> list[int]:
    """The layers restored for a window "centred" on `center` (the paper's code, also at the edges)."""
    return list(range(max(0, center - window // 2), min(n_layers, center - (-window // 2))))


@dataclass
class TraceSettings:
    n_samples: int = 10  # noise samples per restoration (one batch row each)
    noise_factor: float = 3.0  # ν = noise_factor × σ(subject embeddings)
    noise_scale: float | None = None  # an absolute ν instead (0 = no corruption at all)
    window: int | None = None  # None: default_window(n_layers)
    kinds: list[str] = field(default_factory=lambda: list(KINDS))
    seed: int = 0  # the noise generator's seed (CPU generator: same noise on every device)
    batch_rows: int = 128  # rows per forward pass; lower it for big models

    def __post_init__(self) -> None:
        if int(self.n_samples) < 1:
            raise RankoneError(f"the number of noise samples must be at least 1, got {self.n_samples}")
        if not float(self.noise_factor) >= 0 or (self.noise_scale is not None and not float(self.noise_scale) >= 0):
            raise RankoneError("the noise level must be zero or positive")
        if self.window is not None and int(self.window) < 1:
            raise RankoneError(f"the restoration window must be at least 1 layer, got {self.window}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise RankoneError(f"unknown trace kind(s) {bad}; choose from {', '.join(KINDS)}")
        if int(self.batch_rows) < 1:
            raise RankoneError("batch_rows must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TraceSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RankoneError(f"unknown trace setting(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


# ---- noise scale ----------------------------------------------------------------------------


@torch.no_grad()
def subject_embedding_std(model: torch.nn.Module, tok: Any, subjects: Sequence[str]) -> float:
    """σ: the standard deviation of all elements of the subjects' token embeddings (paper's recipe)."""
    embed = arch.get_module(model, arch.spec_for(model).embed)
    dev = next(embed.parameters()).device
    rows = []
    for s in dict.fromkeys(subjects):  # unique, in order
        ids, offsets = encode(tok, s)
        first, last = token_span(tok, s, 0, len(s), offsets)
        rows.append(embed(torch.tensor(ids[first:last + 1], device=dev)).float().reshape(-1, _d(model)).cpu())
    if not rows:
        raise RankoneError("no subjects to measure the noise scale on; give cases or an explicit noise scale")
    return float(torch.cat(rows).std())


def _d(model: torch.nn.Module) -> int:
    w = arch.get_module(model, arch.spec_for(model).embed).weight
    return int(w.shape[-1])


def noise_sigma(model: torch.nn.Module, tok: Any, subjects: Sequence[str]) -> float:
    """σ, cached per (embedding weights, subject set) under <cache>/trace/noise-*.json."""
    emb = arch.get_module(model, arch.spec_for(model).embed).weight
    subj = sorted(set(subjects))
    key = {"schema": SCHEMA, "embed": tensor_sha256(emb),
           "subjects": hashlib.sha256("\0".join(subj).encode()).hexdigest()}
    f = cache_root() / "trace" / f"noise-{_digest(key)}.json"
    try:
        d = json.loads(f.read_text())
        if d.get("key") == key and isinstance(d.get("sigma"), float):
            return d["sigma"]
    except (OSError, json.JSONDecodeError):
        pass
    sigma = subject_embedding_std(model, tok, subj)
    write_json(f, {"key": key, "sigma": sigma, "n_subjects": len(subj)})
    return sigma


def resolve_noise(model: torch.nn.Module, tok: Any, settings: TraceSettings, subjects: Sequence[str]) -> float:
    """ν for these settings: the absolute scale if given, else noise_factor × σ(subjects)."""
    if settings.noise_scale is not None:
        return float(settings.noise_scale)
    return settings.noise_factor * noise_sigma(model, tok, subjects)


# ---- one prompt -----------------------------------------------------------------------------


@dataclass
class CaseTrace:
    """The trace of one fact. scores[kind][i][l] = p(answer) with `positions[i]` restored at l."""

    prompt: str  # the prompt text with the subject written in
    subject: str
    answer: str  # the expected answer (or the model's own prediction when none was given)
    answer_token: str  # the answer's first token, whose probability is read
    predicted: str  # the model's top next token on the clean prompt
    correct: bool  # predicted == answer_token; wrong cases are reported, not traced
    tokens: list[str]  # every prompt token, decoded
    subject_range: list[int]  # [first, last] token indices of the subject
    p_clean: float = 0.0
    p_corrupted: float = 0.0
    positions: list[int] = field(default_factory=list)  # token rows traced
    scores: dict[str, list[list[float]]] = field(default_factory=dict)  # [n_positions, n_layers]
    window: int = 1
    noise_scale: float = 0.0
    n_samples: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def indirect_effect(self, kind: str) -> torch.Tensor:
        return torch.tensor(self.scores[kind]) - self.p_corrupted  # [n_positions, n_layers]


def _prepare(tok: Any, prompt: str, subject: str, answer: str | None) -> tuple[str, list[int], tuple[int, int], int | None]:
    """Prompt text, its ids, the subject's token span [first, last] and the answer's first token id.

    With an answer, the prompt ids are the prefix of the tokenized "prompt answer" before the
    answer (exactly the teacher-forced reading of `generation.target_logprob`).
    """
    req = EditRequest.create(prompt, subject, answer or "x")
    text, s0, s1 = req.text()
    if answer is None:
        ids, offsets = encode(tok, text)
        return text, ids, token_span(tok, text, s0, s1, offsets), None
    full, t0 = join_target(text, req.target)
    ids, offsets = encode(tok, full)
    first, _ = token_span(tok, full, t0, len(full), offsets, what="answer")
    span = token_span(tok, full, s0, s1, offsets)
    if span[1] >= first:
        raise RankoneError(f"the answer overlaps the subject in {full!r}")
    return text, ids[:first], span, ids[first]


@torch.no_grad()
def trace_case(
    model: torch.nn.Module, tok: Any, prompt: str, subject: str, answer: str | None,
    noise_scale: float, settings: TraceSettings | None = None, positions: str = "all",
    on_chunk: Callable[[int, int], None] | None = None,
) -> CaseTrace:
    """Trace one fact. positions: "all" prompt tokens (heatmaps) or "subject_last" (AIE).

    answer None: the model's own top prediction is traced (it is then correct by construction).
    A case the model gets wrong comes back with correct=False and no scores.
    """
    s = settings or TraceSettings()
    spec = arch.spec_for(model)
    n_layers = arch.num_layers(model, spec)
    window = s.window or default_window(n_layers)
    if positions not in ("all", "subject_last"):
        raise ValueError(f"positions must be 'all' or 'subject_last', not {positions!r}")
    text, ids, (sf, sl), answer_id = _prepare(tok, prompt, subject, answer)
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)  # [1, pos]
    P = x.shape[1]

    paths = _paths(spec, n_layers, s.kinds)
    was_training = model.training
    model.eval()
    try:
        clean = _clean_run(model, x, sorted({p for ps in paths.values() for p in ps}))
        probs = clean.pop("probs")[0]  # [vocab]
        pred = int(probs.argmax())
        if answer_id is None:
            answer_id, answer = pred, tok.decode([pred]).strip()
        out = CaseTrace(
            prompt=text, subject=subject, answer=str(answer), answer_token=tok.decode([answer_id]),
            predicted=tok.decode([pred]), correct=pred == answer_id,
            tokens=[tok.decode([i]) for i in ids], subject_range=[sf, sl], p_clean=float(probs[answer_id]),
            window=window, noise_scale=float(noise_scale), n_samples=s.n_samples, seed=s.seed,
        )
        if not out.correct:
            return out
        rows = list(range(P)) if positions == "all" else [sl]
        groups: list[list[Site]] = [[]]  # group 0 restores nothing: the corrupted run
        index: list[tuple[str, int, int]] = []
        for kind in s.kinds:
            for i, t in enumerate(rows):
                for layer in range(n_layers):
                    groups.append(_sites(spec, kind, layer, t, window, n_layers))
                    index.append((kind, i, layer))
        noise = _noise(s, sl - sf + 1, clean[paths["embed"][0]].shape[-1], noise_scale)  # [S, n_subj, d]
        p = _run_groups(model, x, (sf, sl), noise, clean, groups, answer_id, s.batch_rows, on_chunk)
    finally:
        model.train(was_training)
    out.p_corrupted = float(p[0])
    out.positions = rows
    out.scores = {k: [[0.0] * n_layers for _ in rows] for k in s.kinds}
    for (kind, i, layer), v in zip(index, p[1:].tolist()):
        out.scores[kind][i][layer] = v
    return out


def _clean_run(model: torch.nn.Module, x: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    """Next-token probabilities and a *copy* of each module's output, [pos, d] (OPT flattens).

    Copies, not views: some blocks add to a module's output in place after it returns (Falcon's
    `mlp_output += attention_output`), which would change a detached view.
    """
    P = x.shape[1]
    rec: dict[str, torch.Tensor] = {}

    def keep(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(h: torch.Tensor) -> torch.Tensor:
            rec[path] = h.detach().reshape(P, -1).clone()
            return h

        return fn

    with ExitStack() as stack:
        for p in paths:
            stack.enter_context(map_output(arch.get_module(model, p), keep(p)))
        rec["probs"] = _last_probs(model, x)
    return rec


def _paths(spec: arch.ArchSpec, n_layers: int, kinds: Sequence[str]) -> dict[str, list[str]]:
    return {"embed": [spec.embed],
            "hidden": [spec.layer_path(l) for l in range(n_layers)] if "hidden" in kinds else [],
            "mlp": [spec.mlp.format(l) for l in range(n_layers)] if "mlp" in kinds else [],
            "attn": [spec.attn.format(l) for l in range(n_layers)] if "attn" in kinds else []}


def _sites(spec: arch.ArchSpec, kind: str, layer: int, token: int, window: int, n_layers: int) -> list[Site]:
    if kind == "hidden":
        return [(spec.layer_path(layer), token)]
    template = spec.mlp if kind == "mlp" else spec.attn
    return [(template.format(j), token) for j in window_layers(layer, window, n_layers)]


def _noise(s: TraceSettings, n_tokens: int, d: int, scale: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(s.seed)
    return torch.randn(s.n_samples, n_tokens, d, generator=gen) * scale  # [S, n_subj, d]


_KEEP: dict[type, bool] = {}


def _last_probs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax of the last position's logits, [batch, vocab] float32 (only that position's logits)."""
    kw: dict[str, Any] = {"input_ids": x, "attention_mask": torch.ones_like(x), "use_cache": False}
    cls = type(model)
    if cls not in _KEEP:
        _KEEP[cls] = "logits_to_keep" in inspect.signature(model.forward).parameters
    if _KEEP[cls]:
        kw["logits_to_keep"] = 1
    return torch.softmax(model(**kw).logits[:, -1].float(), dim=-1)


def _run_groups(
    model: torch.nn.Module, x: torch.Tensor, subject: tuple[int, int], noise: torch.Tensor,
    clean: dict[str, torch.Tensor], groups: list[list[Site]], answer_id: int, batch_rows: int,
    on_chunk: Callable[[int, int], None] | None,
) -> torch.Tensor:
    """Mean p(answer) over the noise samples for each group of restorations: [n_groups]."""
    S = noise.shape[0]
    per = max(1, batch_rows // S)  # groups per forward pass
    spec = arch.spec_for(model)
    out = []
    chunks = [groups[i:i + per] for i in range(0, len(groups), per)]
    for c, chunk in enumerate(chunks):
        B, P = len(chunk) * S, x.shape[1]
        by_path: dict[str, tuple[list[int], list[int]]] = {}
        for g, sites in enumerate(chunk):
            for path, t in sites:
                r, q = by_path.setdefault(path, ([], []))
                r.extend(range(g * S, (g + 1) * S))
                q.extend([t] * S)
        with ExitStack() as stack:
            stack.enter_context(map_output(arch.get_module(model, spec.embed), _corrupt(subject, noise, len(chunk))))
            for path, (r, q) in by_path.items():
                stack.enter_context(map_output(arch.get_module(model, path), _restore(clean[path], r, q, B, P)))
            probs = _last_probs(model, x.expand(B, -1))  # [B, vocab]
            if on_chunk is not None:
                on_chunk(c, len(chunks))
        out.append(probs[:, answer_id].reshape(len(chunk), S).mean(1).cpu())
    return torch.cat(out)


def _corrupt(subject: tuple[int, int], noise: torch.Tensor, n_groups: int) -> Callable[[torch.Tensor], torch.Tensor]:
    first, last = subject

    def fn(e: torch.Tensor) -> torch.Tensor:  # e: [B, pos, d] token embeddings
        e = e.clone()
        e[:, first:last + 1] += noise.repeat(n_groups, 1, 1).to(e.device, e.dtype)
        return e

    return fn


def _restore(clean: torch.Tensor, rows: list[int], pos: list[int], B: int, P: int) -> Callable[[torch.Tensor], torch.Tensor]:
    r, q = torch.tensor(rows), torch.tensor(pos)

    def fn(h: torch.Tensor) -> torch.Tensor:  # h: [B, pos, d] (or [B·pos, d])
        h3 = h.reshape(B, P, -1).clone()
        h3[r.to(h.device), q.to(h.device)] = clean[q].to(h.device, h.dtype)
        return h3.reshape(h.shape)

    return fn


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


Fact = tuple[str, str, "str | None"]  # (prompt with {} or the subject, subject, answer or None)


def average_indirect_effect(
    model: torch.nn.Module, tok: Any, facts: Sequence[Fact], noise_scale: float,
    settings: TraceSettings | None = None, progress: Callable[[int, int], None] | None = None,
) -> AIE:
    s = settings or TraceSettings()
    n_layers = arch.num_layers(model)
    ies: dict[str, list[torch.Tensor]] = {k: [] for k in s.kinds}
    clean, corr, wrong = [], [], []
    for i, (prompt, subject, answer) in enumerate(facts):
        tr = trace_case(model, tok, prompt, subject, answer, noise_scale, s, positions="subject_last")
        if progress is not None:
            progress(i + 1, len(facts))
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
    )


# ---- AIE cache, per model --------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter: an edited model is a different model."""
    return tensors_sha256(model.named_parameters())


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:32]


def facts_sha256(facts: Sequence[Fact]) -> str:
    return hashlib.sha256(json.dumps([list(f) for f in facts]).encode()).hexdigest()


def aie_cache_dir(model_fp: str) -> Any:
    return cache_root() / "trace" / model_fp[:32]


def cached_aie(
    model: torch.nn.Module, tok: Any, facts: Sequence[Fact], settings: TraceSettings,
    noise_subjects: Sequence[str], source: str = "", model_fp: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AIE:
    """The AIE of these facts and settings: from <cache>/trace/<model>/aie-*.json, else computed and saved."""
    fp = model_fp or model_fingerprint(model)
    key = {"schema": SCHEMA, "model": fp, "facts": facts_sha256(facts), "settings": settings.to_dict(),
           "noise_subjects": hashlib.sha256("\0".join(sorted(set(noise_subjects))).encode()).hexdigest()}
    f = aie_cache_dir(fp) / f"aie-{_digest(key)}.json"
    try:
        d = json.loads(f.read_text())
        if d.get("key") == key:
            a = AIE.from_dict(d["aie"])
            a.cache_file = str(f)
            return a
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        pass
    nu = resolve_noise(model, tok, settings, noise_subjects)
    a = average_indirect_effect(model, tok, facts, nu, settings, progress)
    a.source, a.cache_file = source, str(f)
    write_json(f, {"key": key, "aie": a.to_dict()})
    return a


def best_cached_aie(model_fp: str, kind: str = "mlp") -> AIE | None:
    """The cached AIE of this model with the most traced facts that has `kind` (None if none).

    Any case set counts: a `rankone trace --cases FILE` run is what `edit --layer auto` reuses.
    """
    best: AIE | None = None
    d = aie_cache_dir(model_fp)
    for f in sorted(d.glob("aie-*.json")) if d.is_dir() else []:
        try:
            rec = json.loads(f.read_text())
            if rec["key"]["model"] != model_fp:
                continue
            a = AIE.from_dict(rec["aie"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            continue
        # without noise every effect is zero: such a record says nothing about layers
        if kind in a.aie and a.noise_scale > 0 and (best is None or a.n_facts > best.n_facts):
            a.cache_file = str(f)
            best = a
    return best
