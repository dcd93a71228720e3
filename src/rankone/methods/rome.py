"""ROME's three steps, one function each: compute_key, compute_value, rank_one_update.

Notation (Meng et al. 2022; Gupta et al. 2024): W [out, in] is the MLP output projection of the
edited layer, k a key (its input at the subject's last token), C = E[k kᵀ] over ordinary text.
k̄ averages the key over the bare prompt and prefixed copies of it; k_o is the bare-prompt key.
The value optimisation finds δ such that adding δ to the projection's output at the subject makes
the model say the target; the desired output for key k is then v* = W k + δ.

    r-rome:  ΔW = (v̄* − W k̄) (C⁻¹k̄)ᵀ / (k̄ᵀ C⁻¹ k̄)          averaged key everywhere
    p-rome:  ΔW = (v*  − W k_o)(C⁻¹k_o)ᵀ / (k_oᵀ C⁻¹ k_o)     bare-prompt key everywhere
    rome:    ΔW = (v*  − W k_o)(C⁻¹k̄)ᵀ / (k̄ᵀ C⁻¹ k_o)       the original code's mix

Only `rome` mixes keys: its denominator can be tiny when k̄ and k_o disagree, which is what
produces the huge "disabling" updates r-ROME was made to avoid.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from rankone.core import architectures as arch
from rankone.core.hooks import add_at_positions, capture, frozen, map_output, replace_forward
from rankone.methods.hparams import EditHParams
from rankone.methods.stats import LayerStats
from rankone.core.tokens import EditRequest, encode_request, pad_batch


@dataclass
class KeyResult:
    keys: torch.Tensor  # [n_templates, in] float64, one key per context template
    k_mean: torch.Tensor  # [in] k̄
    k_bare: torch.Tensor  # [in] k_o (template "{}", always first)


@dataclass
class ValueResult:
    delta: torch.Tensor  # [out] float64: the shift of the projection output that writes the fact
    v_init: torch.Tensor  # [out] projection output at the bare prompt's subject token, before editing
    losses: list[float] = field(default_factory=list)
    clamped: bool = False
    target_prob: float = 0.0  # mean p(target) over prefixed prompts at the last step


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def compute_key(
    model: torch.nn.Module, tok: Any, request: EditRequest, layer: int, templates: list[str]
) -> KeyResult:
    """k̄ = mean over context templates of the projection input at the subject's last token."""
    if templates[0] != "{}":
        raise ValueError("the first context template must be the bare prompt '{}'")
    path = arch.proj_path(model, layer)
    encs = [encode_request(tok, request, t, with_target=False) for t in templates]
    ids, mask = pad_batch([e.ids for e in encs], _device(model))
    with capture(model, [path], outputs=False) as rec:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    x = rec.inputs[path].reshape(*ids.shape, -1)  # [n_templates, pos, in]
    rows = torch.arange(len(encs), device=x.device)
    keys = x[rows, torch.tensor([e.subject_last for e in encs], device=x.device)].double().cpu()
    return KeyResult(keys=keys, k_mean=keys.mean(0), k_bare=keys[0])


def compute_value(
    model: torch.nn.Module, tok: Any, request: EditRequest, layer: int, templates: list[str],
    hp: EditHParams,
) -> ValueResult:
    """Optimise δ (added to the projection output at the subject's last token of every prompt).

    loss = mean NLL of the target tokens over the prefixed prompts (teacher forced)
         + kl_factor · KL(current ‖ initial) of the next-token distribution at the subject's last
           token of the KL prompt ("{subject} is a"), which keeps the subject's other facts
         + v_weight_decay · ‖δ‖ / ‖v_init‖²,
    with δ clamped to clamp_norm_factor · ‖v_init‖ after every step (ROME's recipe).
    """
    proj = arch.get_module(model, arch.proj_path(model, layer))
    dev = _device(proj)
    rewrites = [encode_request(tok, request, t) for t in templates]
    kl_req = EditRequest(hp.kl_prompt, request.subject, request.target)
    kl = encode_request(tok, kl_req, with_target=False)
    encs = rewrites + [kl]
    ids, mask = pad_batch([e.ids for e in encs], _device(model))  # [n+1, pos]
    lookup = [e.subject_last for e in encs]
    n = len(rewrites)

    # Teacher forcing: the logit at position p-1 predicts the target token at p.
    tgt_rows = torch.tensor([i for i, e in enumerate(rewrites) for _ in e.target_positions])
    tgt_pos = torch.tensor([p for e in rewrites for p in e.target_positions])
    tgt_ids = torch.tensor([t for e in rewrites for t in e.target_ids])
    per_row = torch.tensor([len(e.target_positions) for e in rewrites], dtype=torch.float32)

    out_features = arch.in_out_features(proj)[1]
    delta = torch.zeros(out_features, device=dev, dtype=torch.float32, requires_grad=True)
    captured: dict[str, torch.Tensor] = {}

    def add_delta(h: torch.Tensor) -> torch.Tensor:  # h: [batch, pos, out] (or [batch·pos, out])
        h3 = h.reshape(*ids.shape, -1)
        if "v_init" not in captured:
            captured["v_init"] = h3[0, lookup[0]].detach().double().cpu()
        return add_at_positions(h3, delta.to(h.device), lookup).reshape(h.shape)

    skip = _skip_lower_layers(model, layer, ids, mask) if hp.fast_value and layer > 0 else None
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    init_kl_logp: torch.Tensor | None = None
    result = ValueResult(delta=torch.zeros(0), v_init=torch.zeros(0))
    with map_output(proj, add_delta), (skip if skip is not None else nullcontext()), frozen(model):
        for step in range(hp.v_steps):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
            logp = torch.log_softmax(logits, dim=-1)  # [n+1, pos, vocab]
            tok_logp = logp[tgt_rows, tgt_pos - 1, tgt_ids.to(logp.device)].cpu()  # [n_target_tokens]
            nll = -(torch.zeros(n).index_add(0, tgt_rows, tok_logp) / per_row).mean()
            kl_logp = logp[n, lookup[n]]  # [vocab]
            if init_kl_logp is None:
                init_kl_logp = kl_logp.detach().clone()
            kl_loss = torch.sum(kl_logp.exp() * (kl_logp - init_kl_logp)).cpu()
            v_norm = captured["v_init"].norm().float()
            wd = hp.v_weight_decay * delta.norm().cpu() / v_norm**2
            loss = nll + hp.kl_factor * kl_loss + wd
            result.losses.append(loss.item())
            result.target_prob = torch.exp(-nll).item()
            if result.losses[-1] < hp.early_stop_loss or step == hp.v_steps - 1:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            max_norm = hp.clamp_norm_factor * float(v_norm)
            with torch.no_grad():
                if float(delta.norm()) > max_norm:
                    delta.mul_(max_norm / float(delta.norm()))
                    result.clamped = True
    result.delta = delta.detach().double().cpu()
    result.v_init = captured["v_init"]
    return result


def _skip_lower_layers(model: torch.nn.Module, layer: int, ids: torch.Tensor, mask: torch.Tensor) -> Any:
    """A context in which layers 0..layer-1 replay their cached output instead of computing.

    δ only enters at `layer`, so everything below it is the same on every optimisation step:
    one forward pass caches layer-1's output, and each step then runs `layer` and above only.
    The result equals a full forward pass exactly (same modules, masks and positions above).
    """
    from contextlib import ExitStack

    spec = arch.spec_for(model)
    below = arch.get_module(model, spec.layer_path(layer - 1))
    cache: dict[str, Any] = {}

    def keep(mod: torch.nn.Module, args: tuple, output: Any) -> None:
        cache["out"] = output

    with torch.no_grad():
        h = below.register_forward_hook(keep)
        try:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            h.remove()
    stack = ExitStack()
    for j in range(layer):
        stack.enter_context(
            replace_forward(arch.get_module(model, spec.layer_path(j)), lambda *a, **k: cache["out"])
        )
    return stack


@dataclass
class Update:
    u: torch.Tensor  # [out] float64
    v: torch.Tensor  # [in] float64; ΔW = u vᵀ
    v_star: torch.Tensor  # [out] the desired output W′k for the key the method writes
    key: torch.Tensor  # [in] the key used in the residual
    diagnostics: dict[str, float]


def rank_one_update(
    w: torch.Tensor, key: KeyResult, value: ValueResult, stats: LayerStats, method: str
) -> Update:
    """The closed-form update of the method, in float64 on a cached Cholesky factor of C."""
    W = w.detach().to("cpu", torch.float64)  # [out, in]
    k_bar, k_o = key.k_mean, key.k_bare
    cinv_kbar, cinv_ko = stats.solve(k_bar), stats.solve(k_o)  # [in]
    if method == "r-rome":
        k_res, direction, denom = k_bar, cinv_kbar, float(k_bar @ cinv_kbar)
    elif method == "p-rome":
        k_res, direction, denom = k_o, cinv_ko, float(k_o @ cinv_ko)
    elif method == "rome":
        k_res, direction, denom = k_o, cinv_kbar, float(k_o @ cinv_kbar)
    else:
        raise ValueError(method)
    v_star = W @ k_res + value.delta  # desired projection output for k_res (bias cancels)
    residual = v_star - W @ k_res  # [out]
    u, v = residual, direction / denom
    diag = {
        "denominator": denom,
        "denom_mean_mean": float(k_bar @ cinv_kbar),
        "denom_bare_bare": float(k_o @ cinv_ko),
        "denom_bare_mean": float(k_o @ cinv_kbar),
        "key_cosine": float(torch.nn.functional.cosine_similarity(k_bar, k_o, dim=0)),
        "delta_norm": float(value.delta.norm()),
        "v_init_norm": float(value.v_init.norm()),
        "delta_fro": float(u.norm() * v.norm()),
        "weight_fro": float(W.norm()),
    }
    return Update(u=u, v=v, v_star=v_star, key=k_res, diagnostics=diag)
