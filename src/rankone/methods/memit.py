"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): a batch of n facts written
over a window of layers at once, one function per step.

Notation: the edited layers ℒ = [l_0 < … < l_{m−1}] end at the critical layer L = l_{m−1};
W_l [out, in] is layer l's MLP output projection; h_i [d] the residual stream (block L's output)
at fact i's subject last token in the bare prompt; C_l = E[k kᵀ] over ordinary text (stats.py).

 (1) target    z_i = h_i + δ_i, with δ_i minimising (δ added to block L's output at the subject)
                 mean_j −log p(o_i | x_j ⊕ p_i(s_i))  +  kl_factor · KL(p(·|"s_i is a") ‖ p₀(·|"s_i is a"))
                 + v_weight_decay · ‖δ_i‖ / ‖h_i‖²,  ‖δ_i‖ ≤ clamp_norm_factor · ‖h_i‖ after each step
               (x_j the context templates)                                       `compute_targets`
 (2) keys      K_l = [k̄_1 … k̄_n] [in, n], k̄_i the mean over templates of W_l's input at the
               subject's last token (rome.compute_key's k̄, for all facts at once)   `read_keys`
 (3) residual  R_l = (Z − H) / (m − t) for l = l_t, with H [d, n] measured on the model with the
               updates of l_0 … l_{t−1} in place: each layer writes its share of what is left
                                                                                    `spread_residual`
 (4) update    ΔW_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹, the minimiser of
               ‖ΔW K_l − R_l‖² + λ · tr(ΔW C_l ΔWᵀ), i.e. ΔW_l (λ C_l + K_l K_lᵀ) = R_l K_lᵀ.
               Solved in float64 on C's cached Cholesky factor (Woodbury, only an n × n solve
               is new): (λC + KKᵀ)⁻¹K = C⁻¹K (λI + KᵀC⁻¹K)⁻¹, so ΔW = B A with
               B = R [out, n] and A = (C⁻¹K (λI + KᵀC⁻¹K)⁻¹)ᵀ [n, in]             `memit_update`

Defaults are the paper's GPT-J settings (layers 3–8 ending at the critical layer, λ = 15000,
clamp 0.75, 25 steps at lr 0.5, KL 0.0625, decay 0.5, templates "{}" + 5 of 10 tokens), adapted:
the window is about a sixth of the depth, at most 5 layers, ending at the model's edit layer;
λ scales with the key dimension so that a typical key keeps GPT-J's weight: E[kᵀ(λC)⁻¹k] =
d_in/λ, hence λ = 15000 · d_in / 16384 (GPT-J's d_in). `MemitHParams.resolve` records both.

The residual stream is assumed to receive the projection's output unchanged (true for GPT-2,
GPT-J, Llama, …); a model that normalises the MLP output before adding it (Gemma 3's
post_feedforward_layernorm) gets the update written in pre-norm units.
"""

from __future__ import annotations

import functools
import math
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.hooks import capture, frozen, map_output
from rankone.core.tokens import EditRequest, encode_request, pad_batch
from rankone.methods.base import Computed, EditInputs, LayerUpdate, Method, Solver
from rankone.methods.passes import ValuePasses
from rankone.methods.settings import MethodSettings, check_value_loop
from rankone.methods.stats import LayerStats
from rankone.models.handle import ModelHandle

GPTJ_LAMBDA, GPTJ_D_IN = 15000.0, 16384  # MEMIT's mom2_update_weight for GPT-J and its key size


@dataclass(frozen=True)
class MemitHParams(MethodSettings):
    """MEMIT's settings (the paper's GPT-J ones, adapted per model by `resolve`). The window
    settings and the target optimisation are shared by every method that spreads a batch over a
    window of layers (AlphaEdit, EMMET: their settings derive from these)."""

    method: str = "memit"
    layers: list[int] | None = None  # the window itself; None: `window` layers ending at `layer`
    window: int | None = None  # None: round(n_layers / 6), within 1..5
    mom2_update_weight: float | None = None  # λ; None: 15000 · d_in / 16384
    # target optimisation (MEMIT's GPT-J settings)
    v_steps: int = 25
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    early_stop_loss: float = 0.05
    kl_prompt: str = "{} is a"
    fast_value: bool = True  # replay the cached hidden states up to the critical layer
    prefix_spec: list[list[int]] = field(default_factory=lambda: [[10, 5]])
    batch_rows: int = 256  # prompts per forward pass: reading keys, and the targets' groups of facts (memory)

    def check(self) -> None:
        super().check()
        check_value_loop(self)
        if self.layers is not None:
            if not self.layers or any(b <= a for a, b in zip(self.layers, self.layers[1:])):
                raise RankoneError(f"layers {self.layers} must be a non-empty increasing list, e.g. [3, 4, 5, 6, 7]")
            if self.layer is not None and self.layer != self.layers[-1]:
                raise RankoneError(f"layer {self.layer} must be the last of layers {self.layers} (the critical layer)")
        if self.window is not None and int(self.window) < 1:
            raise RankoneError(f"window must be at least 1, got {self.window}")
        lam = self.mom2_update_weight
        if lam is not None and not (math.isfinite(lam) and lam > 0):
            raise RankoneError(f"mom2_update_weight must be a positive finite number, got {lam}")
        if not self.early_stop_loss >= 0:
            raise RankoneError(f"early_stop_loss must be 0 or more (a weight of a loss term), got {self.early_stop_loss}")
        if int(self.batch_rows) < 1:
            raise RankoneError(f"batch_rows must be at least 1, got {self.batch_rows}")

    @classmethod
    def merge(cls, card: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
        """As MethodSettings.merge; a window the user gives fixes the critical layer (over the card's)."""
        merged = super().merge(card, user)
        if user.get("layers") and user.get("layer") is None:
            merged["layer"] = user["layers"][-1]
        return merged

    def resolve(self, handle: ModelHandle) -> "MemitHParams":
        """The window and λ made concrete for the model (what gets recorded)."""
        if self.layers is not None:
            layers = [handle.check_layer(int(l)) for l in self.layers]
        else:
            last = handle.check_layer(handle.default_layer() if self.layer is None else int(self.layer))
            size = int(self.window) if self.window is not None else self.default_window(handle.n_layers)
            layers = list(range(max(0, last - size + 1), last + 1))
        d_in = arch.in_out_features(handle.proj(layers[-1]))[0]
        lam = self.mom2_update_weight if self.mom2_update_weight is not None else GPTJ_LAMBDA * d_in / GPTJ_D_IN
        return self.replace(layers=layers, layer=layers[-1], window=len(layers), mom2_update_weight=float(lam))

    @staticmethod
    def default_window(n_layers: int) -> int:
        return min(5, max(1, round(n_layers / 6)))


# ---- (1) targets ------------------------------------------------------------------------------


@dataclass
class Targets:
    z: torch.Tensor  # [n, d] float64: the hidden state each fact should have at the critical layer
    h_init: torch.Tensor  # [n, d] float64: that hidden state before editing
    losses: list[list[float]]  # per fact, one per forward pass until it stopped
    clamped: list[bool]
    target_prob: list[float]  # per fact: exp(−mean NLL) over the templates at its last step


def facts_per_group(hp: MemitHParams, n_templates: int) -> int:
    """How many facts `compute_targets` optimises in one pass: a fact's rows are its templates and
    its KL prompt, and a pass holds at most batch_rows of them."""
    return max(1, hp.batch_rows // (n_templates + 1))


def compute_targets(
    handle: ModelHandle, requests: Sequence[EditRequest], layer: int, templates: list[str], hp: MemitHParams,
) -> Targets:
    """Step (1), the facts in groups of ⌊batch_rows / (templates + 1)⌋, each group in one batched
    forward and backward per step.

    Each fact has its own δ_i; the summed loss has the per-fact losses' gradients, and Adam is
    element-wise, so every fact follows the trajectory it would follow alone, whatever its group
    (the groups bound memory: the graph of a step grows with its rows). A fact whose loss falls
    under early_stop_loss is frozen from then on (its δ is restored after each step).
    """
    if templates[0] != "{}":
        raise ValueError("the first context template must be the bare prompt '{}'")
    per_group = facts_per_group(hp, len(templates))
    groups = [_group_targets(handle, requests[i:i + per_group], layer, templates, hp)
              for i in range(0, len(requests), per_group)]
    if len(groups) == 1:
        return groups[0]
    return Targets(z=torch.cat([g.z for g in groups]), h_init=torch.cat([g.h_init for g in groups]),
                   losses=[x for g in groups for x in g.losses], clamped=[x for g in groups for x in g.clamped],
                   target_prob=[x for g in groups for x in g.target_prob])


def _group_targets(
    handle: ModelHandle, requests: Sequence[EditRequest], layer: int, templates: list[str], hp: MemitHParams,
) -> Targets:
    """`compute_targets` for one group of facts, all in each step's forward and backward."""
    model, tok = handle.model, handle.tokenizer
    block = handle.block(layer)
    dev = handle.device
    n, T = len(requests), len(templates)
    rewrites = [encode_request(tok, r, t) for r in requests for t in templates]  # row i·T + j
    kls = [encode_request(tok, EditRequest(hp.kl_prompt, r.subject, r.target), with_target=False) for r in requests]
    encs = rewrites + kls
    fact_of_row = torch.tensor([i for i in range(n) for _ in range(T)] + list(range(n)), device=dev)

    # Teacher forcing: the logit at position p−1 predicts the target token at p; then each fact's
    # KL prompt at its subject. How the passes run (cached prefixes, the layers below replayed, the
    # head only at these reads) is rome's `ValuePasses`, for every fact's rows at once.
    t_rows = torch.tensor([r for r, e in enumerate(rewrites) for _ in e.target_positions])
    t_pos = [p - 1 for e in rewrites for p in e.target_positions]
    t_ids = torch.tensor([t for e in rewrites for t in e.target_ids])
    per_row = torch.tensor([len(e.target_positions) for e in rewrites], dtype=torch.float32)
    n_t = len(t_rows)
    passes = ValuePasses(handle, layer, [e.ids for e in encs], [e.subject_last for e in encs],
                         t_rows.tolist() + list(range(n * T, n * T + n)), t_pos + [e.subject_last for e in kls],
                         fast=hp.fast_value)
    delta_pos = torch.as_tensor(passes.delta_pos, device=dev)  # [rows]: each row's subject in the pass
    at_subject = torch.zeros(passes.shape, device=dev)  # [rows, pos] of the pass, 1 where δ enters
    at_subject[torch.arange(len(encs), device=dev), delta_pos] = 1.0

    captured: dict[str, torch.Tensor] = {}
    bare_rows = torch.arange(0, n * T, T, device=dev)

    def add_delta(h: torch.Tensor) -> torch.Tensor:  # h: [rows, pos, d]
        h3 = h.reshape(*passes.shape, -1)
        if "h_init" not in captured:
            captured["h_init"] = h3[bare_rows, delta_pos[bare_rows]].detach().float()  # [n, d]
        rows_delta = delta.to(h.dtype)[fact_of_row]  # [rows, d]
        return (h3 + at_subject[:, :, None].to(h.dtype) * rows_delta[:, None, :]).reshape(h.shape)

    d = arch.in_out_features(handle.proj(layer))[1]
    delta = torch.zeros(n, d, device=dev, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    active = torch.ones(n, dtype=torch.bool)
    losses: list[list[float]] = [[] for _ in range(n)]
    probs = [0.0] * n
    clamped = [False] * n
    init_kl: torch.Tensor | None = None
    with passes, map_output(block, add_delta), frozen(model):
        for step in range(hp.v_steps):
            logp = torch.log_softmax(passes.logits().float(), dim=-1).cpu()  # [N reads, vocab]
            tok_logp = logp[torch.arange(n_t), t_ids]  # [target tokens]
            row_nll = -torch.zeros(n * T).index_add(0, t_rows, tok_logp) / per_row  # [n·T]
            nll = row_nll.reshape(n, T).mean(1)  # [n]
            kl_logp = logp[n_t:]  # [n, vocab]
            if init_kl is None:
                init_kl = kl_logp.detach().clone()
            kl = (kl_logp.exp() * (kl_logp - init_kl)).sum(1)  # [n]
            h_norm = captured["h_init"].norm(dim=1).cpu()  # [n]
            wd = hp.v_weight_decay * delta.norm(dim=1).cpu() / h_norm**2
            loss = nll + hp.kl_factor * kl + wd  # [n]
            for i in torch.nonzero(active).flatten().tolist():
                losses[i].append(loss[i].item())
                probs[i] = torch.exp(-nll[i]).item()
            active &= loss.detach() >= hp.early_stop_loss
            if step == hp.v_steps - 1 or not bool(active.any()):
                break
            opt.zero_grad()
            loss[active].sum().backward()
            before = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                act = active.to(dev)
                delta[~act] = before[~act]  # Adam's momentum would move a finished fact
                limit = (hp.clamp_norm_factor * h_norm).to(dev)
                norms = delta.norm(dim=1)
                over = act & (norms > limit)
                delta[over] *= (limit[over] / norms[over])[:, None]
                for i in torch.nonzero(over).flatten().tolist():
                    clamped[i] = True
    h_init = captured["h_init"].double().cpu()
    return Targets(z=h_init + delta.detach().double().cpu(), h_init=h_init, losses=losses,
                   clamped=clamped, target_prob=probs)


# ---- (2) keys and the hidden state at the critical layer ------------------------------------


@torch.no_grad()
def read_keys(
    handle: ModelHandle, requests: Sequence[EditRequest], layer: int,
    templates: list[str], z_layer: int, batch_rows: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K [in, n]: each fact's key at `layer` averaged over the templates (= compute_key's k̄), and
    H [d, n]: block z_layer's output at the subject's last token of the bare prompt, from the
    same forward passes (template "{}" is the bare prompt)."""
    if templates[0] != "{}":
        raise ValueError("the first context template must be the bare prompt '{}'")
    model, tok = handle.model, handle.tokenizer
    proj, blk = handle.proj_path(layer), handle.block_path(z_layer)
    encs = [encode_request(tok, r, t, with_target=False) for r in requests for t in templates]
    keys, hidden = [], []
    for s in range(0, len(encs), batch_rows):
        part = encs[s: s + batch_rows]
        ids, mask = pad_batch([e.ids for e in part], handle.device)
        with capture(model, [proj, blk], inputs=True, outputs=True) as rec:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        rows = torch.arange(len(part), device=ids.device)
        last = torch.tensor([e.subject_last for e in part], device=ids.device)
        keys.append(rec.inputs[proj].reshape(*ids.shape, -1)[rows, last].double().cpu())  # [rows, in]
        hidden.append(rec.outputs[blk].reshape(*ids.shape, -1)[rows, last].double().cpu())  # [rows, d]
    T = len(templates)
    k = torch.cat(keys).reshape(len(requests), T, -1)  # [n, T, in]
    h = torch.cat(hidden).reshape(len(requests), T, -1)[:, 0]  # [n, d]
    return k.mean(1).T.contiguous(), h.T.contiguous()


# ---- (3) residual and (4) update -------------------------------------------------------------


def spread_residual(z: torch.Tensor, h: torch.Tensor, remaining: int) -> torch.Tensor:
    """R = (Z − H) / remaining [d, n]: this layer's share of what the window still has to write.
    z: [n, d] targets; h: [d, n] current hidden states; remaining = m − t layers incl. this one."""
    if remaining < 1:
        raise ValueError("remaining counts this layer, so it is at least 1")
    return (z.T.double() - h.double()) / remaining


def memit_update(
    K: torch.Tensor, R: torch.Tensor, C: LayerStats | torch.Tensor, lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step (4): (B [out, k], A [k, in]) with B A = R Kᵀ (λC + K Kᵀ)⁻¹, in float64.

    K: [in, k] keys; R: [out, k] residuals; C: the layer's statistics (its Cholesky factor is
    made once and reused) or E[k kᵀ] itself."""
    st = C if isinstance(C, LayerStats) else LayerStats(C.detach().to("cpu", torch.float64), 0)
    K, R = K.to("cpu", torch.float64), R.to("cpu", torch.float64)
    cinv_k = st.solve(K)  # [in, k] C⁻¹K
    small = lam * torch.eye(K.shape[1], dtype=torch.float64) + K.T @ cinv_k  # [k, k] λI + KᵀC⁻¹K
    chol = torch.linalg.cholesky(small)
    A = torch.cholesky_solve(cinv_k.T.contiguous(), chol)  # [k, in] = (λI + KᵀC⁻¹K)⁻¹ KᵀC⁻¹
    return R.clone(), A


# ---- the window ------------------------------------------------------------------------------


@contextmanager
def updates_applied(model: torch.nn.Module, updates: Sequence[LayerUpdate]) -> Iterator[None]:
    """Inside, each updated projection computes (W + B A) x: its output gets B (A x) added by a
    hook. The weights are never touched, so nothing can be left half-edited."""

    def hook_for(A: torch.Tensor, B: torch.Tensor) -> Callable[..., torch.Tensor]:
        def add(mod: torch.nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor:
            # float32 like the patch that will hold B and A; x: [..., in] -> [..., out]
            return y + ((args[0].float() @ A.T) @ B.T).to(y.dtype)
        return add

    with ExitStack() as stack:
        for u in updates:
            proj = arch.get_module(model, u.module)
            dev = next(proj.parameters()).device
            h = proj.register_forward_hook(hook_for(u.A.to(dev, torch.float32), u.B.to(dev, torch.float32)))
            stack.callback(h.remove)
        yield


def run_window(
    handle: ModelHandle, requests: Sequence[EditRequest], hp: MemitHParams,
    templates: list[str], solve: Callable[[int, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor, dict[str, Any]]"],
) -> list[LayerUpdate]:
    """Steps (1)–(3) over the window, lowest layer first; `solve(layer, K, R) -> (B, A, diag)` is
    step (4) of the method. Each update carries the keys K_l [in, n] its layer was solved with
    (the keys that layer will see from now on: its own update does not change its input)."""
    t0 = time.perf_counter()
    L = hp.layers[-1]
    targets = compute_targets(handle, requests, L, templates, hp)
    t_target = time.perf_counter() - t0
    updates: list[LayerUpdate] = []
    for t, layer in enumerate(hp.layers):
        t1 = time.perf_counter()
        with updates_applied(handle.model, updates):
            K, H = read_keys(handle, requests, layer, templates, L, hp.batch_rows)
        R = spread_residual(targets.z, H, len(hp.layers) - t)  # [d, n]
        B, A, extra = solve(layer, K, R)
        dW = B @ A  # [out, in]
        diag = {
            "layer": layer, "layers": list(hp.layers), "n_facts": len(requests), "share": 1 / (len(hp.layers) - t),
            "residual_norm_mean": float(R.norm(dim=0).mean()), "key_norm_mean": float(K.norm(dim=0).mean()),
            "delta_fro": float(dW.norm()), "written_fraction": float(((dW @ K) * R).sum() / (R * R).sum().clamp_min(1e-300)),
            "timing": {"target_s": t_target, "layer_s": time.perf_counter() - t1},
            "targets": {"target_prob": targets.target_prob, "final_loss": [x[-1] for x in targets.losses],
                        "steps": [len(x) for x in targets.losses], "clamped": sum(targets.clamped),
                        "delta_norm": (targets.z - targets.h_init).norm(dim=1).tolist(),
                        "h_norm": targets.h_init.norm(dim=1).tolist()},
            **extra,
        }
        updates.append(LayerUpdate(handle.proj_path(layer), layer, B, A, diag, K))
    return updates


def window_step(solver: Solver, ctx: EditInputs, requests: Sequence[EditRequest], hp: MemitHParams) -> Computed:
    """A batch over the window with `solver(ctx, hp, layer, K, R)` as step (4): the step every
    window method (MEMIT, AlphaEdit, EMMET) shares. C of every window layer is taken before the
    first layer is solved (one pass), from the model as the context first saw it."""
    templates = ctx.templates(hp)
    ctx.stats(hp.layers, hp.stats_tokens)
    updates = run_window(ctx.handle, requests, hp, templates, functools.partial(solver, ctx, hp))
    return Computed(updates)


def window_passes(hp: MemitHParams, n: int, n_templates: int) -> int:
    """Forward passes a window step runs at most: the targets' steps per group of facts, then one
    pass of every fact's prompts per window layer (in chunks of batch_rows)."""
    groups = -(-n // facts_per_group(hp, n_templates))
    return hp.v_steps * groups + len(hp.layers or [0]) * -(-n * n_templates // hp.batch_rows)


def memit_solver(ctx: EditInputs, hp: MemitHParams, layer: int, K: torch.Tensor, R: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    st = ctx.stats([layer], hp.stats_tokens)[layer]
    lam = float(hp.mom2_update_weight)
    B, A = memit_update(K, R, st, lam)
    return B, A, {"lambda": lam, "stats_tokens": st.n_tokens, "jitter": st.jitter}


MEMIT = Method(name="memit", settings=MemitHParams, compute=functools.partial(window_step, memit_solver),
               one_at_a_time=False, summary="the requests as one batch over a window of layers (Meng et al. 2023)",
               planned_passes=window_passes, solver=memit_solver)
