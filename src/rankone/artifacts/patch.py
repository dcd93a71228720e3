"""The patch artifact: rank-one edits as `patch.safetensors` + `patch.json`, applied and reverted exactly.

Each edit is ΔW = u vᵀ in the nn.Linear [out, in] orientation. Merging computes W + u vᵀ in
float64 and rounds once to the weight's dtype, which gives the same bits on every device. Since
rounding can lose information, each edit also stores a sparse *revert fix*: the few elements
where round(W' − u vᵀ) ≠ W, with their original values. Revert is therefore bit-exact from the
patch alone, in fp32, fp16 and bf16 alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save

from rankone.core import architectures as arch
from rankone.core.atomic import atomic_dir, write_bytes, write_json
from rankone.core.errors import RankoneError
from rankone.core.fingerprint import tensor_sha256

SCHEMA_VERSION = 1
FORMAT = "rankone.artifacts.patch"
_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}


# ---- exact arithmetic on one weight ---------------------------------------------------------


def merged(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """round(W + u vᵀ) in W's dtype; W [out, in], u [out], v [in]. Row blocks bound the float64 memory."""
    out = torch.empty(w.shape, dtype=w.dtype, device=w.device)  # contiguous even for Conv1D's transposed view
    u64, v64 = u.to(w.device, torch.float64), v.to(w.device, torch.float64)
    step = max(1, (1 << 24) // max(1, w.shape[1]))
    for r in range(0, w.shape[0], step):
        out[r:r + step] = (w[r:r + step].double() + torch.outer(u64[r:r + step], v64)).to(w.dtype)
    return out


def unmerged(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return merged(w, -u, v)


def revert_fix(before: torch.Tensor, after: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and values where unmerging `after` misses `before` by a rounding step."""
    back = unmerged(after, u, v)
    it = _INT[before.dtype]
    bad = (back.reshape(-1).view(it) != before.reshape(-1).view(it)).nonzero()[:, 0]
    return bad.cpu(), before.reshape(-1)[bad].cpu()


# ---- the artifact ---------------------------------------------------------------------------


@dataclass
class Edit:
    module: str  # e.g. "transformer.h.3.mlp.c_proj"
    layer: int
    u: torch.Tensor  # [out] float32
    v: torch.Tensor  # [in] float32
    request: dict[str, str]
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

    def delta(self) -> torch.Tensor:
        return torch.outer(self.u.double(), self.v.double())  # [out, in]

    def manifest(self, i: int) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in (
            "module", "layer", "request", "method", "hparams", "seed", "delta_fro", "weight_dtype",
            "weight_shape", "sha256_before", "sha256_after", "context_templates", "diagnostics",
            "author", "reason", "created_at")}
        d.update(u=f"edits.{i}.u", v=f"edits.{i}.v", fix=f"edits.{i}.fix", n_fix=int(self.fix_idx.numel()))
        return d


@dataclass
class Patch:
    edits: list[Edit]
    base: dict[str, Any] = field(default_factory=dict)  # model_type, name_or_path
    created_at: str = ""
    library_versions: dict[str, str] = field(default_factory=dict)

    # -- files --

    def tensors(self) -> dict[str, torch.Tensor]:
        t: dict[str, torch.Tensor] = {}
        for i, e in enumerate(self.edits):
            t[f"edits.{i}.u"] = e.u.float().contiguous()
            t[f"edits.{i}.v"] = e.v.float().contiguous()
            t[f"edits.{i}.fix.idx"] = e.fix_idx.long().contiguous()
            t[f"edits.{i}.fix.val"] = e.fix_val.contiguous()
        return t

    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "created_at": self.created_at,
            "base": self.base, "library_versions": self.library_versions,
            "edits": [e.manifest(i) for i, e in enumerate(self.edits)],
        }

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        with atomic_dir(path, overwrite) as tmp:
            write_bytes(tmp / "patch.safetensors", save(self.tensors(), metadata={"format": FORMAT}))
            write_json(tmp / "patch.json", self.manifest())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Patch":
        p = Path(path)
        if not (p / "patch.json").is_file() or not (p / "patch.safetensors").is_file():
            raise RankoneError(f"{p} is not a patch: it needs patch.json and patch.safetensors (made by `rankone edit --out`)")
        try:
            man = json.loads((p / "patch.json").read_text())
            tensors = load_file(str(p / "patch.safetensors"))
        except Exception as e:
            raise RankoneError(f"patch {p} is corrupt ({type(e).__name__}: {e}); re-create it with `rankone edit`") from None
        if man.get("format") != FORMAT or not isinstance(man.get("edits"), list):
            raise RankoneError(f"{p}/patch.json is not a rankone patch manifest")
        if man.get("schema_version") != SCHEMA_VERSION:
            raise RankoneError(f"patch {p} has schema version {man.get('schema_version')}; this rankone reads version {SCHEMA_VERSION}")
        edits = []
        try:
            for i, m in enumerate(man["edits"]):
                kw = {k: m[k] for k in (f.name for f in dataclasses.fields(Edit)) if k in m}
                kw.update(u=tensors[m["u"]], v=tensors[m["v"]], fix_idx=tensors[f"{m['fix']}.idx"], fix_val=tensors[f"{m['fix']}.val"])
                e = Edit(**kw)
                if list(e.u.shape) != [e.weight_shape[0]] or list(e.v.shape) != [e.weight_shape[1]]:
                    raise ValueError(f"edit {i}: u/v shapes do not match weight_shape {e.weight_shape}")
                edits.append(e)
        except (KeyError, TypeError, ValueError) as e:
            raise RankoneError(f"patch {p} is corrupt: {e}") from None
        return cls(edits, man.get("base", {}), man.get("created_at", ""), man.get("library_versions", {}))

    # -- composition --

    def __add__(self, other: "Patch") -> "Patch":
        return compose([self, other])


def compose(patches: Iterable[Patch]) -> Patch:
    """One patch holding the edits of several, in order."""
    ps = list(patches)
    if not ps:
        raise RankoneError("nothing to compose")
    return Patch([e for p in ps for e in p.edits], dict(ps[0].base), now(), dict(ps[0].library_versions))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


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
    if not (torch.isfinite(e.u).all() and torch.isfinite(e.v).all()):
        raise RankoneError(f"patch edit for {e.module} holds non-finite numbers; refusing to apply it")
    new = merged(w.detach(), e.u, e.v)
    if not torch.isfinite(new).all():
        raise RankoneError(f"applying the edit to {e.module} would overflow {w.dtype}; refusing (model untouched)")
    with torch.no_grad():
        w.copy_(new)


def apply_patch(model: torch.nn.Module, patches: Patch | Iterable[Patch]) -> Applied:
    """Apply patches in order, all or nothing: a failed check leaves the model untouched.

    A patch's first edit on a module must find either the module's current weights (the patch
    was made on top of what is applied) or its weights before this call (patches made
    independently on one base, stacked). Its later edits on that module must continue the
    patch's own chain (each one's base is the previous one's result).
    """
    ps = [patches] if isinstance(patches, Patch) else list(patches)
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
            back = unmerged(w.detach(), e.u, e.v)
            flat = back.reshape(-1)
            flat[e.fix_idx.to(flat.device)] = e.fix_val.to(flat.device, flat.dtype)
            if tensor_sha256(back) != e.sha256_before:
                raise RankoneError(f"revert of {e.module} did not reproduce the base weights; the patch file may be damaged")
            with torch.no_grad():
                w.copy_(back)
    except BaseException:
        Applied(model, originals).revert()
        raise
