"""The published ROME recipe, re-implemented step for step for a side-by-side benchmark (never used
by the library; written from the authors' description and code, kmeng01/rome: rome_main.py and the
compute_u, compute_v, repr_tools and layer_stats it calls, with their ROME hparams).

What one edit does there, and here in the same order, with the same work:

1. Once per process, not per edit: the context templates ("{}" and 20 sampled "<text>. {}";
   `get_context_templates` caches them) and C⁻¹, the float32 inverse of the key statistics
   (`get_inv_cov` caches it per layer). `inverse_cov` is that inverse; the caller keeps it.
2. The left vector (compute_u): one forward pass of the whole model (every layer, the LM head at
   every position, the KV cache the model builds by default) over the prompt in every template,
   reading the projection's input at the subject's last token; k̄ their mean, u = C⁻¹k̄ / ‖C⁻¹k̄‖.
3. The right vector (compute_v): the rewriting prompts are "template(prompt) + the target without
   its last token" (the target gets a leading space), one KL prompt "{subject} is a"; right-padded,
   the target labels on each row's last len(target) positions. δ (float32, zero) is added in place,
   row by row, to the MLP module's output at each row's subject token. Each of up to v_steps
   iterations runs the whole model on every row (the LM head at every position), takes the
   log-softmax over the full [rows, positions, vocabulary] logits, the mean per-row NLL of the
   target, kl_factor · KL(current ‖ first) at the KL prompt's subject token (batch mean),
   v_weight_decay · ‖δ‖ / ‖v₀‖² (v₀ = the MLP output at the first row's subject token, recorded in
   the first pass), stops when that *regularised* loss is below 0.05 or at the last iteration
   (before its backward), else backpropagates, takes an Adam step and clamps ‖δ‖ to
   clamp_norm_factor · ‖v₀‖. Then one more forward pass of the bare prompt reads the projection's
   input k_o and output W k_o at the subject, and the right vector is (v₀ + δ − W k_o) / (k_o · u).
4. ΔW = right ⊗ u, added to W (float32).

Positions are found by character offsets (rankone.core.tokens) on the same strings the published
code tokenizes, where it counts tokens of the prompt's pieces separately; they agree wherever a
subject falls on token boundaries (the benchmark's cases are those that do). Printing and the
weight copy-and-restore around the update (milliseconds) are left out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rankone.core import architectures as arch
from rankone.core.hooks import capture, frozen, map_output
from rankone.core.tokens import EditRequest, encode, pad_batch, token_span
from rankone.methods.rome import EditHParams
from rankone.methods.stats import LayerStats
from rankone.models.handle import ModelHandle

EARLY_STOP_LOSS = 0.05  # compute_v stops when the regularised loss falls below it


@dataclass
class ReferenceTrace:
    losses: list[float] = field(default_factory=list)  # regularised loss at each forward pass
    target_probs: list[float] = field(default_factory=list)  # exp(−mean NLL) at each forward pass
    stopped_early: bool = False  # the loss fell below EARLY_STOP_LOSS before the last iteration
    clamped: bool = False

    @property
    def target_prob(self) -> float:
        return self.target_probs[-1]


def inverse_cov(stats: LayerStats) -> torch.Tensor:
    """C⁻¹ [in, in] as the published code makes it once per layer: float32 statistics, inverted."""
    return torch.inverse(stats.mom2.float()).float()


def _dev(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _subject_last(tok: Any, text: str, s0: int, s1: int) -> tuple[list[int], int]:
    ids, offsets = encode(tok, text)
    return ids, token_span(tok, text, s0, s1, offsets)[1]


@torch.no_grad()
def left_vector(handle: ModelHandle, request: EditRequest, layer: int, templates: list[str],
                inv_cov: torch.Tensor) -> torch.Tensor:
    """u [in] = C⁻¹k̄ / ‖C⁻¹k̄‖ from one whole-model pass over the templated prompts."""
    model, tok, path = handle.model, handle.tokenizer, handle.proj_path(layer)
    encs = [_subject_last(tok, *request.text(t)) for t in templates]
    ids, mask = pad_batch([e[0] for e in encs], _dev(model))  # [n_templates, pos]
    with capture(model, [path], outputs=False) as rec:
        model(input_ids=ids, attention_mask=mask)  # all layers, all logits, the default KV cache
    x = rec.inputs[path].reshape(*ids.shape, -1)  # [n_templates, pos, in]
    k_bar = x[torch.arange(len(encs)), torch.tensor([e[1] for e in encs])].mean(0)
    u = inv_cov.to(k_bar.device) @ k_bar
    return u / u.norm()


def right_vector(
    handle: ModelHandle, request: EditRequest, layer: int, templates: list[str],
    u: torch.Tensor, hp: EditHParams,
) -> tuple[torch.Tensor, ReferenceTrace]:
    """The right vector [out] and the optimisation's trace (compute_v)."""
    model, tok = handle.model, handle.tokenizer
    dev = _dev(model)
    target = request.target if request.target.startswith(" ") else " " + request.target
    target_ids = encode(tok, target)[0]
    head = tok.decode(target_ids[:-1])  # the target's tokens but the last, as text
    rows = []  # (ids, subject's last token) per prompt: the rewriting prompts, then the KL prompt
    for t in templates:
        text, s0, s1 = request.text(t)
        rows.append(_subject_last(tok, text + head, s0, s1))
    kl_text, s0, s1 = EditRequest(hp.kl_prompt, request.subject, request.target).text()
    rows.append(_subject_last(tok, kl_text, s0, s1))
    n = len(templates)
    ids, mask = pad_batch([r[0] for r in rows], dev)  # [n + 1, pos], right-padded
    lookup = [r[1] for r in rows]
    labels = torch.full((n, ids.shape[1]), -100, dtype=torch.long, device=dev)  # [n, pos]
    for i in range(n):
        end = len(rows[i][0])
        labels[i, end - len(target_ids): end] = torch.tensor(target_ids, device=dev)
    valid = labels != -100
    picked_ids = torch.where(valid, labels, 0)[:, :, None]  # [n, pos, 1]

    mlp = arch.get_module(model, handle.spec.mlp.format(layer))
    delta = torch.zeros(arch.in_out_features(handle.proj(layer))[1],
                        device=dev, requires_grad=True)
    state: dict[str, torch.Tensor] = {}

    def edit_output(out: torch.Tensor) -> torch.Tensor:  # out: [n + 1, pos, out]
        if "v0" not in state:
            state["v0"] = out[0, lookup[0]].detach().clone()
        for i, idx in enumerate(lookup):
            out[i, idx, :] += delta
        return out

    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    trace = ReferenceTrace()
    kl_init: torch.Tensor | None = None
    with map_output(mlp, edit_output), frozen(model):
        for it in range(hp.v_steps):
            opt.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits  # [n + 1, pos, vocab]
            kl_logp = torch.log_softmax(logits[n:, lookup[n]], dim=1)  # [1, vocab]
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            logp = torch.log_softmax(logits, dim=2)
            picked = torch.gather(logp[:n], 2, picked_ids)[:, :, 0]  # [n, pos]
            nll_each = -(picked * valid.float()).sum(1) / len(target_ids)
            nll = nll_each.mean()
            kl = hp.kl_factor * torch.nn.functional.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
            wd = hp.v_weight_decay * (delta.norm() / state["v0"].norm() ** 2)
            loss = nll + kl + wd
            trace.losses.append(loss.item())
            trace.target_probs.append(float(torch.exp(-nll.detach())))
            if loss.item() < EARLY_STOP_LOSS:
                trace.stopped_early = it < hp.v_steps - 1
                break
            if it == hp.v_steps - 1:
                break
            loss.backward()
            opt.step()
            max_norm = hp.clamp_norm_factor * state["v0"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
                trace.clamped = True
    v_star = state["v0"] + delta.detach()
    # The bare prompt's key and current output at the edited projection, one more whole-model pass.
    path = handle.proj_path(layer)
    bare, bare_last = _subject_last(tok, *request.text())
    with torch.no_grad(), capture(model, [path]) as rec:
        model(input_ids=torch.tensor([bare], device=dev), attention_mask=torch.ones(1, len(bare), dtype=torch.long, device=dev))
    k_o = rec.inputs[path].reshape(len(bare), -1)[bare_last]
    w_k_o = rec.outputs[path].reshape(len(bare), -1)[bare_last]
    return (v_star - w_k_o) / torch.dot(k_o, u), trace


def reference_edit(
    handle: ModelHandle, request: EditRequest, layer: int, templates: list[str],
    inv_cov: torch.Tensor, hp: EditHParams,
) -> tuple[torch.Tensor, dict[str, float], ReferenceTrace]:
    """ΔW [out, in] (float32, not yet added), the seconds of each step, and the value loop's trace."""
    t0 = time.perf_counter()
    u = left_vector(handle, request, layer, templates, inv_cov)
    t1 = time.perf_counter()
    v, trace = right_vector(handle, request, layer, templates, u, hp)
    t2 = time.perf_counter()
    upd = torch.outer(v, u)  # [out, in]
    t3 = time.perf_counter()
    return upd, {"key_s": t1 - t0, "value_s": t2 - t1, "solve_s": t3 - t2}, trace
