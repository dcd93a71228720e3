"""ROME's three steps, one function each: compute_key, compute_value, rank_one_update.

Notation (Meng et al. 2022; Gupta et al. 2024): W [out, in] is the MLP output projection of the
edited layer, k a key (its input at the subject's last token), C = E[k kᵀ] over ordinary text.

    compute_key:      k̄ = mean of the key over the bare prompt and prefixed copies of it;
                      k_o = the bare-prompt key
    compute_value:    δ = argmin  NLL(target | prompts; W k + δ at the subject)
                                  + kl_factor · KL(subject's next token ‖ before)
                                  + v_weight_decay · ‖δ‖ / ‖current value‖²
                      current value = W k_o + b, the projection's output at the bare prompt
    rank_one_update:  target value v* = W k + δ for the key k the method writes,
                      residual r = v* − W k, key direction d = C⁻¹k_c / (kᵀ C⁻¹ k_c),
                      ΔW = r dᵀ, so that W′k = v* (k_c: the key whose C⁻¹-image sets d)

    r-rome:  ΔW = (v̄* − W k̄) (C⁻¹k̄)ᵀ / (k̄ᵀ C⁻¹ k̄)          averaged key everywhere
    p-rome:  ΔW = (v*  − W k_o)(C⁻¹k_o)ᵀ / (k_oᵀ C⁻¹ k_o)     bare-prompt key everywhere
    rome:    ΔW = (v*  − W k_o)(C⁻¹k̄)ᵀ / (k̄ᵀ C⁻¹ k_o)       the original code's mix
    r-rome-2key: ΔW = (v̄* − W k̄) aᵀ,  a = C⁻¹K (Kᵀ C⁻¹ K)⁻¹ 1,  K = [k̄, k_o]
             the least-C-norm rank-one update that adds the same δ at k̄ and at k_o (aᵀk̄ = aᵀk_o
             = 1); r-ROME gives the bare prompt only (k̄ᵀC⁻¹k_o)/(k̄ᵀC⁻¹k̄) of δ, which is where
             its efficacy misses come from. Where k_o is (nearly) parallel to k̄ in the C⁻¹ inner
             product the two constraints are one (or contradict), and it writes r-ROME's update.

Where the block normalises the MLP output before adding it to the residual stream (Gemma 2/3's
post_feedforward_layernorm), only the direction of W k + b reaches the model, and the value loop,
which cannot change the scale of the normed output, pushes δ to its clamp (4·‖W k_o + b‖). Then
`rank_one_update(..., normed=True)` writes the same direction at the current scale,

    normed:  v* ← (v* + b) · ‖W k + b‖ / ‖v* + b‖ − b

which gives the same normed output at k with ‖v* − W k‖ ≤ 2‖W k + b‖: the update, and what it
does to every other key, shrinks by that factor.

Only `rome` mixes keys: its denominator can be tiny when k̄ and k_o disagree, which is what
produces the huge "disabling" updates r-ROME was made to avoid.

Only what the equations read is computed: keys come from a pass that stops at the edited
projection; each value step runs only what δ changes (the prompts from the subject's last token
on, from the edited layer up; see `passes.py`) and applies the LM head only at the positions the
loss reads (target tokens, one KL position); the loop stops once p(target) = exp(−NLL) reaches
`early_stop_prob` (the paper's criterion; ROME's code compares the regularised loss with 0.05,
which its weight-decay and KL terms delay or prevent).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from rankone.core import architectures as arch
from rankone.core.errors import RankoneError
from rankone.core.hooks import add_at_positions, capture, frozen, map_output, stop_at
from rankone.core.tokens import EditRequest, encode_request, pad_batch
from rankone.methods.base import Computed, EditInputs, LayerUpdate, Method
from rankone.methods.passes import ValuePasses
from rankone.methods.settings import MethodSettings, check_value_loop
from rankone.methods.stats import LayerStats
from rankone.models.handle import ModelHandle


@dataclass(frozen=True)
class EditHParams(MethodSettings):
    """The ROME family's settings (the paper's defaults). `method` names the variant."""

    method: str = "r-rome"  # which key enters where in the update: VARIANTS
    # value optimisation (ROME paper defaults)
    v_steps: int = 20
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    after_kl_factor: float = 0.0  # KL of what follows the new answer (compute_value); 0: ROME's loss
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    early_stop_prob: float = 0.99  # stop once p(target) = exp(−NLL) reaches it; why 0.99: BENCHMARKS.md
    # a value still below reach_prob after v_steps passes goes on, up to v_steps_max passes in all
    # (some multi-token targets need twice v_steps); v_steps_max ≤ v_steps: never
    reach_prob: float = 0.9
    v_steps_max: int = 50
    kl_prompt: str = "{} is a"
    fast_value: bool = True  # value steps run only what δ changes (cached prefixes, replayed lower layers)
    # where a norm follows the projection (Gemma 2/3, OLMo 2), write v* at the current output's scale
    normed_target: bool = True

    @classmethod
    def serves(cls, name: str) -> bool:
        return name in VARIANTS

    def check(self) -> None:
        if self.method not in VARIANTS:
            raise RankoneError(f"{self.method!r} is not a ROME variant; these settings are for {', '.join(VARIANTS)}")
        super().check()
        check_value_loop(self)
        if not self.after_kl_factor >= 0:
            raise RankoneError(f"after_kl_factor must be 0 or more (a weight of a loss term), got {self.after_kl_factor}")
        if not 0 < float(self.early_stop_prob) <= 1:
            raise RankoneError(f"early_stop_prob must be in (0, 1] (1: never stop early), got {self.early_stop_prob}")
        if not 0 < float(self.reach_prob) <= 1:
            raise RankoneError(f"reach_prob must be in (0, 1], got {self.reach_prob}")
        if int(self.v_steps_max) < 1:
            raise RankoneError(f"v_steps_max must be at least 1 (≤ v_steps: no extra passes), got {self.v_steps_max}")


@dataclass
class KeyResult:
    keys: torch.Tensor  # [n_templates, in] float64, one key per context template
    k_mean: torch.Tensor  # [in] k̄
    k_bare: torch.Tensor  # [in] k_o (template "{}", always first)


@dataclass
class ValueResult:
    delta: torch.Tensor  # [out] float64: the shift of the projection output that writes the fact
    current_value: torch.Tensor  # [out] projection output at the bare prompt's subject token, before editing
    losses: list[float] = field(default_factory=list)  # regularised loss at each forward pass
    target_probs: list[float] = field(default_factory=list)  # exp(−NLL) at each forward pass
    clamped: bool = False
    target_prob: float = 0.0  # p(target) (exp of minus the mean NLL over prompts) at the last pass
    stopped_early: bool = False  # p(target) reached early_stop_prob before v_steps passes
    extended: bool = False  # p(target) was below reach_prob after v_steps passes, so the loop went on
    gathered: bool = True  # the LM head ran only at the positions the loss reads
    passes: str = ""  # how each pass ran: "suffix" (cached prefixes), "replay" (lower layers) or "full"


@torch.no_grad()
def compute_key(handle: ModelHandle, request: EditRequest, layer: int, templates: list[str]) -> KeyResult:
    """k̄ = mean over context templates of the projection input at the subject's last token."""
    if templates[0] != "{}":
        raise ValueError("the first context template must be the bare prompt '{}'")
    model, tok, path = handle.model, handle.tokenizer, handle.proj_path(layer)
    encs = [encode_request(tok, request, t, with_target=False) for t in templates]
    ids, mask = pad_batch([e.ids for e in encs], handle.device)
    with capture(model, [path], outputs=False) as rec, stop_at(arch.get_module(model, path)):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    x = rec.inputs[path].reshape(*ids.shape, -1)  # [n_templates, pos, in]
    rows = torch.arange(len(encs), device=x.device)
    keys = x[rows, torch.tensor([e.subject_last for e in encs], device=x.device)].double().cpu()
    return KeyResult(keys=keys, k_mean=keys.mean(0), k_bare=keys[0])


def compute_value(
    handle: ModelHandle, request: EditRequest, layer: int, templates: list[str],
    hp: EditHParams, full_logits: bool = False,
) -> ValueResult:
    """Optimise δ (added to the projection output at the subject's last token of every prompt).

    loss = mean NLL of the target tokens over the prefixed prompts (teacher forced)
         + kl_factor · KL(current ‖ initial) of the next-token distribution at the subject's last
           token of the KL prompt ("{subject} is a"), which keeps the subject's other facts
         + after_kl_factor · KL(current ‖ initial) of the next-token distribution after the
           target in the bare prompt: how the model goes on once it has said the new answer
           (initial: the unedited model reading that answer; 0 in ROME's recipe)
         + v_weight_decay · ‖δ‖ / ‖current value‖²,
    with δ clamped to clamp_norm_factor · ‖current value‖ after every step (ROME's recipe).
    It stops once exp(−NLL) ≥ early_stop_prob; after v_steps passes it stops if exp(−NLL) ≥
    reach_prob, else it goes on until then, up to v_steps_max passes. How each pass is run
    (cached prefixes, replayed lower layers, the head only where read) is `passes.ValuePasses`;
    fast_value=False runs whole prompts, full_logits=True applies the head at every position.
    """
    model, tok, proj = handle.model, handle.tokenizer, handle.proj(layer)
    rewrites = [encode_request(tok, request, t) for t in templates]
    kl = encode_request(tok, EditRequest(hp.kl_prompt, request.subject, request.target), with_target=False)
    encs = rewrites + [kl]
    n = len(rewrites)
    # Teacher forcing: the logit at p-1 predicts the target token at p; then the position after
    # the bare prompt's target (after_kl) and the KL prompt's subject (kl).
    tgt_rows = [i for i, e in enumerate(rewrites) for _ in e.target_positions]
    read_rows = tgt_rows + [0, n]
    read_pos = [p - 1 for e in rewrites for p in e.target_positions] + [rewrites[0].target_positions[-1], kl.subject_last]
    tgt_ids = torch.tensor([t for e in rewrites for t in e.target_ids])
    per_row = torch.tensor([len(e.target_positions) for e in rewrites], dtype=torch.float32)
    passes = ValuePasses(handle, layer, [e.ids for e in encs], [e.subject_last for e in encs], read_rows, read_pos,
                         fast=hp.fast_value, gather=not full_logits)

    delta = torch.zeros(arch.in_out_features(proj)[1], device=handle.device, dtype=torch.float32, requires_grad=True)
    captured: dict[str, torch.Tensor] = {}

    def add_delta(h: torch.Tensor) -> torch.Tensor:  # h: [rows, pos, out] (or [rows·pos, out])
        h3 = h.reshape(*passes.shape, -1)
        if "current" not in captured:
            captured["current"] = h3[0, passes.delta_pos[0]].detach().double().cpu()
        return add_at_positions(h3, delta.to(h.device), passes.delta_pos).reshape(h.shape)

    opt = torch.optim.Adam([delta], lr=hp.v_lr)
    init_kl_logp: torch.Tensor | None = None  # [2, vocab]: after the target, at the KL prompt
    result = ValueResult(delta=torch.zeros(0), current_value=torch.zeros(0), gathered=passes.gathered, passes=passes.mode)
    cap = max(hp.v_steps, hp.v_steps_max)
    with passes, map_output(proj, add_delta), frozen(model):
        for step in range(cap):
            logp = torch.log_softmax(passes.logits().float(), dim=-1)  # [n_read, vocab]
            tok_logp = logp[:-2].gather(1, tgt_ids[:, None].to(logp.device))[:, 0].cpu()  # [n_target_tokens]
            nll = -(torch.zeros(n).index_add(0, torch.tensor(tgt_rows), tok_logp) / per_row).mean()
            kl_logp = logp[-2:]  # [2, vocab]
            if init_kl_logp is None:
                init_kl_logp = kl_logp.detach().clone()
            after_kl, kl_loss = torch.sum(kl_logp.exp() * (kl_logp - init_kl_logp), dim=1).cpu()
            current_norm = captured["current"].norm().float()
            wd = hp.v_weight_decay * delta.norm().cpu() / current_norm**2
            loss = nll + hp.kl_factor * kl_loss + hp.after_kl_factor * after_kl + wd
            result.losses.append(loss.item())
            result.target_probs.append(math.exp(-nll.item()))
            if result.target_probs[-1] >= hp.early_stop_prob:
                result.stopped_early = step < hp.v_steps - 1
                break
            if step >= hp.v_steps - 1 and (result.target_probs[-1] >= hp.reach_prob or step == cap - 1):
                result.extended = step >= hp.v_steps
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
            max_norm = hp.clamp_norm_factor * float(current_norm)
            with torch.no_grad():
                if float(delta.norm()) > max_norm:
                    delta.mul_(max_norm / float(delta.norm()))
                    result.clamped = True
    result.target_prob = result.target_probs[-1]
    result.delta = delta.detach().double().cpu()
    result.current_value = captured["current"]
    return result


TWO_KEY_MIN_SIN2 = 1e-6  # below this, k_o adds no usable constraint beside k̄ (see two_key_direction)


def two_key_direction(k_bar: torch.Tensor, k_o: torch.Tensor, cinv_kbar: torch.Tensor,
                      cinv_ko: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(direction, denom) with key_dir = direction / denom = a = C⁻¹K (KᵀC⁻¹K)⁻¹ 1, K = [k̄, k_o].

    denom = 1 / (aᵀ C a) = 1 / (1ᵀ G⁻¹ 1), which for one key is r-ROME's kᵀC⁻¹k: the same quantity
    whose smallness blows the update up, so the guard reads it the same way for every method.
    G = KᵀC⁻¹K is 2×2; its determinant relative to its diagonal, sin² of the C⁻¹-angle between the
    keys, says whether k_o is a second constraint. Below TWO_KEY_MIN_SIN2 (k_o ∥ k̄: the bare
    prompt is the only template, or the prefixes do not move the key) the r-ROME direction is
    returned, which meets aᵀk̄ = 1 and is the least-norm answer to that single constraint.
    """
    g = torch.tensor([[float(k_bar @ cinv_kbar), float(k_bar @ cinv_ko)],
                      [float(k_o @ cinv_kbar), float(k_o @ cinv_ko)]], dtype=torch.float64)  # [2, 2]
    sin2 = float(torch.linalg.det(g)) / (float(g[0, 0]) * float(g[1, 1]))
    if sin2 < TWO_KEY_MIN_SIN2:
        return cinv_kbar, float(g[0, 0])
    coef = torch.linalg.solve(g, torch.ones(2, dtype=torch.float64))  # [2]: G⁻¹1 (G is positive definite)
    total = float(coef.sum())  # 1ᵀG⁻¹1 = aᵀCa
    return (coef[0] * cinv_kbar + coef[1] * cinv_ko) / total, 1.0 / total


@dataclass
class Update:
    """ΔW = residual ⊗ key_dir (an outer product, [out, in]), computed in float64."""

    residual: torch.Tensor  # [out] r = v* − W k: what the edited projection must add at the key
    key_dir: torch.Tensor  # [in] d = C⁻¹k_c / (kᵀ C⁻¹ k_c): which inputs the change responds to
    target_value: torch.Tensor  # [out] v*, the desired output W′k for the key the method writes
    key: torch.Tensor  # [in] k, the key the method writes (k̄ or k_o)
    diagnostics: dict[str, float]


@dataclass(frozen=True)
class Variant:
    """Which key enters where in ΔW = (v* − W k) dᵀ / (dᵀ k): the module docstring's table."""

    written: str  # the key k whose output becomes v*: "mean" (k̄) or "bare" (k_o)
    direction: str  # d's key: "mean" (C⁻¹k̄), "bare" (C⁻¹k_o) or "two" (`two_key_direction`)
    value_at_bare: bool = False  # v* = W k_o + δ instead of W k + δ (r-rome-bare)


VARIANTS: dict[str, Variant] = {
    "r-rome": Variant("mean", "mean"),
    "p-rome": Variant("bare", "bare"),
    "rome": Variant("bare", "mean"),
    "r-rome-bare": Variant("mean", "mean", value_at_bare=True),
    "r-rome-2key": Variant("mean", "two"),
}


def rank_one_update(
    w: torch.Tensor, key: KeyResult, value: ValueResult, stats: LayerStats, variant: Variant,
    normed: bool = False, bias: torch.Tensor | None = None,
) -> Update:
    """The closed-form update of the variant, in float64 on a cached Cholesky factor of C
    (normed: a norm follows the projection, whose bias is `bias`; see the module's docstring)."""
    W = w.detach().to("cpu", torch.float64)  # [out, in]
    k_bar, k_o = key.k_mean, key.k_bare
    cinv_kbar, cinv_ko = stats.solve(k_bar), stats.solve(k_o)  # [in]
    k = k_bar if variant.written == "mean" else k_o
    if variant.direction == "two":
        direction, denom = two_key_direction(k_bar, k_o, cinv_kbar, cinv_ko)
    else:
        direction = cinv_kbar if variant.direction == "mean" else cinv_ko
        denom = float(k @ direction)
    value_key = k_o if variant.value_at_bare else k  # the key whose current output δ is added to
    # desired projection output for k (the bias cancels)
    target_value = W @ value_key + value.delta
    scale = 1.0
    if normed:  # only the direction of the output W k + b counts: keep the current scale
        b = torch.zeros_like(target_value) if bias is None else bias.detach().to("cpu", torch.float64)
        scale = float((W @ k + b).norm() / (target_value + b).norm())
        target_value = (target_value + b) * scale - b
    residual = target_value - W @ k  # [out]
    key_dir = direction / denom  # [in]
    diag = {
        "denominator": denom,
        "denom_mean_mean": float(k_bar @ cinv_kbar),
        "denom_bare_bare": float(k_o @ cinv_ko),
        "denom_bare_mean": float(k_o @ cinv_kbar),
        "key_cosine": float(torch.nn.functional.cosine_similarity(k_bar, k_o, dim=0)),
        "delta_norm": float(value.delta.norm()),
        "current_value_norm": float(value.current_value.norm()),
        "delta_fro": float(residual.norm() * key_dir.norm()),
        "weight_fro": float(W.norm()),
        "target_scale": scale,  # < 1: v* shrunk to the current scale (normed)
        "bare_key_gain": float(key_dir @ k_o),  # the share of the residual the bare prompt receives
    }
    return Update(residual=residual, key_dir=key_dir, target_value=target_value, key=k, diagnostics=diag)


# ---- the method interface (rankone.methods.base) ----------------------------------------------


@dataclass
class RankOneDetail:
    """What one rank-one step computed on the way to its update: any other variant's update
    follows from these without a second value loop (`rank_one_update(w, key, value, C, VARIANTS[m], ...)`)."""

    key: KeyResult
    value: ValueResult
    normed: bool
    bias: torch.Tensor | None
    update: Update  # the variant's update in float64 (residual, key direction, v*, the key written)


def edit_step(variant: Variant, ctx: EditInputs, requests: Sequence[EditRequest], s: EditHParams) -> Computed:
    """One request: its key, its value, and the variant's rank-one update at layer s.layer."""
    (request,) = requests
    handle, layer = ctx.handle, s.layer
    templates = ctx.templates(s)
    st = ctx.stats([layer], s.stats_tokens)[layer]
    t0 = time.perf_counter()
    key = compute_key(handle, request, layer, templates)
    t1 = time.perf_counter()
    value = compute_value(handle, request, layer, templates, s)  # one forward pass a step
    t2 = time.perf_counter()
    proj = handle.proj(layer)
    normed = s.normed_target and handle.mlp_output_norm(layer) is not None
    upd = rank_one_update(arch.weight_oi(proj), key, value, st, variant, normed, proj.bias)
    diag = {
        "timing": {"key_s": t1 - t0, "value_s": t2 - t1, "solve_s": time.perf_counter() - t2},
        "value": {"losses": value.losses, "target_probs": value.target_probs, "clamped": value.clamped,
                  "target_prob": value.target_prob, "steps": len(value.losses), "stopped_early": value.stopped_early,
                  "extended": value.extended, "early_stop_prob": s.early_stop_prob, "gathered_logits": value.gathered,
                  "passes": value.passes},
    }
    return computed(handle.proj_path(layer), layer, upd, diag, RankOneDetail(key, value, normed, proj.bias, upd))


def computed(module: str, layer: int, upd: Update, diagnostics: dict[str, Any], detail: Any = None) -> Computed:
    """A rank-one update as the step record the Editor writes: ΔW = residual ⊗ key_dir is the
    patch's B (one column) and A (one row)."""
    one = LayerUpdate(module, layer, upd.residual[:, None], upd.key_dir[None, :], upd.diagnostics)
    return Computed([one], diagnostics, denominator=upd.diagnostics["denominator"], detail=detail)


def _variant_method(name: str, summary: str) -> Method:
    return Method(name=name, settings=EditHParams, compute=functools.partial(edit_step, VARIANTS[name]),
                  one_at_a_time=True, summary=summary,
                  planned_passes=lambda s, n, t: n * max(s.v_steps, s.v_steps_max))


R_ROME = _variant_method("r-rome", "averaged key everywhere; stable over many edits (the default)")
P_ROME = _variant_method("p-rome", "the bare prompt's key everywhere")
ROME = _variant_method("rome", "the original code's mix of keys, kept to show its failure")
R_ROME_BARE = _variant_method("r-rome-bare", "averaged key, the bare prompt's output plus δ written at it")
R_ROME_2KEY = _variant_method("r-rome-2key", "r-ROME's value written so that k̄ and k_o both receive δ")
