"""Low-rank deltas per row of a batch: y += (x Aᵀ) Bᵀ for the rows whose patch set has them.

A batch may hold rows of several patch sets (stable, candidate, a pin). Each module that any of
them edits gets one forward hook for the duration of a forward pass; the hook adds each patch
set's factors to its own rows only. Rows of the stable arm get nothing added: their patches are
already merged into the weights. The rank is tiny (one per edit), so this costs two thin
matrix products per edited module instead of a second copy of the model.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from rankone.core.architectures import get_module
from rankone.serve.patchsets import Factors, PatchSet


def row_groups(patchsets: Sequence[PatchSet]) -> dict[str, list[tuple[torch.Tensor | None, Factors]]]:
    """{module: [(rows, (A, B))]} for a batch whose row i uses patchsets[i]; rows None means all."""
    by_set: dict[str, tuple[PatchSet, list[int]]] = {}
    for i, ps in enumerate(patchsets):
        if ps.deltas:
            by_set.setdefault(ps.digest, (ps, []))[1].append(i)
    out: dict[str, list[tuple[torch.Tensor | None, Factors]]] = {}
    for ps, rows in by_set.values():
        idx = None if len(rows) == len(patchsets) else torch.tensor(rows, dtype=torch.long)
        for module, factors in ps.deltas.items():
            out.setdefault(module, []).append((idx, factors))
    return out


def _hook(groups: list[tuple[torch.Tensor | None, Factors]]) -> Any:
    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        x = args[0]  # [batch, pos, in]
        y = output[0] if isinstance(output, tuple) else output  # [batch, pos, out]
        for rows, (a, b) in groups:
            if rows is None:
                y = y + (x @ a.T.to(x.dtype)) @ b.T.to(y.dtype)
            else:
                rows = rows.to(x.device)
                y = y.index_add(0, rows, (x.index_select(0, rows) @ a.T.to(x.dtype)) @ b.T.to(y.dtype))
        return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y
    return hook


@contextmanager
def row_deltas(model: nn.Module, patchsets: Sequence[PatchSet]) -> Iterator[None]:
    """Inside, a forward pass over a batch adds each row's deltas; every hook is removed on exit."""
    with ExitStack() as stack:
        for module, groups in row_groups(patchsets).items():
            h = get_module(model, module).register_forward_hook(_hook(groups))
            stack.callback(h.remove)
        yield
