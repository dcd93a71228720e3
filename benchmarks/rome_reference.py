"""ROME's reference recipe, re-implemented for a side-by-side benchmark (never used by the library).

As the authors' code does it (rome/compute_v.py and repr_tools, kept by r-ROME's fork): every
forward pass runs the whole model, all layers and the LM head at every position of every prompt;
the value loop takes up to 20 Adam steps on the full-vocabulary log-softmax and stops early only
when the *regularised* loss drops below 0.05; after the loop one more pass reads the bare
prompt's key and output at the edited layer. The closed form is rankone's `rank_one_update` (the
same float64 algebra), so the two sides differ only in what they compute to get there.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from rankone.core import architectures as arch
from rankone.core.hooks import add_at_positions, capture, frozen, map_output
from rankone.core.tokens import EditRequest, encode_request, pad_batch
from rankone.methods.rome import VARIANTS, EditHParams, KeyResult, Update, ValueResult, rank_one_update
from rankone.methods.stats import LayerStats
from rankone.models.handle import ModelHandle

EARLY_STOP_LOSS = 0.05  # ROME's compute_v: `if loss < 5e-2: break`


def _dev(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def reference_key(handle: ModelHandle, request: EditRequest, layer: int, templates: list[str]) -> KeyResult:
    """k̄ and k_o from a full forward pass over the templates (all layers, all logits)."""
    model, tok, path = handle.model, handle.tokenizer, handle.proj_path(layer)
    encs = [encode_request(tok, request, t, with_target=False) for t in templates]
    ids, mask = pad_batch([e.ids for e in encs], _dev(model))
    with capture(model, [path], outputs=False) as rec:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    x = rec.inputs[path].reshape(*ids.shape, -1)  # [n_templates, pos, in]
    keys = x[torch.arange(len(encs)), torch.tensor([e.subject_last for e in encs])].double().cpu()
    return KeyResult(keys=keys, k_mean=keys.mean(0), k_bare=keys[0])


def reference_value(
    handle: ModelHandle, request: EditRequest, layer: int, templates: list[str], hp: EditHParams,
) -> ValueResult:
    """δ as ROME's compute_v finds it: full passes, full logits, the regularised-loss early stop."""
    model, tok, proj = handle.model, handle.tokenizer, handle.proj(layer)
    dev = _dev(model)
    rewrites = [encode_request(tok, request, t) for t in templates]
    kl = encode_request(tok, EditRequest(hp.kl_prompt, request.subject, request.target), with_target=False)
    encs = rewrites + [kl]
    ids, mask = pad_batch([e.ids for e in encs], dev)  # [n+1, pos]
    lookup = [e.subject_last for e in encs]
    n = len(rewrites)
    tgt_rows = torch.tensor([i for i, e in enumerate(rewrites) for _ in e.target_positions])
    tgt_pos = torch.tensor([p for e in rewrites for p in e.target_positions])
    tgt_ids = torch.tensor([t for e in rewrites for t in e.target_ids])
    per_row = torch.tensor([len(e.target_positions) for e in rewrites], dtype=torch.float32)
    delta = torch.zeros(arch.in_out_features(proj)[1], device=dev, dtype=torch.float32, requires_grad=True)
    seen: dict[str, torch.Tensor] = {}

    def add_delta(h: torch.Tensor) -> torch.Tensor:
        h3 = h.reshape(*ids.shape, -1)
        if "init" not in seen:
            seen["init"] = h3[0, lookup[0]].detach().double().cpu()  # ROME's target_init
        return add_at_positions(h3, delta.to(h.device), lookup).reshape(h.shape)

    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    res = ValueResult(delta=torch.zeros(0), current_value=torch.zeros(0), gathered=False)
    init_kl: torch.Tensor | None = None
    with map_output(proj, add_delta), frozen(model):
        for step in range(hp.v_steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            logp = torch.log_softmax(logits, dim=-1)  # [n+1, pos, vocab]
            tok_logp = logp[tgt_rows, tgt_pos - 1, tgt_ids.to(logp.device)].cpu()
            nll = -(torch.zeros(n).index_add(0, tgt_rows, tok_logp) / per_row).mean()
            kl_logp = logp[n, lookup[n]]
            if init_kl is None:
                init_kl = kl_logp.detach().clone()
            kl_loss = torch.sum(kl_logp.exp() * (kl_logp - init_kl)).cpu()
            norm = seen["init"].norm().float()
            loss = nll + hp.kl_factor * kl_loss + hp.v_weight_decay * delta.norm().cpu() / norm**2
            res.losses.append(loss.item())
            res.target_probs.append(float(torch.exp(-nll.detach())))
            if loss.item() < EARLY_STOP_LOSS:
                res.stopped_early = True
                break
            if step == hp.v_steps - 1:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                max_norm = hp.clamp_norm_factor * float(norm)
                if float(delta.norm()) > max_norm:
                    delta.mul_(max_norm / float(delta.norm()))
                    res.clamped = True
    # ROME then reads the bare prompt's key and output at the edited layer in one more full pass
    with torch.no_grad(), capture(model, [handle.proj_path(layer)]):
        model(input_ids=ids[:1, : len(encs[0].ids)], use_cache=False)
    res.target_prob = res.target_probs[-1]
    res.delta = delta.detach().double().cpu()
    res.current_value = seen["init"]
    return res


def reference_edit(
    handle: ModelHandle, request: EditRequest, layer: int, templates: list[str],
    stats: LayerStats, hp: EditHParams,
) -> tuple[Update, dict[str, float], ValueResult]:
    """The update and the seconds spent on key, value and solve."""
    t0 = time.perf_counter()
    key = reference_key(handle, request, layer, templates)
    t1 = time.perf_counter()
    value = reference_value(handle, request, layer, templates, hp)
    t2 = time.perf_counter()
    w = arch.weight_oi(handle.proj(layer))
    upd = rank_one_update(w, key, value, stats, VARIANTS[hp.method])
    t3 = time.perf_counter()
    return upd, {"key_s": t1 - t0, "value_s": t2 - t1, "solve_s": t3 - t2}, value
