"""Batch edits (MEMIT, AlphaEdit) for the Editor: a whole batch of facts written as one patch.

The type of the settings picks the path; there is one `Editor` and one `Editor.edit`:

    Editor(handle, EditHParams(method="r-rome"))   one rank-one edit per request, in sequence
    Editor(handle, MemitHParams())                 the requests as one batch: one rank-n edit
    Editor(handle, AlphaEditHParams())             per window layer (n = number of requests)

`settings_for(method)` is the settings class of a method name (the CLI's --method), and
`hparams_from_dict` reads any method's settings from JSON.

What a batch patch holds, per window layer, lowest first: B [out, n] and A [n, in] (float32; apply
merges exactly what is stored, revert is exact), the batch's requests (row j of A belongs to
request j), the keys K [in, n] (float64) that layer was solved with, the method, the resolved
settings (the concrete window and λ), the context templates and the method's diagnostics. The
outcome for each request (p(target), the model's answer) is recorded on the last edit (the
critical layer's), measured once the whole batch is in place.

Key statistics: C of each window layer is taken once per Editor, from the model as it is at the
Editor's first batch, and kept (`Editor.batch_stats`), so that every batch of a sequence is solved
against the unedited model's C, as in both papers. (The disk cache keys C by the weights upstream
of its layer, which change once a lower window layer is edited: the cache alone would measure C
again on the edited model.)

AlphaEdit's preserved keys K_p are `Editor.preserved`. A batch written and kept
(`edit(..., keep=True)`) adds its keys; a patch applied by other means is added with
`Editor.preserve(patch)`. Since patches carry their keys, the store never needs a file of its
own: `preserved_keys_of(patches)` rebuilds exactly what an unbroken run would hold, from a
sequential run's checkpointed patch or from a registry's released patches in release order
(`rankone.lifecycle.registry.Registry.preserved_keys`; a rolled-back patch's keys drop out with it).
"""

from __future__ import annotations

import time
from typing import Any, Iterable, Sequence

import torch

from rankone.artifacts.patch import Patch, lowrank_fro, make_edit
from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.hooks import after_forward
from rankone.core.progress import Progress
from rankone.core.tokens import EditRequest
from rankone.methods import alphaedit, memit
from rankone.methods.alphaedit import PreservedKeys
from rankone.methods.hparams import AlphaEditHParams, HParams, MemitHParams, settings_for
from rankone.methods.memit import LayerUpdate

def hparams_from_dict(d: dict[str, Any]) -> HParams:
    """Any method's settings from a JSON object; its `method` field picks the class."""
    return settings_for(d.get("method")).from_dict(d)  # type: ignore[return-value]


def is_batch(hp: Any) -> bool:
    return isinstance(hp, MemitHParams)


def preserved_keys_of(patches: Iterable[Patch]) -> PreservedKeys:
    """K_p per layer: the keys of every batch edit of these patches, in order (what a run that
    wrote them one after another holds in its store)."""
    store = PreservedKeys()
    for p in patches:
        for e in p.edits:
            if e.keys is not None:
                store.add(e.layer, e.keys)
    return store


def check_batch(requests: Sequence[EditRequest]) -> None:
    """A batch is at least one request, and asks each question (prompt and subject) once."""
    if not requests:
        raise RankoneError("no requests to edit: give at least one prompt/subject/target")
    seen: dict[tuple[str, str], str] = {}
    for r in requests:
        q = (" ".join(r.prompt.lower().split()), r.subject.strip().lower())
        if q in seen:
            raise RankoneError(f"the batch asks {r.text()[0]!r} twice (targets {seen[q]!r} and {r.target!r}); "
                               "give each fact once per batch")
        seen[q] = r.target


def batch_norm(updates: Sequence[LayerUpdate]) -> dict[str, Any]:
    """‖ΔW‖_F of a batch: per layer, over the window (√Σ‖B_l A_l‖²), and per fact (over the
    window, / √n: what one fact of a batch of n costs if their updates are orthogonal)."""
    per_layer = {int(u.layer): lowrank_fro(u.B, u.A) for u in updates}
    total = float(sum(x * x for x in per_layer.values()) ** 0.5)
    n = int(updates[0].B.shape[1]) if updates else 1
    return {"delta_fro": total, "delta_fro_per_fact": total / n ** 0.5, "delta_fro_layers": per_layer, "n_facts": n}


def compute_batch(ed: Any, requests: Sequence[EditRequest], hp: MemitHParams | None = None
                  ) -> tuple[list[LayerUpdate], dict[str, Any]]:
    """The updates for a batch on the model as it is now (nothing is written), and what to record:
    the resolved settings, the templates, timing. `ed`: the rankone.edit.editor.Editor (its model,
    templates, statistics and preserved keys)."""
    check_batch(requests)
    hp = hp or ed.hp  # type: ignore[assignment]
    assert isinstance(hp, MemitHParams)
    with ed.handle.scope():
        hp = hp.resolve(ed.model)
    templates = ed.templates(hp)
    stats = ed.batch_stats(hp.layers, hp.stats_tokens)
    groups = -(-len(requests) // memit.facts_per_group(hp, len(templates)))
    passes = hp.v_steps * groups + len(hp.layers) * -(-len(requests) * len(templates) // hp.batch_rows)
    t0 = time.perf_counter()
    with ed.handle.scope(), Progress(passes, f"{hp.method} ({len(requests)} facts)", "passes", enabled=ed.progress,
                                     delay=2.0) as bar, after_forward(ed.model, bar.update):
        if isinstance(hp, AlphaEditHParams):  # a copy: the keys join the store only when the batch is kept
            ups = alphaedit.edit_batch(ed.model, ed.tok, requests, hp, stats.__getitem__, ed.preserved.copy(),
                                       templates, ed.cache_dir)
        else:
            ups = memit.edit_batch(ed.model, ed.tok, requests, hp, stats.__getitem__, templates)
    info = {"hparams": hp, "templates": templates, "seconds": time.perf_counter() - t0, **batch_norm(ups)}
    return ups, info


def write_batch(ed: Any, requests: Sequence[EditRequest], updates: Sequence[LayerUpdate], info: dict[str, Any],
                patch: Patch, author: str | None = None, reason: str | None = None) -> None:
    """Merge each layer's update into the model, lowest layer first, appending its edit to `patch`
    as soon as it is written (so that the caller can revert exactly what was written)."""
    hp: MemitHParams = info["hparams"]
    reqs = [r.to_dict() for r in requests]
    for u in updates:
        w = arch.weight_oi(arch.get_module(ed.model, u.module))
        diag = {k: v for k, v in u.diagnostics.items() if k not in ("hparams", "templates")}  # recorded as fields
        diag.update(batch_seconds=info["seconds"], **ed.notes)
        e, after = make_edit(w.detach().clone(), u.B, u.A, module=u.module, layer=u.layer, request=reqs[0],
                             requests=reqs, keys=u.keys, method=hp.method, hparams=hp.to_dict(), seed=hp.seed,
                             context_templates=info["templates"], diagnostics=diag, author=author, reason=reason)
        with torch.no_grad():
            w.copy_(after)
        patch.edits.append(e)


def outcomes_of(patch: Patch) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(request, outcome) for every request of a patch the Editor made: a rank-one edit's own
    outcome, or a batch's outcomes (recorded on its last edit)."""
    out = []
    for e in patch.edits:
        if "outcomes" in e.diagnostics:
            out += list(zip(e.facts, e.diagnostics["outcomes"]))
        elif "outcome" in e.diagnostics:
            out.append((e.request, e.diagnostics["outcome"]))
    return out
