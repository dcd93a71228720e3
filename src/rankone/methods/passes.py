"""How the value loop runs the model: only what changes with δ, and only the logits the loss reads.

δ is added to the edited projection's output at the subject's last token of each prompt, so within
one edit (1) nothing below the edited layer changes from step to step, (2) no position before the
subject's last token changes (the model is causal), and (3) the loss reads logits at a few
positions only (the tokens before each target token, and one KL position). `ValuePasses` runs,
once and without a graph, each prompt's prefix (everything before the subject's last token) into a
KV cache and the rest (the suffix) up to the edited layer; each step then runs the suffixes from
the edited layer up against a copy of that cache, stops at the LM head, and applies the head (after
the model's own final norm) at the positions read. Each shortcut is checked once against a plain
forward pass at δ = 0 and dropped when the model does not reproduce it: suffix → replay of the
layers below on full prompts → full passes; full-vocabulary logits at every position when the head
alone does not give the model's logits.
"""

from __future__ import annotations

import copy
import inspect
import logging
from contextlib import ExitStack
from typing import Any

import torch

from rankone.core.hooks import capture, replace_forward, stop_at
from rankone.core.tokens import kv_cache_kwargs, kv_cache_of, pad_batch
from rankone.models.handle import ModelHandle

log = logging.getLogger(__name__)


def lm_head_logits(model: torch.nn.Module, head: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The model's logits from the LM head's input h [..., d_model] (after the final norm): the
    head, then the soft-capping some models apply after it (Gemma 2)."""
    logits = head(h)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def few_logits(model: torch.nn.Module) -> dict[str, Any]:
    """The keyword that makes the model apply its LM head at the last position only, where its
    forward has one (transformers' `logits_to_keep`, earlier `num_logits_to_keep`); else none."""
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    tol = 1e-3 if want.dtype == torch.float32 or want.dtype == torch.float64 else 3e-2
    got, want = got.float(), want.float()
    return got.shape == want.shape and bool(torch.isfinite(got).all()) and \
        float((got - want).abs().max()) <= tol * float(want.abs().max()) + 1e-6


class ValuePasses:
    """One edit's prompts, run for the value loop. Use as a context manager (it may replace the
    forward of the layers below the edited one with a replay of their cached output) and call
    `logits()` once per step, with δ added at `delta_pos` of a [rows, positions] = `shape` pass."""

    def __init__(
        self, handle: ModelHandle, layer: int, seqs: list[list[int]], split: list[int],
        read_rows: list[int], read_pos: list[int], fast: bool = True, gather: bool = True,
    ) -> None:
        model = handle.model
        self.handle, self.model, self.layer = handle, model, layer
        self.dev = handle.device
        last = {r: max(p for q, p in zip(read_rows, read_pos) if q == r) for r in set(read_rows)}
        seqs = [s[: max(last.get(i, len(s) - 1), c) + 1] for i, (s, c) in enumerate(zip(seqs, split))]  # nothing after the last read
        self.ids, self.mask = pad_batch(seqs, self.dev)  # [rows, pos]
        self.rows = torch.tensor(read_rows, device=self.dev)
        self.pos = torch.tensor(read_pos, device=self.dev)  # in the prompts' own coordinates
        self.head = model.get_output_embeddings()
        self.mode, self.shape, self.delta_pos = "full", tuple(self.ids.shape), list(split)
        self.gathered = False
        self._below: Any = None  # the replayed output of layer-1, when layers below are replayed
        self._stack = ExitStack()
        path = next((n for n, m in model.named_modules() if m is self.head), None) if self.head is not None else None
        if path is None:
            return
        # A plain pass over a few prompts (the bare one, the KL one, any whose prefix is empty)
        # is what the shortcuts must reproduce.
        check = sorted({0, len(seqs) - 1} | {i for i, c in enumerate(split) if c == 0})
        ids, mask = pad_batch([seqs[i] for i in check], self.dev)
        with torch.no_grad(), capture(model, [path], outputs=False) as rec:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            h = rec.inputs[path]  # [n_check, pos, d_model]
            self.gathered = gather and _close(lm_head_logits(model, self.head, h), logits)
        if gather and not self.gathered:
            log.info("the LM head alone does not reproduce %s's logits; the value loop computes them all", type(model).__name__)
        if not fast:
            return
        sel = [j for j, r in enumerate(read_rows) if r in check]
        want = h[torch.tensor([check.index(read_rows[j]) for j in sel]), torch.tensor([read_pos[j] for j in sel])]
        below = handle.block(layer - 1) if layer > 0 else None
        try:
            if self._prepare_suffix(seqs, split, below, sel, want):
                return
        except (TypeError, ValueError, RuntimeError, AttributeError, NotImplementedError) as e:
            log.info("the value loop cannot cache prompt prefixes for %s (%s)", type(model).__name__, e)
        if below is not None:  # replay the layers below on whole prompts
            kept: dict[str, Any] = {}
            with torch.no_grad(), self._keep_output(below, kept), stop_at(below):
                model(input_ids=self.ids, attention_mask=self.mask, use_cache=False)
            self.mode, self._below = "replay", kept["out"]

    # -- set-up --

    @staticmethod
    def _keep_output(module: torch.nn.Module | None, into: dict[str, Any]) -> Any:
        if module is None:
            return ExitStack()
        h = module.register_forward_hook(lambda mod, args, out: into.__setitem__("out", out))
        stack = ExitStack()
        stack.callback(h.remove)
        return stack

    @torch.no_grad()
    def _prepare_suffix(self, seqs: list[list[int]], split: list[int], below: Any, sel: list[int], want: torch.Tensor) -> bool:
        """Cache every prompt's prefix (positions before `split`), keep the suffix's input to the
        edited layer, and check the suffix pass against the plain pass (`want`, at reads `sel`)."""
        P, S = max(split), max(len(s) - c for s, c in zip(seqs, split))
        pre_ids, pre_mask = pad_batch([s[:c] or [0] for s, c in zip(seqs, split)], self.dev)  # [rows, P]
        if P == 0 or pre_ids.shape[1] != P:
            return False
        # An empty prefix gets a dummy token (no attention row may be all masked); the suffix
        # attends only to the real prefix tokens.
        real = torch.zeros_like(pre_mask)
        for i, c in enumerate(split):
            real[i, :c] = 1
        suf_ids, suf_mask = pad_batch([s[c:] for s, c in zip(seqs, split)], self.dev)  # [rows, S]
        # Only the KV cache is wanted: the head runs at one position, not at every prefix position
        # (22 rows of ~20 tokens through a 49k-token vocabulary cost as much as 4 value steps).
        self.cache = kv_cache_of(self.model(input_ids=pre_ids, attention_mask=pre_mask, use_cache=True, **few_logits(self.model)))
        self.suffix = {"input_ids": suf_ids, "attention_mask": torch.cat([real, suf_mask], dim=1),
                       "position_ids": torch.tensor(split, device=self.dev)[:, None] + torch.arange(S, device=self.dev)}
        kept: dict[str, Any] = {}
        with self._keep_output(below, kept), stop_at(self.head, before=True) as st:
            self.model(use_cache=True, **self.suffix, **kv_cache_kwargs(self.model, copy.deepcopy(self.cache)))
        local = self.pos - torch.tensor(split, device=self.dev)[self.rows]  # read positions in the suffix
        idx = torch.tensor(sel, device=self.dev)
        if not st.reached or bool((local < 0).any()) or not _close(st.input[self.rows[idx], local[idx]], want):
            log.info("prefix caching does not reproduce %s's forward pass; the value loop runs whole prompts", type(self.model).__name__)
            return False
        self.mode, self.shape, self.delta_pos, self.pos = "suffix", (len(seqs), S), [0] * len(seqs), local
        self._below = kept.get("out")
        return True

    # -- per step --

    def __enter__(self) -> "ValuePasses":
        if self._below is not None:
            for j in range(self.layer):
                self._stack.enter_context(replace_forward(self.handle.block(j), lambda *a, **k: self._below))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def logits(self) -> torch.Tensor:
        """[n_read, vocab]: the logits the loss reads, for the current δ (with its graph)."""
        if self.mode == "suffix":
            kw = dict(self.suffix, use_cache=True, **kv_cache_kwargs(self.model, copy.deepcopy(self.cache)))
        else:
            kw = {"input_ids": self.ids, "attention_mask": self.mask, "use_cache": False}
        if not self.gathered:
            return self.model(**kw).logits[self.rows, self.pos]
        with stop_at(self.head, before=True, detach=False) as st:
            self.model(**kw)
        return lm_head_logits(self.model, self.head, st.input[self.rows, self.pos])  # input: [rows, pos, d_model]
