"""Release conflicts: does a candidate patch fit the release, and does it rewrite what a released
patch already wrote?

`fit_release` walks the weight fingerprints the way `rankone.artifacts.patch.apply_patch` will when the
release is built. `find_conflicts` finds two kinds of collision, both computed from the patch
files alone (no model, no statistics):

* **same fact** — an edit with the same subject (case-insensitive) and the same relation as a
  released edit. A patch does not name relations, so the relation is the prompt template with
  `{}` for the subject (lower case, single spaces); when the base model is a testbed whose
  world.json lists the template among a relation's phrasings, that relation's id is used
  instead, so "{} was born in" and "The birthplace of {} is" are one relation.
* **key overlap** — two edits of the same module whose keys point the same way. A rank-one
  edit's A is one row, vᵀ with v = C⁻¹k / (kᵀC⁻¹k): its key weighted by C⁻¹ (and scaled). The
  overlap is

      overlap(e₁, e₂) = |cos(v₁, v₂)| = |k₁ᵀ C⁻² k₂| / (‖C⁻¹k₁‖ ‖C⁻¹k₂‖),

  the cosine of the C⁻¹-weighted keys. The update of edit 2 moves the output at edit 1's key by
  u₂ (v₂ᵀk₁); keys that are close after whitening by C⁻¹ are the ones that collide. Edits of
  different modules never overlap. Absolute value: an anti-aligned key collides as well. A rank-k
  edit (a batch) has k rows in A, one weighted key direction each; its overlap with another edit
  is the largest |cos| over pairs of rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from rankone.artifacts.patch import Edit, Patch
from rankone.core.errors import RankoneError
from rankone.core.jsonfiles import json_file


@dataclass
class Conflict:
    kind: str  # "same-fact" | "key-overlap"
    edit: int  # index of the candidate's edit
    other: str  # id of the released patch
    other_edit: int
    value: float  # 1.0 for same-fact, |cos| for key overlap
    detail: str


def fit_release(base_fp: dict[str, str], released: list[tuple[str, Patch]], patch: Patch
                ) -> tuple[dict[str, str], set[str], list[str]]:
    """Fingerprint walk of the released patches plus the candidate, in release order.

    An edit fits if its `sha256_before` is the module's base (patches made on the base stack:
    the merged weights are the exact sum of the rank-one terms), the state the released chain
    leaves the module in, or the result of the candidate's own previous edit of that module. `base_fp` holds the known base fingerprints per module. Returns (base
    fingerprints the candidate teaches, released patches it was made on top of, problems).
    """
    base_fp = dict(base_fp)
    state: dict[str, str | None] = {}  # None: stacked, fingerprint unknown without the weights
    touched: dict[str, list[str]] = {}
    for rid, rp in released:
        for e in rp.edits:
            b = base_fp.setdefault(e.module, e.sha256_before)
            state[e.module] = e.sha256_after if e.sha256_before == state.get(e.module, b) else None
            touched.setdefault(e.module, []).append(rid)
    learnt: dict[str, str] = {}
    deps: set[str] = set()
    problems: list[str] = []
    last: dict[str, tuple[int, str]] = {}  # module -> (index, after) of the candidate's previous edit
    for i, e in enumerate(patch.edits):
        prev = last.get(e.module)
        last[e.module] = (i, e.sha256_after)
        if e.module not in base_fp:
            base_fp[e.module] = learnt[e.module] = e.sha256_before
        b = base_fp[e.module]
        cur = state.get(e.module, b)
        if e.sha256_before != b:  # made on top of released patches: it needs every one of that module
            deps.update(touched.get(e.module, []))
        if e.sha256_before == cur:
            state[e.module] = e.sha256_after
        elif e.sha256_before == b:
            state[e.module] = None
        elif cur is None and prev is not None and e.sha256_before == prev[1]:
            state[e.module] = None  # continues this patch's own chain, stacked (as apply_patch does)
        elif cur is None:
            problems.append(f"edit {i} was made on {e.module} weights {e.sha256_before[:12]}…, which the "
                            "fingerprints alone cannot place; pass --model BASE to check it on the real weights")
        else:
            problems.append(f"edit {i} was made on {e.module} weights {e.sha256_before[:12]}…, but the release base "
                            f"has {b[:12]}… and the released patches leave {cur[:12]}…: it was made for another base model")
    return learnt, deps, problems


def relation_map(model_dir: str | Path | None) -> dict[str, str]:
    """Normalised phrasing → relation id, from a testbed's world.json (empty when there is none)."""
    if model_dir is None or not (Path(model_dir) / "world.json").is_file():
        return {}
    try:
        world = json_file(Path(model_dir) / "world.json")
        return {_norm(ph): str(r["id"]) for r in world.get("relations", []) for ph in r.get("phrasings", [])}
    except (RankoneError, KeyError, TypeError, AttributeError):
        return {}


def _norm(template: str) -> str:
    return " ".join(template.lower().split())


def fact_key(request: dict[str, Any], relations: dict[str, str] | None = None) -> tuple[str, str]:
    """(subject, relation) of an edit request, normalised for comparison."""
    tpl = _norm(request.get("prompt", ""))
    rel = (relations or {}).get(tpl, tpl)
    return _norm(request.get("subject", "")), rel


def key_overlap(a: Edit, b: Edit) -> float:
    """Largest |cos| between a key direction of one edit and one of the other (the rows of their A;
    one row each for rank-one edits); 0 for edits of different modules."""
    if a.module != b.module or a.A.shape[1:] != b.A.shape[1:]:
        return 0.0
    ra, rb = a.A.double(), b.A.double()  # [k_a, in], [k_b, in]
    na, nb = ra.norm(dim=1, keepdim=True), rb.norm(dim=1, keepdim=True)
    ra, rb = ra[na[:, 0] > 0] / na[na[:, 0] > 0], rb[nb[:, 0] > 0] / nb[nb[:, 0] > 0]
    if not len(ra) or not len(rb):
        return 0.0
    return float((ra @ rb.T).abs().max())


def find_conflicts(candidate: Patch, released: Iterable[tuple[str, Patch]], threshold: float,
                   relations: dict[str, str] | None = None) -> list[Conflict]:
    """Every pair (candidate edit, released edit) that writes the same fact or overlaps above
    `threshold`. A batch edit writes several facts (`Edit.facts`); each pair of same facts is one
    conflict per released patch, reported at the first pair of edits that carry it (a batch
    writes its facts on every layer of its window)."""
    out: list[Conflict] = []
    for pid, p in released:
        reported: set[tuple[str, str]] = set()
        for j, r in enumerate(p.edits):
            theirs = {fact_key(f, relations): f for f in r.facts}
            for i, e in enumerate(candidate.edits):
                same = [(f, theirs[k]) for f in e.facts if (k := fact_key(f, relations)) in theirs]
                for f, g in same:
                    if (_say(f), _say(g)) in reported:
                        continue
                    reported.add((_say(f), _say(g)))
                    out.append(Conflict("same-fact", i, pid, j, 1.0,
                                        f"edit {i} ({_say(f)}) rewrites the fact released by {pid} edit {j} ({_say(g)})"))
                if same:
                    continue
                cos = key_overlap(e, r)
                if cos > threshold:
                    out.append(Conflict("key-overlap", i, pid, j, cos,
                                        f"edit {i} ({_said(e)}) and {pid} edit {j} ({_said(r)}) edit {e.module} with "
                                        f"keys of cosine {cos:.3f} > {threshold} (C⁻¹-weighted): each would rewrite the other's fact"))
    return out


def overlap_matrix(edits: list[Edit]) -> torch.Tensor:
    """|cos| between every pair of edits (for diagnostics and benchmarks). [n, n]"""
    n = len(edits)
    m = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            m[i, j] = key_overlap(edits[i], edits[j])
    return m


def _say(r: dict[str, Any]) -> str:
    return f"{r.get('prompt', '').replace('{}', r.get('subject', ''))} -> {r.get('target', '')}"


def _said(e: Edit) -> str:
    """An edit's fact, or a batch edit's first fact and how many more it writes."""
    return _say(e.request) + (f" and {len(e.facts) - 1} more" if len(e.facts) > 1 else "")


def explain(conflicts: list[Conflict]) -> str:
    """One line for a RankoneError: the conflicts, then how to proceed."""
    shown = "; ".join(c.detail for c in conflicts[:3])
    more = f" (and {len(conflicts) - 3} more)" if len(conflicts) > 3 else ""
    return (f"release refused, {len(conflicts)} conflict(s) with released patches: {shown}{more}. "
            "Roll the released patch back first, or pass --force to release both")
