"""Policy surrogates (docs/algorithms.md, axes 2-3): per-token loss and the masks its metrics need.

Every function takes ``logp_BT`` (current policy, with gradient), ``old_logp_BT``,
``adv_BT`` (per-token advantages [B, T], or per-response [B]) and ``mask_BT`` and returns
a ``PolicyLossOutput``; nothing here reduces over the batch (see ``aggregation.py``).
Padding positions may hold anything (even NaN): they are masked with ``where`` before use.

Token ratio: rho = exp(clamp(logp - old_logp, +-20)) (the clamp is ``ratio.LOG_RATIO_CLAMP``).

Sequence-level surrogates (gspo, gmpo) produce one loss l_i per response; it is
broadcast to the response's tokens so the same aggregation code applies, and with
``seq-mean-token-mean`` (their presets) (1/|o_i|) sum_t l_i = l_i, the paper's objective.
Their per-response advantage is ``adv_BT`` itself when it is [B], else its masked token
mean (equal to A_i when A is broadcast). The log of the sequence ratio is clamped to
+-20 before exp.

Where this differs from the papers:
- gspo_token: written as the spec's stop-gradient identity, so with per-response A it has
  exactly GSPO's value and gradient under seq-mean-token-mean; its clip test is per token
  (on the same value s_i, so identical to GSPO unless A varies within the response). The
  +-20 clamp acts on the combined log s_{i,t} = logp - sg(logp) + sg(log s_i), the term that
  carries the gradient, so a token where it binds has zero gradient, as in gspo (verl clamps
  the same term, at max 10).
- cispo: l = -sg(clip(rho, 1-eps_low, 1+eps_high)) * A * logp as in the spec, so the loss
  *value* contains logp itself (only its gradient is meaningful); clipfrac_low/high count
  tokens whose weight hit the lower / upper bound (CISPO clips both ways whatever A's sign).
- gmpo: per token the log-ratio is clipped to [-eps_low, eps_high] and the pessimistic
  (sign(A)-wise smaller) of clipped and unclipped is kept, then
  l_i = -A_i * exp(mean_t of that log-ratio): the geometric mean of token-clipped ratios.
- pg: no ratio in the loss (l = -A * logp), rho is still reported.
- sapo: l = -A * (4/tau) * sigmoid(tau (rho - 1)), tau = tau_pos where A > 0, tau_neg where
  A <= 0 (verl, TRL): a soft gate instead of the clip; nothing is clipped, so the clip masks
  are all False.
- vespo: l = -sg(phi_i) * A * logp with phi_i = exp(lambda + k log w_i - lambda w_i) of the
  full sequence ratio w_i (a sum of clamped token log-ratios, then clamped to
  [VESPO_LOG_W_MIN, ratio.LOG_RATIO_CLAMP]); (k, lambda) by the sign of the response's advantage
  A_i (A_i >= 0: the _pos pair), lambda floored at VESPO_LAMBDA_MIN, a non-finite phi -> 0
  (TRL get_gamma_weights). With a mismatch correction on, ``actor_loss`` folds its log
  weight into log w_i (``vespo_is_log_weight``) instead of multiplying the loss, as TRL does.

Advantages: ``adv_BT`` may be per token [B, T] or per response [B] (broadcast to the
response's tokens; the response's A_i is then that value, not a token mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moe_rl.algorithms.config import BASE_DEFAULTS, POLICY_LOSSES
from moe_rl.algorithms.ratio import clamp_log_ratio, clamped_ratio

# B responses, T tokens

# VESPO (TRL get_gamma_weights): floor of the sequence log-weight (w >= 1e-8, where phi
# vanishes anyway) and of lambda (so e^{-lambda w} still decays).
VESPO_LOG_W_MIN = math.log(1e-8)
VESPO_LAMBDA_MIN = 1e-4


@dataclass
class PolicyLossOutput:
    """Per-token loss plus what the metrics need (all but ``loss_BT`` detached)."""

    loss_BT: Tensor  # per-token loss (sequence losses broadcast over their tokens)
    ratio_BT: Tensor  # token ratio rho (reported as actor/ratio_* for token-level losses)
    clip_low_BT: Tensor  # bool: lower-bound clipped branch taken (A < 0 side for ppo)
    clip_high_BT: Tensor  # bool: upper-bound clipped branch taken (A > 0 side for ppo)
    dualclip_BT: Tensor  # bool: dual-clip bound -c*A taken
    seq_ratio_B: Optional[Tensor] = None  # sequence ratio (gspo/gspo_token/gmpo), else None
    seq_clipped_B: Optional[Tensor] = None  # bool: response clipped (sequence-level losses)


def _delta(logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    d = logp_BT - old_logp_BT.detach()
    return torch.where(mask_BT.bool(), d, torch.zeros_like(d))


def _seq_mean(x_BT: Tensor, mask_BT: Tensor) -> Tensor:
    m = mask_BT.bool()
    return torch.where(m, x_BT, torch.zeros_like(x_BT)).sum(-1) / m.sum(-1).clamp(min=1).to(x_BT.dtype)


def _token_adv(adv: Tensor, mask_BT: Tensor) -> Tensor:
    """Detached per-token advantages [B, T], zero on padding, from [B, T] or per-response [B]."""
    m = mask_BT.bool()
    a = adv[:, None] if adv.dim() == 1 else adv
    return torch.where(m, a, torch.zeros((), dtype=a.dtype, device=a.device)).detach()


def _response_adv(adv: Tensor, mask_BT: Tensor) -> Tensor:
    """Detached per-response advantage A_i [B]: the value given, or the token mean of [B, T]."""
    return adv.detach() if adv.dim() == 1 else _seq_mean(adv, mask_BT).detach()


def _false(mask_BT: Tensor) -> Tensor:
    return torch.zeros_like(mask_BT, dtype=torch.bool)


def ppo_loss(
    logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor,
    *, clip_low: float, clip_high: float, dual_clip_c: float = BASE_DEFAULTS["dual_clip_c"],
) -> PolicyLossOutput:
    """Token-level clipped surrogate, separate bounds, optional dual clip (c > 1, 0 = off)."""
    m = mask_BT.bool()
    A = _token_adv(adv_BT, m)
    ratio = clamped_ratio(_delta(logp_BT, old_logp_BT, mask_BT))
    unclipped = -A * ratio
    clipped = -A * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    took_clip = (clipped > unclipped) & m
    dual = _false(mask_BT)
    if dual_clip_c:
        bound = -dual_clip_c * A
        dual = (A < 0) & (loss > bound) & m
        loss = torch.where(A < 0, torch.minimum(loss, bound), loss)
    return PolicyLossOutput(
        loss_BT=loss, ratio_BT=ratio.detach(),
        clip_low_BT=took_clip & (A < 0), clip_high_BT=took_clip & (A > 0), dualclip_BT=dual,
    )


def gspo_loss(
    logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor,
    *, clip_low: float, clip_high: float, token_level: bool = False,
) -> PolicyLossOutput:
    """GSPO: s_i = exp(mean_t delta); l_i = max(-A s, -A clip(s)). ``token_level``: GSPO-token."""
    m = mask_BT.bool()
    delta = _delta(logp_BT, old_logp_BT, mask_BT)
    mean_delta_B = _seq_mean(delta, m)
    log_s_B = clamp_log_ratio(mean_delta_B)
    if token_level:
        A = _token_adv(adv_BT, m)
        # Clamp the combined term, the one that carries the gradient: where the bound binds the
        # token has zero gradient, as in gspo (clamping sg(log s_i) alone would saturate the value
        # but leave the gradient s * dlogp, unbounded).
        log_s_BT = clamp_log_ratio(logp_BT - logp_BT.detach() + mean_delta_B.detach()[:, None])
        log_s_BT = torch.where(m, log_s_BT, torch.zeros_like(log_s_BT))
        s = torch.exp(log_s_BT)
    else:
        A = _response_adv(adv_BT, m)[:, None]
        s = torch.exp(log_s_B)[:, None]
    unclipped = -A * s
    clipped = -A * s.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped).expand_as(delta)
    took = ((clipped > unclipped).expand_as(delta)) & m
    A_full = A.expand_as(delta)
    return PolicyLossOutput(
        loss_BT=loss, ratio_BT=clamped_ratio(delta).detach(),
        clip_low_BT=took & (A_full < 0), clip_high_BT=took & (A_full > 0), dualclip_BT=_false(mask_BT),
        seq_ratio_B=torch.exp(log_s_B).detach(), seq_clipped_B=took.any(-1),
    )


def cispo_loss(
    logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor,
    *, clip_low: float, clip_high: float,
) -> PolicyLossOutput:
    """CISPO: l = -sg(clip(rho, 1-eps_low, 1+eps_high)) * A * logp; no token loses its gradient."""
    m = mask_BT.bool()
    A = _token_adv(adv_BT, m)
    ratio = clamped_ratio(_delta(logp_BT, old_logp_BT, mask_BT)).detach()
    w = ratio.clamp(min=max(1 - clip_low, 0.0), max=1 + clip_high)
    lp = torch.where(m, logp_BT, torch.zeros_like(logp_BT))
    return PolicyLossOutput(
        loss_BT=-w * A * lp, ratio_BT=ratio,
        clip_low_BT=(ratio < 1 - clip_low) & m, clip_high_BT=(ratio > 1 + clip_high) & m,
        dualclip_BT=_false(mask_BT),
    )


def gmpo_loss(
    logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor,
    *, clip_low: float, clip_high: float,
) -> PolicyLossOutput:
    """GMPO: l_i = -A_i * exp(mean_t sgn(A) min(sgn(A) delta, sgn(A) clip(delta, -eps_low, eps_high)))."""
    m = mask_BT.bool()
    delta = _delta(logp_BT, old_logp_BT, mask_BT)
    A_B = _response_adv(adv_BT, m)
    sgn = torch.sign(A_B)[:, None]
    d_clip = delta.clamp(-clip_low, clip_high)
    d_min = sgn * torch.minimum(sgn * delta, sgn * d_clip)
    log_r_B = clamp_log_ratio(_seq_mean(d_min, m))
    r_B = torch.exp(log_r_B)
    loss = (-A_B * r_B)[:, None].expand_as(delta)
    took = (sgn * d_clip < sgn * delta) & m
    sgn_full = sgn.expand_as(delta)
    return PolicyLossOutput(
        loss_BT=loss, ratio_BT=clamped_ratio(delta).detach(),
        clip_low_BT=took & (sgn_full < 0), clip_high_BT=took & (sgn_full > 0), dualclip_BT=_false(mask_BT),
        seq_ratio_B=r_B.detach(), seq_clipped_B=took.any(-1),
    )


def sapo_loss(
    logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor,
    *, tau_pos: float, tau_neg: float,
) -> PolicyLossOutput:
    """SAPO: l = -A * (4/tau) * sigmoid(tau * (rho - 1)), tau = tau_pos (A > 0) | tau_neg (A <= 0)."""
    m = mask_BT.bool()
    A = _token_adv(adv_BT, m)
    ratio = clamped_ratio(_delta(logp_BT, old_logp_BT, mask_BT))
    tau = torch.where(A > 0, torch.full_like(A, tau_pos), torch.full_like(A, tau_neg))
    loss = -A * (4.0 / tau) * torch.sigmoid(tau * (ratio - 1))
    return PolicyLossOutput(
        loss_BT=loss, ratio_BT=ratio.detach(), clip_low_BT=_false(mask_BT), clip_high_BT=_false(mask_BT),
        dualclip_BT=_false(mask_BT),
    )


def vespo_weights(
    log_ratio_BT: Tensor, adv_B: Tensor, mask_BT: Tensor,
    *, k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float, log_is_B: Optional[Tensor] = None,
) -> Tensor:
    """phi_i [B] (detached): e^lambda * w^k * e^{-lambda w} of the sequence ratio w_i, phi(1) = 1.

    ``log_is_B``: a mismatch correction's log weight per response, added before the clamp."""
    m = mask_BT.bool()
    lr = torch.where(m, clamp_log_ratio(log_ratio_BT.detach()), torch.zeros_like(log_ratio_BT))
    log_w_B = lr.sum(-1)
    if log_is_B is not None:
        log_w_B = log_w_B + log_is_B.detach()
    log_w_B = clamp_log_ratio(log_w_B).clamp(min=VESPO_LOG_W_MIN)
    pos_B = adv_B.detach() >= 0
    k_B = torch.where(pos_B, torch.full_like(log_w_B, k_pos), torch.full_like(log_w_B, k_neg))
    lam_B = torch.where(pos_B, torch.full_like(log_w_B, lambda_pos), torch.full_like(log_w_B, lambda_neg))
    lam_B = lam_B.clamp(min=VESPO_LAMBDA_MIN)
    phi_B = torch.exp(lam_B + k_B * log_w_B - lam_B * torch.exp(log_w_B))
    return torch.nan_to_num(phi_B, nan=0.0, posinf=0.0, neginf=0.0)


def vespo_is_log_weight(weight_BT: Tensor, mask_BT: Tensor, *, per_sequence: bool) -> Tensor:
    """A mismatch weight as VESPO folds it into log w_i [B]: the sum over valid tokens of
    clamp(log weight, VESPO_LOG_W_MIN, ratio.LOG_RATIO_CLAMP) for a per-token correction, the clamped
    log of the response's one weight for a per-sequence correction (TRL's sequence modes)."""
    m = mask_BT.bool()
    log_c = clamp_log_ratio(torch.log(weight_BT.detach())).clamp(min=VESPO_LOG_W_MIN)
    log_c = torch.where(m, log_c, torch.zeros_like(log_c))
    if not per_sequence:
        return log_c.sum(-1)
    # every valid token of a response carries the same weight: take it once
    return log_c.sum(-1) / m.sum(-1).clamp(min=1).to(log_c.dtype)


def vespo_loss(
    logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor,
    *, k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float, log_is_B: Optional[Tensor] = None,
) -> PolicyLossOutput:
    """VESPO: l = -sg(phi_i) * A * logp (only the gradient is meaningful, as CISPO's)."""
    m = mask_BT.bool()
    A = _token_adv(adv_BT, m)
    delta = _delta(logp_BT, old_logp_BT, mask_BT)
    phi_B = vespo_weights(delta, _response_adv(adv_BT, m), m, k_pos=k_pos, lambda_pos=lambda_pos, k_neg=k_neg,
                          lambda_neg=lambda_neg, log_is_B=log_is_B)
    lp = torch.where(m, logp_BT, torch.zeros_like(logp_BT))
    return PolicyLossOutput(
        loss_BT=-phi_B[:, None] * A * lp, ratio_BT=clamped_ratio(delta).detach(),
        clip_low_BT=_false(mask_BT), clip_high_BT=_false(mask_BT), dualclip_BT=_false(mask_BT),
    )


def pg_loss(logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor) -> PolicyLossOutput:
    """Plain on-policy policy gradient: l = -A * logp."""
    m = mask_BT.bool()
    A = _token_adv(adv_BT, m)
    lp = torch.where(m, logp_BT, torch.zeros_like(logp_BT))
    ratio = clamped_ratio(_delta(logp_BT, old_logp_BT, mask_BT)).detach()
    return PolicyLossOutput(
        loss_BT=-A * lp, ratio_BT=ratio, clip_low_BT=_false(mask_BT), clip_high_BT=_false(mask_BT),
        dualclip_BT=_false(mask_BT),
    )


def policy_loss(
    name: str, logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor,
    *, clip_low: float, clip_high: float, dual_clip_c: float = BASE_DEFAULTS["dual_clip_c"],
    sapo_tau_pos: float = BASE_DEFAULTS["sapo_tau_pos"], sapo_tau_neg: float = BASE_DEFAULTS["sapo_tau_neg"],
    vespo_k_pos: float = BASE_DEFAULTS["vespo_k_pos"], vespo_lambda_pos: float = BASE_DEFAULTS["vespo_lambda_pos"],
    vespo_k_neg: float = BASE_DEFAULTS["vespo_k_neg"], vespo_lambda_neg: float = BASE_DEFAULTS["vespo_lambda_neg"],
    vespo_log_is_B: Optional[Tensor] = None,
) -> PolicyLossOutput:
    """Dispatch by surrogate name (``config.POLICY_LOSSES``); ``adv_BT`` is [B, T] or [B]."""
    if adv_BT.dim() not in (1, 2) or adv_BT.shape[0] != mask_BT.shape[0] or (
            adv_BT.dim() == 2 and adv_BT.shape != mask_BT.shape):
        raise ValueError(
            f"advantages must be [B, T] like the mask {tuple(mask_BT.shape)} or per response [B]; "
            f"got {tuple(adv_BT.shape)}"
        )
    if name == "ppo":
        return ppo_loss(logp_BT, old_logp_BT, adv_BT, mask_BT, clip_low=clip_low, clip_high=clip_high,
                        dual_clip_c=dual_clip_c)
    if name in ("gspo", "gspo_token"):
        return gspo_loss(logp_BT, old_logp_BT, adv_BT, mask_BT, clip_low=clip_low, clip_high=clip_high,
                         token_level=name == "gspo_token")
    if name == "cispo":
        return cispo_loss(logp_BT, old_logp_BT, adv_BT, mask_BT, clip_low=clip_low, clip_high=clip_high)
    if name == "gmpo":
        return gmpo_loss(logp_BT, old_logp_BT, adv_BT, mask_BT, clip_low=clip_low, clip_high=clip_high)
    if name == "pg":
        return pg_loss(logp_BT, old_logp_BT, adv_BT, mask_BT)
    if name == "sapo":
        return sapo_loss(logp_BT, old_logp_BT, adv_BT, mask_BT, tau_pos=sapo_tau_pos, tau_neg=sapo_tau_neg)
    if name == "vespo":
        return vespo_loss(logp_BT, old_logp_BT, adv_BT, mask_BT, k_pos=vespo_k_pos, lambda_pos=vespo_lambda_pos,
                          k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg, log_is_B=vespo_log_is_B)
    raise ValueError(f"policy loss {name!r} is not one of {', '.join(POLICY_LOSSES)}")
