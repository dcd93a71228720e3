"""The edit loop: request → key → value → update → merged into the model → recorded in a Patch.

`Editor` keeps what is computed once per model (prefix templates, key statistics and their
factorisation) so that many edits, one after another, pay for them once.
"""

from __future__ import annotations

import getpass
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import model_sha256, tensor_sha256
from rankone.methods.hparams import EditHParams
from rankone.models.load import default_corpus, default_layer
from rankone.artifacts.patch import Edit, Patch, library_versions, merged, now, revert_fix, revert_patch
from rankone.methods.rome import Update, compute_key, compute_value, rank_one_update
from rankone.methods.cache import cached_json
from rankone.methods.corpus import sampled_corpus
from rankone.methods.stats import LayerStats, layer_stats
from rankone.core.tokens import PREFIX_STARTS, EditRequest, encode, sample_prefixes

log = logging.getLogger(__name__)

# A guard looks at a computed update before it is written and returns a reason to refuse it.
Guard = Callable[[Update, EditRequest], "str | None"]


@dataclass
class Rejected:
    request: EditRequest
    reason: str
    diagnostics: dict[str, float]


class Editor:
    def __init__(
        self, model: torch.nn.Module, tok: Any, hparams: EditHParams | None = None,
        stats_corpus: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
    ) -> None:
        self.model, self.tok = model, tok
        self.hp = hparams or EditHParams.for_model(model)
        self.cache_dir = cache_dir
        self.progress = progress
        self._corpus = Path(stats_corpus) if stats_corpus else None
        self._corpus_source = str(self._corpus) if self._corpus else ""  # recorded in each edit
        self._templates: dict[tuple, list[str]] = {}
        self.rejected: list[Rejected] = []
        self.notes: dict[str, Any] = {}  # recorded in every edit's diagnostics (e.g. why this layer)

    # -- things computed once --

    def layer(self, hp: EditHParams | None = None) -> int:
        hp = hp or self.hp
        layer = default_layer(self.model) if hp.layer is None else hp.layer
        return arch.check_layer(self.model, layer)

    def corpus(self, hp: EditHParams | None = None) -> Path:
        """The statistics corpus: the one given, else the model's own, else one sampled from the
        model (seeded, cached by its fingerprint; said in one line and recorded in each edit)."""
        if self._corpus is None:
            try:
                self._corpus = default_corpus(self.model)
                self._corpus_source = str(self._corpus)
            except RankoneError:
                hp = hp or self.hp
                log.warning("no statistics corpus given: sampling %s tokens from the model itself (seed %d; "
                            "cached for this model); pass --stats-corpus to use natural text",
                            f"{hp.sampled_corpus_tokens:,}", hp.seed)
                self._corpus = sampled_corpus(self.model, self.tok, hp.sampled_corpus_tokens, hp.seed,
                                              cache_dir=self.cache_dir, progress=self.progress)
                self._corpus_source = f"sampled from the model: {hp.sampled_corpus_tokens} tokens, seed {hp.seed}"
        return self._corpus

    def templates(self, hp: EditHParams | None = None) -> list[str]:
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
        return layer_stats(self.model, self.tok, [layer], self.corpus(hp), hp.stats_tokens, self.cache_dir, self.progress)[layer]

    # -- one edit --

    def compute(self, request: EditRequest, hp: EditHParams | None = None) -> tuple[Update, dict[str, Any]]:
        """The update for one request on the model as it is now (nothing is written)."""
        hp = hp or self.hp
        layer = self.layer(hp)
        templates = self.templates(hp)
        st = self.stats(layer, hp)
        t0 = time.perf_counter()
        key = compute_key(self.model, self.tok, request, layer, templates)
        t1 = time.perf_counter()
        value = compute_value(self.model, self.tok, request, layer, templates, hp)
        t2 = time.perf_counter()
        w = arch.weight_oi(arch.get_module(self.model, arch.proj_path(self.model, layer)))
        upd = rank_one_update(w, key, value, st, hp.method)
        t3 = time.perf_counter()
        info = {
            "layer": layer, "templates": templates,
            "timing": {"key_s": t1 - t0, "value_s": t2 - t1, "solve_s": t3 - t2},
            "value": {"losses": value.losses, "target_probs": value.target_probs, "clamped": value.clamped,
                      "target_prob": value.target_prob, "steps": len(value.losses), "stopped_early": value.stopped_early,
                      "early_stop_prob": hp.early_stop_prob, "gathered_logits": value.gathered,
                      "passes": value.passes},
            "stats": {"n_tokens": st.n_tokens, "corpus_sha256": st.meta.get("corpus", ""), "jitter": st.jitter,
                      "corpus": self._corpus_source},
        }
        return upd, info

    def write(self, request: EditRequest, upd: Update, info: dict[str, Any], hp: EditHParams,
              author: str | None = None, reason: str | None = None) -> Edit:
        """Merge the update into the model and describe it as a patch edit."""
        layer = info["layer"]
        path = arch.proj_path(self.model, layer)
        w = arch.weight_oi(arch.get_module(self.model, path))
        u, v = upd.residual.float(), upd.key_dir.float()  # the patch stores float32; merge exactly what it stores
        before = w.detach().clone()
        after = merged(before, u, v)
        if not torch.isfinite(after).all():
            raise FloatingPointError(f"edit of {path} overflows {w.dtype}")
        fix_idx, fix_val = revert_fix(before, after, u, v)
        with torch.no_grad():
            w.copy_(after)
        diag = dict(upd.diagnostics, **{k: info[k] for k in ("timing", "value", "stats")}, **self.notes)
        return Edit(
            module=path, layer=layer, u=u.cpu(), v=v.cpu(), request=request.to_dict(),
            method=hp.method, hparams=hp.to_dict(), seed=hp.seed,
            delta_fro=float(u.double().norm() * v.double().norm()), weight_dtype=str(w.dtype).replace("torch.", ""),
            weight_shape=list(w.shape), sha256_before=tensor_sha256(before), sha256_after=tensor_sha256(after),
            fix_idx=fix_idx, fix_val=fix_val, context_templates=info["templates"], diagnostics=diag,
            author=author, reason=reason, created_at=now(),
        )

    def edit(
        self, requests: Iterable[EditRequest], keep: bool = False, author: str | None = None,
        reason: str | None = None, guard: Guard | None = None,
    ) -> Patch:
        """Edit in sequence (each on the model with the previous ones merged) and return the patch.

        With keep=False the model is given back exactly as it was; with keep=True the edits stay.
        A guard may refuse an update; refused requests are logged in `self.rejected`.
        """
        reqs = list(requests)
        patch = Patch([], base=self.base_info(), created_at=now(), library_versions=library_versions())
        try:
            for req in tqdm(reqs, desc="edits", unit="edit", disable=not self.progress or len(reqs) < 2):
                upd, info = self.compute(req)
                why = guard(upd, req) if guard is not None else None
                if why:
                    log.warning("refused edit %r: %s", req.subject, why)
                    self.rejected.append(Rejected(req, why, upd.diagnostics))
                    continue
                patch.edits.append(self.write(req, upd, info, self.hp, author or _user(), reason))
        except BaseException:
            revert_patch(self.model, patch)
            raise
        if not keep:
            revert_patch(self.model, patch)
        return patch

    def base_info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"model_type": cfg.model_type, "name_or_path": str(getattr(cfg, "_name_or_path", "")),
                "n_layers": arch.num_layers(self.model)}


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def edit(
    model: torch.nn.Module, tok: Any, requests: EditRequest | Iterable[EditRequest],
    hparams: EditHParams | None = None, stats_corpus: str | os.PathLike | None = None,
    keep: bool = False, **kw: Any,
) -> Patch:
    """Compute a patch for one or many requests (in sequence). The model is left unchanged unless keep."""
    reqs = [requests] if isinstance(requests, EditRequest) else list(requests)
    return Editor(model, tok, hparams, stats_corpus, progress=kw.pop("progress", True)).edit(reqs, keep=keep, **kw)
