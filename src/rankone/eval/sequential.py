"""The sequential-editing experiment: N edits one after another, never reverted, measured every k.

The ROME family edits one request at a time; MEMIT and AlphaEdit edit in batches of
`batch_size` (each batch on the model with the earlier ones merged, solved against the unedited
model's statistics, AlphaEdit preserving every earlier batch's keys), scored after each batch.

Why r-ROME exists: original ROME's update divides by k_oᵀC⁻¹k̄ (bare key against averaged key),
which can be tiny, giving a huge ‖Δ‖ that disables the model. This loop records, per edit, ‖Δ‖_F,
the three denominators and the key cosine, and every k edits: efficacy of the newest edits,
retention of earlier edits (ES over a sample of all earlier ones), retention of facts never
edited (top-1 on a fixed sample, all known at the start), NS, fluency, ‖W − W₀‖_F, perplexity
and optionally GLUE. Edits whose ‖Δ‖ is far above the running median, and evaluation points
where fluency collapses, are flagged as *disabling*.

The guard (`rankone.edit.guard.Guard`, on by default here) refuses such an update before it is
written and logs why; the same spike rule flags the updates it lets through.

Files in the run folder: run.json (settings; a resumed run must match), run.jsonl (one line per
edit and per evaluation point), checkpoint/ (the running patch and the loop state, replaced
atomically at every evaluation point, and between them every `checkpoint_s` seconds). After an
interruption the same command truncates the JSONL to the checkpoint, re-applies the patch
(fingerprint-checked) and goes on; AlphaEdit's preserved keys come back from the patch's own keys,
so the resumed run solves what an unbroken one would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from rankone.core import architectures as arch
from rankone.core.atomic import atomic_dir, write_bytes, write_json
from rankone.eval.cases import Case
from rankone.core.errors import RankoneError
from rankone.core.util import mean, utcnow
from rankone.eval.glue import glue_suite
from rankone.eval.metrics import evaluate_cases, fluency, generation_scores, score
from rankone.models.generation import perplexity
from rankone.methods.base import method
from rankone.methods.settings import MethodSettings
from rankone.artifacts.patch import Patch, library_versions
from rankone.edit.guard import Guard
from rankone.edit.compaction import CompactSettings
from rankone.eval.sequential_steps import compact_step, edit_step, served_rank
from rankone.models.handle import ModelHandle
from rankone.core.progress import Progress

log = logging.getLogger(__name__)


# ---- settings -------------------------------------------------------------------------------


@dataclass
class SequentialConfig:
    n: int = 1000  # edits to make
    every: int = 10  # evaluate (and checkpoint) every k edits
    retention_sample: int = 100  # earlier edits re-tested per evaluation point (evenly spaced)
    ns_sample: int = 100  # cases whose neighbours give NS (fixed, evenly spaced over the run)
    probe_sample: int = 100  # never-edited known facts (fixed)
    gen_prompts: int = 4  # generation prompts for fluency (fixed)
    gen_tokens: int = 40
    top_k: int = 5
    guard: bool = True
    guard_factor: float = 10.0
    denom_factor: float = 10.0
    warmup: int = 5
    spike_factor: float = 10.0  # flag an edit whose ‖Δ‖ exceeds this × the running median
    fluency_drop: float = 0.25  # flag a collapse when fluency falls below (1 − drop) × its start
    norm: str = "mean"
    seed: int = 0
    glue_dir: str | None = None
    glue_n: int = 40  # queries per GLUE task
    glue_every: int = 0  # GLUE every this many edits (0: at start and end only)
    batch_size: int = 1  # edits per batch for MEMIT and AlphaEdit (the ROME family edits one at a time)
    gs_sample: int = 0  # generation-based success on this many fixed cases spread over the run (0: none)
    gs_tokens: int = 20  # greedy tokens generated for it
    # every this many edits, the run's patch is replaced by its compaction from the base weights (0: never;
    # rankone.edit.compaction): solved by compact_method, with compact_targets and compact_hparams
    compact_every: int = 0
    compact_method: str = "emmet"
    compact_targets: str = "written"
    compact_hparams: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for k in ("n", "every", "retention_sample", "ns_sample", "gen_tokens", "top_k", "warmup", "batch_size"):
            if int(getattr(self, k)) < 1:
                raise RankoneError(f"{k.replace('_', '-')} must be at least 1, not {getattr(self, k)}")
        if self.probe_sample < 0 or self.gen_prompts < 0 or self.gs_sample < 0 or self.compact_every < 0:
            raise RankoneError("probe-sample, gen-prompts, gs-sample and compact-every cannot be negative")
        if self.compact_every % self.batch_size:
            raise RankoneError(f"--compact-every {self.compact_every} must be a multiple of --batch-size {self.batch_size}")
        self.compaction()  # the compaction settings are checked now, before any edit

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["batch_size"] == 1:  # one at a time: recorded as runs were before batches existed (they still resume)
            del d["batch_size"]
        if d["gs_sample"] == 0:  # likewise for runs made before generation-based success was measured
            del d["gs_sample"], d["gs_tokens"]
        if d["compact_every"] == 0:  # and before runs could compact
            del d["compact_every"], d["compact_method"], d["compact_targets"], d["compact_hparams"]
        return d

    def compaction(self) -> CompactSettings:
        return CompactSettings(self.compact_method, self.compact_targets, dict(self.compact_hparams))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SequentialConfig":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def spaced(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when n ≤ k)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [n - 1]


def probe_pool(cases: Sequence[Case], n_edits: int, probe_sample: int) -> list[tuple[str, str]]:
    """Candidate never-edited facts for a run of `n_edits`: (prompt, true answer) of the cases after
    the edited ones, five per wanted probe (the run keeps those the unedited model answers)."""
    return [(c.prompt, c.target_true) for c in cases[n_edits:]][: 5 * probe_sample]


# ---- the run --------------------------------------------------------------------------------


class SequentialRun:
    """One method's sequential run in `out_dir`; `run()` starts it or resumes it."""

    def __init__(self, handle: ModelHandle, cases: Sequence[Case], settings: MethodSettings | Mapping[str, Any] | str | None,
                 out_dir: str | os.PathLike, cfg: SequentialConfig, probes: Sequence[tuple[str, str]] | None = None,
                 ppl_text: str | None = None, meta: dict[str, Any] | None = None, stats_corpus: Any = None,
                 progress: bool = True, checkpoint_s: float | None = 600.0) -> None:
        """`settings`: as for the Editor (a method name, a dict of settings, a settings object).
        `cases`: the first cfg.n are edited; `probes` default to `probe_pool` of the rest. `checkpoint_s`: besides every
        evaluation point, checkpoint after the edit (or batch) that ends this many seconds since the
        last checkpoint (None: only at evaluation points). It is not a setting of the run: where a
        run stops and resumes does not change what it computes."""
        from rankone.edit.editor import Editor

        if len(cases) < cfg.n:
            raise RankoneError(f"only {len(cases)} usable case(s) for {cfg.n} edits; ask for fewer (--n) or give more cases")
        self.editor = Editor(handle, settings, stats_corpus, progress=progress)
        if self.editor.method.one_at_a_time:
            cfg = dataclasses.replace(cfg, batch_size=1)  # the ROME family edits one request at a time
        elif cfg.every % cfg.batch_size:
            raise RankoneError(f"--every {cfg.every} must be a multiple of --batch-size {cfg.batch_size}: "
                               "the model is measured between batches")
        self.model, self.tok, self.settings, self.cfg = self.editor.model, self.editor.tok, self.editor.settings, cfg
        self.cases = list(cases[:cfg.n])
        self.out = Path(out_dir)
        self.probes = list(probe_pool(cases, cfg.n, cfg.probe_sample) if probes is None else probes)
        self.ppl_text = ppl_text
        self.stats_corpus = str(Path(stats_corpus).resolve()) if stats_corpus else None  # None: card's, else sampled
        self.meta = dict(meta or {})
        self.progress = progress
        self.checkpoint_s = checkpoint_s
        self.layers = self.editor.layers  # a window method's window; else the one edited layer
        self.layer = self.layers[-1]
        self.path = handle.proj_path(self.layer)
        self.paths = [handle.proj_path(l) for l in self.layers]
        self.guard = Guard(cfg.guard_factor, cfg.denom_factor, cfg.warmup) if cfg.guard else None
        self.patch = Patch([], base=handle.base_info(), created_at=utcnow(), library_versions=library_versions())
        self.lines: list[dict[str, Any]] = []
        idx = spaced(len(self.cases), cfg.ns_sample)
        self.ns_cases = [dataclasses.replace(self.cases[i], paraphrase_prompts=[]) for i in idx]
        self.gs_cases = set(spaced(len(self.cases), cfg.gs_sample)) if cfg.gs_sample else set()
        self.gen_prompts = [self.cases[i].generation_prompts[0] for i in spaced(len(self.cases), cfg.gen_prompts)
                            if self.cases[i].generation_prompts] if cfg.gen_prompts else []

    # -- identity and files --

    def identity(self) -> dict[str, Any]:
        """What a run's folder must match to be resumed (run.json)."""
        ids = hashlib.sha256(json.dumps([c.to_dict() for c in self.cases], sort_keys=True).encode()).hexdigest()
        window = {} if self.editor.method.one_at_a_time else {"layers": self.layers}
        hp = {k: v for k, v in self.settings.to_dict().items() if not (self.stats_corpus and k == "sampled_corpus_tokens")}
        return {"format": "rankone.eval.sequential/1", "method": self.settings.method, "hparams": hp,
                "config": self.cfg.to_dict(), "layer": self.layer, "module": self.path, **window, "cases_sha256": ids,
                "probes": len(self.probes), "stats_corpus": self.stats_corpus, "meta": self.meta}

    @property
    def jsonl(self) -> Path:
        return self.out / "run.jsonl"

    def _emit(self, rec: dict[str, Any]) -> None:
        self.lines.append(rec)
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

    def _checkpoint(self, next_i: int) -> None:
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.flush()
            os.fsync(f.fileno())
        with atomic_dir(self.out / "checkpoint", overwrite=True) as tmp:
            self.patch.save(tmp / "patch")
            write_json(tmp / "state.json", {"next": next_i, "lines": len(self.lines), "saved_at": utcnow()})
        self._saved = time.monotonic()  # the timed checkpoints count from here

    def preflight(self, force: bool = False) -> str:
        """Check the folder without writing: 'fresh', 'resume' or a RankoneError saying why not."""
        run_json = self.out / "run.json"
        if self.out.exists() and not self.out.is_dir():
            raise RankoneError(f"output {self.out} exists and is a file; choose another --out")
        if force or not self.out.is_dir():
            return "fresh"
        if run_json.is_file():
            old, new = _as_today(json.loads(run_json.read_text()), json.loads(json.dumps(self.identity())))
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                raise RankoneError(f"{self.out} holds a run with other settings ({', '.join(diff)}); "
                                   "pass --force to start it over or choose another --out")
            return "resume" if (self.out / "checkpoint" / "state.json").is_file() else "fresh"
        if any(self.out.iterdir()):
            raise RankoneError(f"output folder {self.out} is not empty and holds no sequential run; "
                               "choose another --out or pass --force")
        return "fresh"

    def _start_or_resume(self, force: bool) -> int:
        """Prepare the folder; returns the index of the next edit (0 for a fresh run)."""
        if self.preflight(force) == "resume":
            return self._resume(json.loads((self.out / "checkpoint" / "state.json").read_text()))
        for name in ("run.json", "run.jsonl", "checkpoint", "probes.json", "summary.json", "summary.md"):
            p = self.out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "run.json", self.identity())
        self.jsonl.write_text("")
        return 0

    def _resume(self, state: dict[str, Any]) -> int:
        lines = [json.loads(x) for x in self.jsonl.read_text().splitlines() if x.strip()][: state["lines"]]
        write_bytes(self.jsonl, "".join(json.dumps(r) + "\n" for r in lines).encode())  # drop work after the checkpoint
        self.patch = Patch.load(self.out / "checkpoint" / "patch")
        # The prefixes are sampled from the model at the first edit and the key statistics read the
        # layer's inputs: both come from the base model, as in an uninterrupted run; the patch is
        # fingerprint-checked (same model or a clear error) and AlphaEdit's keys come back from it.
        self.editor.continue_from([self.patch] if self.patch.edits else [])
        self.lines = lines
        judged: set[int] = set()
        for r in lines:  # the guard saw each batch once
            if r["type"] == "edit" and r["accepted"] and self.guard is not None and r.get("batch", r["i"]) not in judged:
                judged.add(r.get("batch", r["i"]))
                self.guard.accept(r["delta_fro"], r["denominator"])
        log.info("resuming %s at edit %d (%d edits in the checkpoint)", self.out, state["next"], len(self.patch.edits))
        return int(state["next"])

    # -- measurements --

    def _weight(self, path: str) -> torch.Tensor:
        return arch.weight_oi(arch.get_module(self.model, path))

    def w_dists(self) -> dict[int, float]:
        return {l: float((self._weight(p).detach().double().cpu() - self.w0[p]).norm()) for l, p in zip(self.layers, self.paths)}

    def w_dist(self) -> float:
        """‖W − W₀‖_F over every edited layer."""
        return math.sqrt(sum(x * x for x in self.w_dists().values()))

    def evaluate(self, n_done: int) -> dict[str, Any]:
        """The evaluation point after `n_done` attempted edits."""
        t0 = time.perf_counter()
        edits = [r for r in self.lines if r["type"] == "edit" and r["accepted"] and r["i"] < n_done]
        rec: dict[str, Any] = {"type": "eval", "n": n_done, "n_edits": len(edits), "w_dist": self.w_dist(),
                               "served_rank": served_rank(self.patch)}
        if len(self.layers) > 1:
            rec["w_dist_layers"] = self.w_dists()
        last_n = max([r["n"] for r in self.lines if r["type"] == "eval"] or [0])
        newest = [r for r in edits if r["i"] >= last_n]
        rec["es_newest"] = mean([r["es"] for r in newest])
        rec["top1_newest"] = mean([r["top1"] for r in newest])
        if edits:
            sample = [edits[j] for j in spaced(len(edits), self.cfg.retention_sample)]
            m = evaluate_cases(self.model, self.tok, [self.cases[r["i"]] for r in sample], self.cfg.norm)
            rec["retention_es"] = mean([x["es"] for x in m])
            rec["retention_top1"] = mean([x["top1_new"] for x in m])
            rec["retention_ps"] = mean([x["ps"] for x in m])
            worked = [x for x, r in zip(m, sample) if r["es"]]
            rec["retention_kept"] = mean([x["es"] for x in worked])  # of the edits that worked when made
        gs = [self.cases[r["i"]] for r in edits if r["i"] in self.gs_cases]
        if gs:
            rec["gs_n"] = len(gs)
            rec["gs"], rec["gps"] = generation_scores(self.model, self.tok, gs, self.cfg.gs_tokens)
        ns = evaluate_cases(self.model, self.tok, self.ns_cases, self.cfg.norm)
        rec["ns"] = mean([x["ns"] for x in ns])
        rec["nm"] = mean([x["nm"] for x in ns])
        if self.probes:
            rec["probe_top1"] = mean([float(s.top1) for s in score(self.model, self.tok, self.probes)])
        if self.gen_prompts:
            rec["fluency"], texts = fluency(self.model, self.tok, self.gen_prompts, self.cfg.gen_tokens,
                                            self.cfg.top_k, self.cfg.seed)
            rec["sample_text"] = texts[0][:300]
        if self.ppl_text:
            rec["perplexity"] = perplexity(self.model, self.tok, self.ppl_text)
        if self.cfg.glue_dir and (n_done in (0, self.cfg.n) or (self.cfg.glue_every and n_done % self.cfg.glue_every == 0)):
            rec["glue"] = glue_suite(self.model, self.tok, self.cfg.glue_dir, n=self.cfg.glue_n, seed=self.cfg.seed)
        base = next((r for r in self.lines if r["type"] == "eval" and r["n"] == 0), rec if n_done == 0 else None)
        rec["flags"] = []
        if base is not None and rec.get("fluency") is not None and base.get("fluency"):
            if rec["fluency"] < (1 - self.cfg.fluency_drop) * base["fluency"]:
                rec["flags"].append(f"fluency collapse: {rec['fluency']:.3f} < {1 - self.cfg.fluency_drop:.2f} × "
                                    f"{base['fluency']:.3f} after edits {last_n}..{n_done - 1}")
        rec["seconds"] = time.perf_counter() - t0
        return rec

    # -- the loop --

    def _step(self, i0: int, i1: int) -> list[dict[str, Any]]:
        """Cases i0..i1−1 as one step (one case for the ROME family, a batch otherwise)."""
        return edit_step(self, i0, i1)

    def run(self, force: bool = False, on_eval: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        # the base weights of every edited layer: given back when the run ends, however it ends
        originals = {p: self._weight(p).detach().clone() for p in self.paths}
        self.w0 = {p: w.double().cpu() for p, w in originals.items()}
        try:
            return self._loop(force, on_eval)
        finally:
            with torch.no_grad():
                for p, w in originals.items():
                    self._weight(p).copy_(w)

    def _loop(self, force: bool, on_eval: Callable[[dict[str, Any]], None] | None) -> list[dict[str, Any]]:
        start = self._start_or_resume(force)
        probes = self.probes
        if start == 0 and not self.lines:
            # never-edited facts: keep those the unedited model answers (so the start is 1.0 by construction)
            if probes:
                known = score(self.model, self.tok, probes)
                self.probes = [p for p, s in zip(probes, known) if s.top1][: self.cfg.probe_sample]
                write_json(self.out / "probes.json", self.probes)
            self._emit(self.evaluate(0))
            self._checkpoint(0)
        elif (self.out / "probes.json").is_file():
            self.probes = [tuple(p) for p in json.loads((self.out / "probes.json").read_text())]
        bar = Progress(self.cfg.n, f"sequential {self.settings.method}", "edits", enabled=self.progress, initial=start)
        self._saved = time.monotonic()
        try:
            for i in range(start, self.cfg.n, self.cfg.batch_size):
                j = min(i + self.cfg.batch_size, self.cfg.n)
                for rec in self._step(i, j):
                    self._emit(rec)
                if self.cfg.compact_every and j % self.cfg.compact_every == 0:
                    self._emit(compact_step(self, j))
                bar.update(j - i)
                if j % self.cfg.every == 0 or j == self.cfg.n:
                    ev = self.evaluate(j)
                    self._emit(ev)
                    self._checkpoint(j)
                    bar.note(f"retention {ev.get('retention_es') or 0:.2f}, probes {ev.get('probe_top1') or 0:.2f}, "
                             f"fluency {ev.get('fluency') or 0:.2f}")
                    if on_eval:
                        on_eval(ev)
                elif self.checkpoint_s is not None and time.monotonic() - self._saved >= self.checkpoint_s:
                    # long evaluation intervals (an hour of single edits on a real model) lose at most this much
                    self._checkpoint(j)
        finally:
            bar.close()
        return self.lines


def read_run(out_dir: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(run.json settings, JSONL records) of a run folder."""
    d = Path(out_dir)
    if not (d / "run.json").is_file() or not (d / "run.jsonl").is_file():
        raise RankoneError(f"{d} is not a sequential run folder (no run.json / run.jsonl)")
    recs = [json.loads(x) for x in (d / "run.jsonl").read_text().splitlines() if x.strip()]
    return json.loads((d / "run.json").read_text()), recs


def _as_today(settings: dict[str, Any], new: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A stored run.json's settings as this version writes them (an option added since takes its
    default, which the run used), and `new` comparable with them: the sampled size counts only with
    no corpus, and a run that predates "stats_corpus" is compared without either."""
    out = dict(settings)
    if "stats_corpus" not in out:
        new = {k: v for k, v in new.items() if k != "stats_corpus"}
        new["hparams"] = {k: v for k, v in new["hparams"].items() if k != "sampled_corpus_tokens"}
    try:
        if isinstance(out.get("hparams"), dict):
            out["hparams"] = method(out.get("method")).settings.from_dict(out["hparams"]).to_dict()
            if "stats_corpus" not in out or out["stats_corpus"]:
                out["hparams"].pop("sampled_corpus_tokens", None)
        if isinstance(out.get("config"), dict):
            out["config"] = SequentialConfig.from_dict(out["config"]).to_dict()
    except (RankoneError, TypeError):  # not loadable by this version: compared as stored, so it differs
        return settings, new
    return json.loads(json.dumps(out)), new
