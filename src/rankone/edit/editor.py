"""The edit loop: request → key → value → update → merged into the model → recorded in a Patch.

`Editor` keeps what is computed once per model (prefix templates, key statistics and their
factorisation) so that many edits, one after another, pay for them once.

    Editor(load_model(path), EditHParams(layer=3))        # a ModelHandle: its card's recommendations
    Editor(model, tok, EditHParams(layer=3), "corpus.txt")  # a model and tokenizer in memory
    Editor(load_model(path), MemitHParams()).edit(reqs)   # MEMIT / AlphaEdit: the requests as one batch

The settings' type picks the method family: EditHParams edits request after request (ROME,
r-ROME, p-ROME: one rank-one edit each); MemitHParams and AlphaEditHParams write all requests of
one `edit` call as one batch (one rank-n edit per window layer; see rankone.edit.batch).

Either way the hyper-parameters the caller set win over what the model card (rankone.json)
recommends, and those over the paper's defaults; the layer defaults to the card's, else
n_layers // 8; the statistics corpus to the one given, else the card's.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.util import user_name, utcnow
from rankone.core.hooks import after_forward
from rankone.core.progress import Progress, track
from rankone.core.fingerprint import model_sha256
from rankone.methods.hparams import HParams
from rankone.edit.batch import compute_batch, is_batch, preserved_keys_of, write_batch
from rankone.methods.alphaedit import PreservedKeys
from rankone.methods.hparams import EditHParams, JsonSettings, MemitHParams
from rankone.models.handle import ModelHandle
from rankone.artifacts.patch import Applied, Edit, Patch, apply_patch, library_versions, make_edit, revert_patch
from rankone.methods.rome import Update, compute_key, compute_value, rank_one_update
from rankone.methods.cache import cached_json
from rankone.methods.corpus import cached_sampled_corpus, sampled_corpus
from rankone.methods.stats import LayerStats, layer_stats
from rankone.core.tokens import PREFIX_STARTS, EditRequest, encode, encode_request, join_target, sample_prefixes
from rankone.models.generation import answer_matches, check_fits, greedy, target_logprob

log = logging.getLogger(__name__)

# A guard (rankone.edit.guard.Guard, or any such callable) looks at a computed update before it is
# written and returns a reason to refuse it: (Update, EditRequest) for a rank-one edit, and
# (list[LayerUpdate], list[EditRequest]) for a batch, which it refuses or accepts as a whole.
GuardFn = Callable[[Any, Any], "str | None"]


@dataclass
class Rejected:
    request: EditRequest
    reason: str
    diagnostics: dict[str, float]


class Editor:
    def __init__(
        self, model: ModelHandle | torch.nn.Module, tok: Any = None, hparams: HParams | None = None,
        stats_corpus: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
        progress: bool = True, preserved: PreservedKeys | None = None,
    ) -> None:
        """`preserved`: AlphaEdit's keys of earlier edits (e.g. `Registry.preserved_keys()`);
        batches this Editor writes and keeps are added to it."""
        if isinstance(model, ModelHandle):
            if isinstance(tok, JsonSettings):  # Editor(handle, hp[, stats_corpus[, cache_dir]], ...)
                if isinstance(hparams, JsonSettings):
                    raise TypeError("Editor(handle, hparams, ...) takes the hyper-parameters once")
                if hparams is not None:  # the positions after the handle's hparams shift by one
                    if cache_dir is not None:
                        raise TypeError("Editor(handle, hparams, stats_corpus, cache_dir): too many arguments")
                    stats_corpus, cache_dir = hparams, stats_corpus
                tok, hparams = None, tok
            if tok is not None:
                raise TypeError("Editor(handle, ...) takes no tokenizer: the handle holds it")
            self.handle = model
        elif tok is None:
            raise TypeError("Editor(model, tok, ...) needs the tokenizer (or pass the ModelHandle from load_model)")
        else:
            self.handle = ModelHandle.of(model, tok)
        self.model, self.tok = self.handle.model, self.handle.tokenizer
        if hparams is not None and not isinstance(hparams, (EditHParams, MemitHParams)):
            raise TypeError(f"Editor takes EditHParams, MemitHParams or AlphaEditHParams, not {type(hparams).__name__}")
        self.hp: HParams = (hparams or EditHParams()).over(self.handle)
        self.cache_dir = cache_dir
        self.progress = progress
        self._corpus = Path(stats_corpus) if stats_corpus else None
        self._corpus_source = str(self._corpus) if self._corpus else ""  # recorded in each edit
        self._templates: dict[tuple, list[str]] = {}
        self.rejected: list[Rejected] = []
        self.notes: dict[str, Any] = {}  # recorded in every edit's diagnostics (e.g. why this layer)
        self.preserved = preserved if preserved is not None else PreservedKeys()
        self._batch_stats: dict[tuple[int, str, int], LayerStats] = {}

    @property
    def is_batch(self) -> bool:
        """Whether `edit` writes its requests as one batch (MEMIT, AlphaEdit)."""
        return is_batch(self.hp)

    # -- things computed once --

    def layer(self, hp: HParams | None = None) -> int:
        """The edited layer; for a batch method, the critical layer (the last of the window)."""
        return self.layers(hp)[-1]

    def layers(self, hp: HParams | None = None) -> list[int]:
        """Every layer an edit writes: the window of a batch method, else the one layer."""
        hp = hp or self.hp
        if isinstance(hp, MemitHParams):
            with self.handle.scope():
                return list(hp.resolve(self.model).layers or [])
        layer = self.handle.default_layer() if hp.layer is None else hp.layer
        return [arch.check_layer(self.model, layer, self.handle.spec)]

    def module_path(self, layer: int) -> str:
        """The edited projection of `layer`, e.g. 'transformer.h.3.mlp.c_proj'."""
        return self.handle.spec.proj.format(arch.check_layer(self.model, layer, self.handle.spec))

    def corpus(self, hp: EditHParams | None = None) -> Path:
        """The statistics corpus: the one given, else the model's own, else one sampled from the
        model (seeded, cached by its fingerprint; said in one line and recorded in each edit)."""
        if self._corpus is None:
            try:
                self._corpus = self.handle.stats_corpus()  # the card's, else the folder's corpus.txt
                self._corpus_source = str(self._corpus)
            except RankoneError:
                hp = hp or self.hp
                cached = cached_sampled_corpus(self.model, self.tok, hp.sampled_corpus_tokens, hp.seed, cache_dir=self.cache_dir)
                log.warning("no statistics corpus given: %s %s tokens %s the model itself (seed %d%s); "
                            "pass --stats-corpus to use natural text", "using the" if cached else "sampling",
                            f"{hp.sampled_corpus_tokens:,}", "sampled from" if cached else "from", hp.seed,
                            ", cached earlier" if cached else "; cached for this model")
                self._corpus = cached or sampled_corpus(self.model, self.tok, hp.sampled_corpus_tokens, hp.seed,
                                              cache_dir=self.cache_dir, progress=self.progress)
                self._corpus_source = f"sampled from the model: {hp.sampled_corpus_tokens} tokens, seed {hp.seed}"
        return self._corpus

    def templates(self, hp: HParams | None = None) -> list[str]:
        """"{}" and the context templates: given verbatim, or sampled from the model once per
        (model fingerprint, seed, spec) and kept on disk, so later processes sample nothing."""
        hp = hp or self.hp
        if hp.prefixes is not None:
            return ["{}"] + list(hp.prefixes)
        key = (hp.seed, tuple(map(tuple, hp.prefix_spec)))
        if key not in self._templates:
            disk_key = {"schema": "rankone.templates/1", "model": model_sha256(self.model), "seed": hp.seed,
                        "spec": [list(x) for x in hp.prefix_spec], "vocab": len(self.tok),
                        "starts": [encode(self.tok, s)[0] for s in PREFIX_STARTS]}
            made, _ = cached_json("templates", disk_key, lambda: sample_prefixes(self.model, self.tok, hp.prefix_spec, hp.seed),
                                  self.cache_dir)
            self._templates[key] = ["{}"] + list(made)
        return self._templates[key]

    def stats(self, layer: int, hp: EditHParams | None = None) -> LayerStats:
        hp = hp or self.hp
        corpus = self.corpus(hp)
        with self.handle.scope():
            return layer_stats(self.model, self.tok, [layer], corpus, hp.stats_tokens, self.cache_dir, self.progress)[layer]

    def batch_stats(self, layers: list[int], n_tokens: int) -> dict[int, LayerStats]:
        """C of each layer, measured once per Editor (from the model as it is the first time a layer
        is asked for) and kept: a sequence of batches is solved against the unedited model's C."""
        corpus = self.corpus()
        missing = [l for l in layers if (l, str(corpus), n_tokens) not in self._batch_stats]
        if missing:
            with self.handle.scope():
                got = layer_stats(self.model, self.tok, missing, corpus, n_tokens, self.cache_dir, self.progress)
            for l in missing:
                self._batch_stats[(l, str(corpus), n_tokens)] = got[l]
        return {l: self._batch_stats[(l, str(corpus), n_tokens)] for l in layers}

    def continue_from(self, patches: Sequence[Patch]) -> Applied:
        """Go on from patches made earlier (a registry's released ones, a run's checkpoint) as an
        unbroken run would: the templates and statistics are taken now, from the model as it is
        (the base the patches were made on), then the patches are applied (checked) and their keys
        preserved. Returns the handle that reverts them."""
        self.templates()
        if self.is_batch:
            self.batch_stats(self.layers(), self.hp.stats_tokens)
        else:
            self.stats(self.layer())
        applied = apply_patch(self.model, list(patches))
        for p in patches:
            self.preserve(p)
        return applied

    def preserve(self, patch: Patch) -> None:
        """Add the keys of a patch's batch edits to the preserved keys (for a patch now in the model)."""
        for layer, K in preserved_keys_of([patch]).keys.items():
            self.preserved.add(layer, K)

    # -- one edit --

    def compute(self, request: EditRequest, hp: EditHParams | None = None) -> tuple[Update, dict[str, Any]]:
        """The update for one request on the model as it is now (nothing is written), and what it
        was made from: info holds the layer, templates, timing and value diagnostics, and the key
        and value themselves ("key_result", "value_result"), from which `rank_one_update` gives
        any other ROME variant's update without a second value loop."""
        hp = hp or self.hp
        layer = self.layer(hp)
        templates = self.templates(hp)
        st = self.stats(layer, hp)
        with self.handle.scope():
            t0 = time.perf_counter()
            key = compute_key(self.model, self.tok, request, layer, templates)
            t1 = time.perf_counter()
            with Progress(hp.v_steps, f"value optimisation ({request.subject} -> {request.target})", "steps",
                          enabled=self.progress, delay=2.0) as bar, after_forward(self.model, bar.update):
                value = compute_value(self.model, self.tok, request, layer, templates, hp)  # one forward pass a step
            t2 = time.perf_counter()
            proj = arch.get_module(self.model, self.module_path(layer))
            normed = hp.normed_target and arch.mlp_output_norm(self.model, layer) is not None
            upd = rank_one_update(arch.weight_oi(proj), key, value, st, hp.method, normed, proj.bias)
            t3 = time.perf_counter()
        info = {
            "layer": layer, "templates": templates,
            "timing": {"key_s": t1 - t0, "value_s": t2 - t1, "solve_s": t3 - t2},
            "value": {"losses": value.losses, "target_probs": value.target_probs, "clamped": value.clamped,
                      "target_prob": value.target_prob, "steps": len(value.losses), "stopped_early": value.stopped_early,
                      "extended": value.extended,
                      "early_stop_prob": hp.early_stop_prob, "gathered_logits": value.gathered,
                      "passes": value.passes},
            "stats": {"n_tokens": st.n_tokens, "corpus_sha256": st.meta.get("corpus", ""), "jitter": st.jitter,
                      "corpus": self._corpus_source},
            "key_result": key, "value_result": value, "normed": normed, "bias": proj.bias,
        }
        return upd, info

    def write(self, request: EditRequest, upd: Update, info: dict[str, Any], hp: EditHParams,
              author: str | None = None, reason: str | None = None) -> Edit:
        """Merge the update into the model and describe it as a patch edit."""
        layer = info["layer"]
        path = self.module_path(layer)
        w = arch.weight_oi(arch.get_module(self.model, path))
        diag = dict(upd.diagnostics, **{k: info[k] for k in ("timing", "value", "stats")}, **self.notes)
        e, after = make_edit(  # the method's rank-one residual ⊗ key_dir is the patch's B (one column) A (one row)
            w.detach().clone(), upd.residual[:, None], upd.key_dir[None, :], module=path, layer=layer,
            request=request.to_dict(), method=hp.method, hparams=hp.to_dict(), seed=hp.seed,
            context_templates=info["templates"], diagnostics=diag, author=author, reason=reason)
        with torch.no_grad():
            w.copy_(after)
        return e

    def edit(
        self, requests: Iterable[EditRequest], keep: bool = False, author: str | None = None,
        reason: str | None = None, guard: GuardFn | None = None,
    ) -> Patch:
        """Edit and return the patch: a rank-one method edits in sequence (each on the model with the
        previous ones merged); a batch method writes all requests as one batch.

        With keep=False the model is given back exactly as it was; with keep=True the edits stay
        (and a batch's keys join `self.preserved`). A guard (e.g. `rankone.edit.guard.Guard()`)
        may refuse an update (a batch as a whole); refused requests are logged in `self.rejected`.
        """
        reqs = list(requests)
        if self.is_batch:
            return self._edit_batch(reqs, keep, author or user_name(), reason, guard)
        patch = Patch([], base=self.base_info(), created_at=utcnow(), library_versions=library_versions())
        try:
            for req in track(reqs, "edits", "edits", enabled=self.progress and len(reqs) > 1):
                upd, info = self.compute(req)
                why = guard(upd, req) if guard is not None else None
                if why:
                    log.warning("refused edit %r: %s", req.subject, why)
                    self.rejected.append(Rejected(req, why, upd.diagnostics))
                    continue
                e = self.write(req, upd, info, self.hp, author or user_name(), reason)
                e.diagnostics["outcome"] = out = outcome(self.model, self.tok, req)
                if not out["reached"]:
                    log.warning("the edit %r -> %r did not reach its target: p(target) = %.3f, the model now says %r",
                                req.text()[0], req.target, out["p_target"], out["answer"])
                patch.edits.append(e)
        except BaseException:
            revert_patch(self.model, patch)
            raise
        if not keep:
            revert_patch(self.model, patch)
        return patch

    def _edit_batch(self, reqs: list[EditRequest], keep: bool, author: str, reason: str | None,
                    guard: GuardFn | None) -> Patch:
        patch = Patch([], base=self.base_info(), created_at=utcnow(), library_versions=library_versions())
        try:
            ups, info = compute_batch(self, reqs)
            why = guard(ups, reqs) if guard is not None else None
            if why:
                log.warning("refused a batch of %d edit(s): %s", len(reqs), why)
                diag = {k: info[k] for k in ("delta_fro", "delta_fro_per_fact", "n_facts")}
                self.rejected += [Rejected(r, why, diag) for r in reqs]
                return patch
            write_batch(self, reqs, ups, info, patch, author, reason)
            outs = [outcome(self.model, self.tok, r) for r in reqs]
            patch.edits[-1].diagnostics["outcomes"] = outs
            missed = [(r, o) for r, o in zip(reqs, outs) if not o["reached"]]
            if missed:
                log.warning("%d of %d edit(s) of the batch did not reach the target, e.g. %r -> %r: the model now says %r",
                            len(missed), len(reqs), missed[0][0].text()[0], missed[0][0].target, missed[0][1]["answer"])
        except BaseException:
            revert_patch(self.model, patch)
            raise
        if keep:
            self.preserve(patch)
        else:
            revert_patch(self.model, patch)
        return patch

    def base_info(self) -> dict[str, Any]:
        return self.handle.base_info()


def outcome(model: torch.nn.Module, tok: Any, request: EditRequest) -> dict[str, Any]:
    """What the model says now for the request: p(target) (teacher forced) and its greedy answer;
    `reached` when the answer starts with the target as whole words."""
    prompt = request.text()[0]
    n = len(tok(" " + request.target, add_special_tokens=False)["input_ids"]) + 1
    answer = greedy(model, tok, prompt, n)
    try:
        p = math.exp(target_logprob(model, tok, prompt, request.target))
    except RankoneError:  # a target the tokenizer cannot align after this prompt: no probability, still an answer
        p = float("nan")
    return {"p_target": p, "answer": answer.strip(), "reached": answer_matches(answer, request.target)}


def check_request(model: torch.nn.Module, tok: Any, request: EditRequest, hp: HParams) -> None:
    """Refuse, before any work, a request the tokenizer cannot align or that does not fit the context window."""
    encode_request(tok, request)
    given = [len(tok(p.replace("{}", ""))["input_ids"]) for p in hp.prefixes or []]
    longest = max([n for n, _ in hp.prefix_spec] + given + [0])  # tokens a context prefix adds
    check_fits(model, tok, join_target(request.text()[0], request.target)[0], extra_tokens=longest + 2,
               what="the edit prompt with its target")  # + 2: the prefix's separator and a BOS


def edit(
    model: ModelHandle | torch.nn.Module, tok: Any, requests: EditRequest | Iterable[EditRequest],
    hparams: HParams | None = None, stats_corpus: str | os.PathLike | None = None,
    keep: bool = False, **kw: Any,
) -> Patch:
    """Compute a patch for one or many requests (in sequence; one batch for MEMIT and AlphaEdit).
    The model is left unchanged unless keep.
    With a ModelHandle, pass None as `tok`."""
    reqs = [requests] if isinstance(requests, EditRequest) else list(requests)
    return Editor(model, tok, hparams, stats_corpus, progress=kw.pop("progress", True)).edit(reqs, keep=keep, **kw)
