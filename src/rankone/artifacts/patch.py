"""The patch artifact: low-rank edits, applied and reverted exactly.

Each edit is ΔW = B A in the nn.Linear [out, in] orientation, with LoRA's names: B [out, k] and
A [k, in]; a rank-one edit (ROME's u vᵀ) is k = 1, B = u as one column and A = vᵀ as one row.
Merging computes W + B A in float64 and rounds once to the weight's dtype; the k rank-one terms
are added one at a time in a fixed order (a matrix product's summation order is not fixed across
devices), which gives the same bits on every device. Since rounding can lose information, each
edit also stores a sparse *revert fix*: the few elements where round(W' − B A) ≠ W, with their
original values. Revert is therefore bit-exact from the patch alone, in fp32, fp16 and bf16 alike.

A batch edit (MEMIT, AlphaEdit: n facts written at once) is one rank-n edit per edited layer:
`requests` lists the n facts (row j of A is fact j's weighted key direction) and `keys` [in, n]
float64 holds the keys it was solved with, which a later AlphaEdit batch must preserve.

The files (`patch.safetensors` + `patch.json`, digests, schema versions) are `patch_files`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from rankone.core import architectures as arch
from rankone.core.errors import OverflowRefused, RankoneError
from rankone.core.text import shown
from rankone.core.util import utcnow
from rankone.core.fingerprint import tensor_sha256
from rankone.methods.base import lowrank_fro
from rankone.artifacts.patch_files import (FORMAT, SCHEMA_VERSION, content_id_of, payload_digests, read_patch_files,
                                           write_patch_files)

_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


# ---- exact arithmetic on one weight ---------------------------------------------------------


def merged(w: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """round(W + B A) in W's dtype; W [out, in], B [out, k], A [k, in]. Row blocks bound the float64 memory."""
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)  # contiguous even for Conv1D's transposed view
    b64, a64 = B.to(w.device, torch.float64), A.to(w.device, torch.float64)
    step = max(1, (1 << 24) // max(1, w.shape[1]))
    for r in range(0, w.shape[0], step):
        acc = w[r:r + step].double()  # [rows, in]
        for j in range(a64.shape[0]):  # one rank-one term at a time: a fixed order of float64 adds
            acc += torch.outer(b64[r:r + step, j], a64[j])
        out[r:r + step] = acc.to(w.dtype)
    return out


def unmerged(w: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    return merged(w, -B, A)


def revert_fix(before: torch.Tensor, after: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and values where unmerging `after` misses `before` by a rounding step."""
    back = unmerged(after, B, A)
    it = _INT[before.dtype]
    bad = (back.reshape(-1).view(it) != before.reshape(-1).view(it)).nonzero()[:, 0]
    return bad.cpu(), before.reshape(-1)[bad].cpu()


# ---- the artifact ---------------------------------------------------------------------------


@dataclass
class Edit:
    module: str  # e.g. "transformer.h.3.mlp.c_proj"
    layer: int
    B: torch.Tensor  # [out, k] float32
    A: torch.Tensor  # [k, in] float32; ΔW = B A
    request: dict[str, str]  # the fact; for a batch edit, the first of `requests`
    method: str
    hparams: dict[str, Any]
    seed: int
    delta_fro: float
    weight_dtype: str
    weight_shape: list[int]  # [out, in]
    sha256_before: str
    sha256_after: str
    fix_idx: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    fix_val: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    context_templates: list[str] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    author: str | None = None
    reason: str | None = None
    created_at: str = ""
    requests: list[dict[str, str]] = field(default_factory=list)  # a batch edit's facts, in A's row order
    keys: torch.Tensor | None = None  # [in, n] float64: a batch edit's keys at this layer

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def facts(self) -> list[dict[str, str]]:
        """Every fact this edit writes: the batch's requests, else the one request."""
        return list(self.requests or []) or [self.request]

    def delta(self) -> torch.Tensor:
        return self.B.double() @ self.A.double()  # [out, in]

    def manifest(self, i: int) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in (
            "module", "layer", "request", "method", "hparams", "seed", "delta_fro", "weight_dtype",
            "weight_shape", "sha256_before", "sha256_after", "context_templates", "diagnostics",
            "author", "reason", "created_at")}
        d.update(rank=self.rank, B=f"edits.{i}.B", A=f"edits.{i}.A", fix=f"edits.{i}.fix", n_fix=int(self.fix_idx.numel()))
        if self.requests:
            d["requests"] = self.requests
        if self.keys is not None:
            d["keys"] = f"edits.{i}.keys"
        return d


def make_edit(before: torch.Tensor, B: torch.Tensor, A: torch.Tensor, **fields: Any) -> tuple[Edit, torch.Tensor]:
    """The edit ΔW = B A of weights `before` [out, in], and the weights it merges to (written nowhere).

    The patch stores float32 factors, so the merge uses exactly what it stores. `fields` are the
    Edit's descriptive fields (module, layer, request, method, hparams, seed, ...); the
    fingerprints, the revert fix, ‖Δ‖_F, dtype and shape are computed here.
    """
    B, A = B.detach().float().cpu().contiguous(), A.detach().float().cpu().contiguous()
    if fields.get("keys") is not None:
        fields["keys"] = fields["keys"].detach().to("cpu", torch.float64).contiguous()
        if list(fields["keys"].shape) != [A.shape[1], A.shape[0]]:
            raise RankoneError(f"edit keys {list(fields['keys'].shape)} do not match factors A {list(A.shape)} (keys are [in, k])")
    if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0] or [B.shape[0], A.shape[1]] != list(before.shape):
        raise RankoneError(f"edit factors B {list(B.shape)} and A {list(A.shape)} do not make a {list(before.shape)} update")
    after = merged(before, B, A)
    if not torch.isfinite(after).all():
        raise OverflowRefused(f"the edit of {fields.get('module', 'the module')} overflows {before.dtype}; "
                           "it is refused (nothing written)")
    fix_idx, fix_val = revert_fix(before, after, B, A)
    fields.setdefault("created_at", utcnow())
    e = Edit(B=B, A=A, delta_fro=lowrank_fro(B, A), weight_dtype=str(before.dtype).replace("torch.", ""),
             weight_shape=list(before.shape), sha256_before=tensor_sha256(before), sha256_after=tensor_sha256(after),
             fix_idx=fix_idx, fix_val=fix_val, **fields)
    return e, after


@dataclass
class Patch:
    edits: list[Edit]
    base: dict[str, Any] = field(default_factory=dict)  # model_type, name_or_path
    created_at: str = ""
    library_versions: dict[str, str] = field(default_factory=dict)
    # the content id of the files this patch was read from ("" when made in memory)
    loaded_id: str = field(default="", repr=False, compare=False)
    # the schema of the files it was read from: 1 has no digests, so only apply's fingerprints vouch for it
    schema_version: int = field(default=SCHEMA_VERSION, repr=False, compare=False)

    # -- files (see patch_files) --

    def tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        for i, e in enumerate(self.edits):
            t[f"edits.{i}.B"] = e.B.float().contiguous()
            t[f"edits.{i}.A"] = e.A.float().contiguous()
            t[f"edits.{i}.fix.idx"] = e.fix_idx.long().contiguous()
            t[f"edits.{i}.fix.val"] = e.fix_val.contiguous()
            if e.keys is not None:
                t[f"edits.{i}.keys"] = e.keys.double().contiguous()
        return t

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "created_at": self.created_at,
            "base": self.base, "library_versions": self.library_versions,
            "edits": [e.manifest(i) for i, e in enumerate(self.edits)],
            "payload_sha256": payload_digests(self.tensors()),
        }

    def facts(self) -> list[dict[str, str]]:
        """The distinct facts of all edits, in order (a batch's facts appear once, not once per layer)."""
        seen: dict[tuple[str, ...], dict[str, str]] = {}
        for e in self.edits:
            for f in e.facts:
                seen.setdefault(tuple(f.get(k, "") for k in ("prompt", "subject", "target")), f)
        return list(seen.values())

    def content_id(self) -> str:
        """The id of the patch's content (the registry's id): of the files it was read from, else of what it would write."""
        return self.loaded_id or content_id_of(self.manifest(), self.tensors())

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        return write_patch_files(path, self.manifest(), self.tensors(), overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Patch":
        """Read and verify a patch folder (digests, shapes, types); any mismatch is one RankoneError line."""
        man, edits, cid = read_patch_files(path, {f.name for f in dataclasses.fields(Edit)})
        return cls([Edit(**kw) for kw in edits], man.get("base", {}), str(man.get("created_at", "")),
                   man.get("library_versions", {}), loaded_id=cid, schema_version=man["schema_version"])

    # -- composition --

    def __add__(self, other: "Patch") -> "Patch":
        return compose([self, other])


def compose(patches: Iterable[Patch]) -> Patch:
    """One patch holding the edits of several, in order."""
    ps = list(patches)
    if not ps:
        raise RankoneError("nothing to compose")
    return Patch([e for p in ps for e in p.edits], dict(ps[0].base), utcnow(), dict(ps[0].library_versions))


def library_versions() -> dict[str, str]:
    import transformers

    from rankone import __version__

    return {"rankone": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


# ---- apply / revert ------------------------------------------------------------------------


class Applied:
    """Handle of patches applied in memory; `revert()` puts back the original weights exactly."""

    def __init__(self, model: torch.nn.Module, originals: dict[str, torch.Tensor]) -> None:
        self.model, self.originals = model, originals

    def revert(self) -> None:
        with torch.no_grad():
            for path, w in self.originals.items():
                arch.weight_oi(arch.get_module(self.model, path)).copy_(w)
        self.originals = {}


def _w(model: torch.nn.Module, path: str) -> torch.Tensor:
    return arch.weight_oi(arch.get_module(model, path))


def apply_edit(model: torch.nn.Module, e: Edit, check: bool = True) -> None:
    """Merge one edit. With `check`, the module must be the edit's base and the result its after."""
    w = _w(model, e.module)
    if list(w.shape) != list(e.weight_shape):
        raise RankoneError(f"patch edit for {e.module} expects a {e.weight_shape} weight, the model has {list(w.shape)}: this patch is for another model")
    if check and (fp := tensor_sha256(w)) != e.sha256_before:
        raise RankoneError(
            f"patch does not fit this model: {e.module} has weights {fp[:12]}…, the patch was made on {e.sha256_before[:12]}…; "
            "apply it to the base model it was made for (see `rankone show`)"
        )
    if not (torch.isfinite(e.B).all() and torch.isfinite(e.A).all()):
        raise RankoneError(f"patch edit for {e.module} holds non-finite numbers; refusing to apply it")
    new = merged(w.detach(), e.B, e.A)
    if not torch.isfinite(new).all():
        raise OverflowRefused(f"applying the edit to {e.module} would overflow {w.dtype}; refusing (model untouched)")
    if check and (fp := tensor_sha256(new)) != e.sha256_after:
        raise RankoneError(
            f"patch edit for {e.module} does not give the weights it records ({fp[:12]}… vs sha256_after "
            f"{e.sha256_after[:12]}…): the patch was altered or damaged; refusing it (model untouched)"
        )
    with torch.no_grad():
        w.copy_(new)


def describe_base(base: dict[str, Any]) -> str:
    """'a gpt2 with 4 layers (path/to/model)': the model a patch says it was made for."""
    what = f"a {shown(base.get('model_type') or 'model of unknown type')}"
    if isinstance(base.get("n_layers"), int):
        what += f" with {base['n_layers']} layers"
    return what + (f" ({shown(base['name_or_path'])})" if base.get("name_or_path") else "")


def refuse_misfits(model: torch.nn.Module, patch: Patch, spec: arch.ArchSpec | None = None) -> None:
    """Refuse a patch whose edits do not fit this model, naming the model it was made for: each
    edit must write the edited projection of its layer (as this model's architecture spec says:
    `spec`, a ModelHandle's, else the table's or discovery's, never the manifest's; so never the
    LM head, an embedding or a norm, whatever the manifest claims) with the shape it records."""
    spec = spec or arch.spec_for(model)
    n = arch.num_layers(model, spec)
    for i, e in enumerate(patch.edits):
        if not 0 <= e.layer < n:
            problem = f"edit {i} is for layer {e.layer}; this model has layers 0..{n - 1}"
        elif e.module != spec.proj.format(e.layer):
            problem = (f"edit {i} writes {shown(e.module)!r}, which is not layer {e.layer}'s edited projection "
                       f"{spec.proj.format(e.layer)!r}")
        else:
            w = _w(model, e.module)
            if list(w.shape) == list(e.weight_shape):
                continue
            problem = f"edit {i} expects {e.module} to be {e.weight_shape}, this model's is {list(w.shape)}"
        raise RankoneError(f"this patch was made for {describe_base(patch.base)}, not for this "
                           f"{shown(getattr(model.config, 'model_type', 'model'))}: {problem}; apply it to the model it was made for")


def _edit_key(e: Edit) -> tuple[str, str, str]:
    return e.module, e.sha256_before, e.sha256_after


def refuse_duplicates(patches: list[Patch]) -> None:
    """A patch applies once: the same content twice, or one edit carried by two patches, is refused."""
    ids: dict[str, int] = {}
    for n, p in enumerate(patches):
        pid = p.content_id()
        if pid in ids:
            raise RankoneError(f"patch {n + 1} is patch {ids[pid] + 1} again (content id {pid[:16]}); "
                               "a patch applies once: give each patch one time")
        ids[pid] = n
    seen: dict[tuple[str, str, str], tuple[int, int]] = {}
    for n, p in enumerate(patches):
        for i, e in enumerate(p.edits):
            k = _edit_key(e)
            if k in seen and seen[k][0] != n:
                m, j = seen[k]
                raise RankoneError(f"edit {i} of patch {n + 1} is edit {j} of patch {m + 1} again ({e.module}, "
                                   f"{e.sha256_before[:12]}… -> {e.sha256_after[:12]}…): an edit applies once")
            seen.setdefault(k, (n, i))


def apply_patch(model: torch.nn.Module, patches: Patch | Iterable[Patch], spec: arch.ArchSpec | None = None,
                fitted: bool = False) -> Applied:
    """Apply patches in order, all or nothing: a failed check leaves the model untouched. `spec`:
    where the model's edited projections are (a ModelHandle's; default: the table's or discovery's);
    `fitted`: `refuse_misfits` was already run against the whole model (`model` holds only modules).

    A patch's first edit on a module must find either the module's current weights (the patch
    was made on top of what is applied) or its weights before this call (patches made
    independently on one base, stacked). Its later edits on that module must continue the
    patch's own chain (each one's base is the previous one's result). Where an edit finds its
    base, the result must be its recorded after-fingerprint. One patch (or edit) twice is refused.
    """
    ps = [patches] if isinstance(patches, Patch) else list(patches)
    refuse_duplicates(ps)
    for p in ps if not fitted else []:
        refuse_misfits(model, p, spec)
    originals: dict[str, torch.Tensor] = {}
    base_fp: dict[str, str] = {}
    applied = Applied(model, originals)
    try:
        for p in ps:
            chain: dict[str, str] = {}  # module -> the fingerprint this patch left it at
            for e in p.edits:
                w = _w(model, e.module)
                if e.module not in originals:
                    originals[e.module] = w.detach().clone()
                    base_fp[e.module] = tensor_sha256(w)
                if e.module in chain:
                    stacked = chain[e.module] == e.sha256_before and tensor_sha256(w) != e.sha256_before
                else:
                    stacked = base_fp[e.module] == e.sha256_before and tensor_sha256(w) != e.sha256_before
                apply_edit(model, e, check=not stacked)
                chain[e.module] = e.sha256_after
    except BaseException:
        applied.revert()
        raise
    return applied


def revert_patch(model: torch.nn.Module, patch: Patch) -> None:
    """Undo a patch that is the last thing applied to these modules, bit-exactly, from the patch alone."""
    originals = {e.module: _w(model, e.module).detach().clone() for e in patch.edits}
    try:
        for e in reversed(patch.edits):
            w = _w(model, e.module)
            if (fp := tensor_sha256(w)) != e.sha256_after:
                raise RankoneError(
                    f"cannot revert: {e.module} is not in the state this patch left it ({fp[:12]}… vs "
                    f"{e.sha256_after[:12]}…); revert later patches first, or restore from the base model"
                )
            back = unmerged(w.detach(), e.B, e.A)
            flat = back.reshape(-1)
            flat[e.fix_idx.to(flat.device)] = e.fix_val.to(flat.device, flat.dtype)
            if tensor_sha256(back) != e.sha256_before:
                raise RankoneError(f"revert of {e.module} did not reproduce the base weights; the patch file may be damaged")
            with torch.no_grad():
                w.copy_(back)
    except BaseException:
        Applied(model, originals).revert()
        raise
