"""The key/value state of a running batch, and one forward pass over it.

Rows are left-padded: row i's real tokens sit at the right end of its [L] positions, and the
attention mask [batch, L] is 0 on padding, so every row's next token is at the same column.
Position ids count a row's real tokens, so a row computes what it would compute alone. Rows
join (their prompts prefilled together, then padded to the batch's length), leave when they
finish, and the columns nobody uses any more are cut off, so memory follows the live rows.

The cache is held as plain tensors, one (keys, values) pair [batch, heads, L, head_dim] per
layer, and wrapped in transformers' DynamicCache for each pass.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [batch, heads, L, head_dim]


def _to_cache(kv: KV | None) -> Any:
    from transformers.cache_utils import DynamicCache

    if kv is None:
        return DynamicCache()
    try:
        return DynamicCache(ddp_cache_data=kv)
    except TypeError:  # transformers before 4.56
        return DynamicCache.from_legacy_cache(tuple(kv))


def _from_cache(cache: Any) -> KV:
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers before 4.56


class Runner:
    """Calls the model the way this transformers version names its arguments."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def step(self, ids: torch.Tensor, mask: torch.Tensor, kv: KV | None) -> tuple[torch.Tensor, KV]:
        """Logits of each row's last position [batch, vocab] (float32), and the grown cache.

        ids [batch, n] (the new tokens), mask [batch, L + n] (the cache's columns, then the new ones).
        """
        pos = (mask.cumsum(-1) - 1).clamp_min(0)[:, -ids.shape[1]:]  # [batch, n]: real tokens before each
        cache = _to_cache(kv)
        kw: dict[str, Any] = {self.cache_kw: cache, "use_cache": True}
        if self.keep_kw:
            kw[self.keep_kw] = 1
        out = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                         position_ids=pos.to(self.device), **kw)
        return out.logits[:, -1].float(), _from_cache(cache)


@dataclass
class Batch:
    """The live rows' cache and mask; `rows` is any per-row list kept in step with them."""
    kv: KV | None = None
    mask: torch.Tensor | None = None  # [batch, L] long

    @property
    def size(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    def clear(self) -> None:
        self.kv, self.mask = None, None

    def join(self, kv: KV, mask: torch.Tensor) -> None:
        """Append rows (their cache and mask), left-padding whichever side is shorter."""
        if self.mask is None:
            self.kv, self.mask = kv, mask
            return
        assert self.kv is not None
        n = max(self.mask.shape[1], mask.shape[1])
        a_kv, a_mask = _pad_left(self.kv, self.mask, n)
        b_kv, b_mask = _pad_left(kv, mask, n)
        self.kv = [(torch.cat([ak, bk]), torch.cat([av, bv])) for (ak, av), (bk, bv) in zip(a_kv, b_kv)]
        self.mask = torch.cat([a_mask, b_mask])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order), then cut the columns no kept row uses."""
        if not rows:
            self.clear()
            return
        assert self.kv is not None and self.mask is not None
        idx = torch.tensor(rows, dtype=torch.long)
        mask = self.mask.index_select(0, idx)
        first = int((mask.sum(0) > 0).nonzero()[0, 0]) if bool(mask.any()) else mask.shape[1]
        dev = self.kv[0][0].device
        self.kv = [(k.index_select(0, idx.to(dev))[:, :, first:], v.index_select(0, idx.to(dev))[:, :, first:])
                   for k, v in self.kv]
        self.mask = mask[:, first:]


def _pad_left(kv: KV, mask: torch.Tensor, n: int) -> tuple[KV, torch.Tensor]:
    extra = n - mask.shape[1]
    if extra == 0:
        return kv, mask
    pad_mask = torch.zeros(mask.shape[0], extra, dtype=mask.dtype)
    out = []
    for k, v in kv:
        zk = torch.zeros(*k.shape[:2], extra, k.shape[3], dtype=k.dtype, device=k.device)
        zv = torch.zeros(*v.shape[:2], extra, v.shape[3], dtype=v.dtype, device=v.device)
        out.append((torch.cat([zk, k], 2), torch.cat([zv, v], 2)))
    return out, torch.cat([pad_mask, mask], 1)


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and mask [batch, longest] with each prompt at the right end."""
    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), n, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p):] = 1
    return ids, mask


def zero_padding(kv: KV, mask: torch.Tensor) -> KV:
    """Zero the cache where the mask is 0: a padded position's values never reach a real token
    (its attention weight is 0), but 0 × NaN would, so no garbage is kept there."""
    keep = mask.bool()[:, None, :, None]  # [batch, 1, L, 1]
    return [(k.masked_fill(~keep.to(k.device), 0), v.masked_fill(~keep.to(v.device), 0)) for k, v in kv]
