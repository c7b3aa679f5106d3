"""Policy surrogates (docs/algorithms.md, axes 2-3): per-token loss and the masks its metrics need.

Every function takes ``logp_BT`` (current policy, with gradient), ``old_logp_BT``,
``adv_BT`` (per-token advantages; per-response ones broadcast) and ``mask_BT`` and returns
a ``PolicyLossOutput``; nothing here reduces over the batch (see ``aggregation.py``).
Padding positions may hold anything (even NaN): they are masked with ``where`` before use.

Token ratio: rho = exp(clamp(logp - old_logp, +-20)) (the clamp is ``ratio.LOG_RATIO_CLAMP``).

Sequence-level surrogates (gspo, gmpo) produce one loss l_i per response; it is
broadcast to the response's tokens so the same aggregation code applies, and with
``seq-mean-token-mean`` (their presets) (1/|o_i|) sum_t l_i = l_i, the paper's objective.
Their per-response advantage is the masked token mean of ``adv_BT`` (equal to A_i when A
is broadcast). The log of the sequence ratio is clamped to +-20 before exp.

Where this differs from the papers:
- gspo_token: written as the spec's stop-gradient identity, so with per-response A it has
  exactly GSPO's value and gradient under seq-mean-token-mean; its clip test is per token
  (on the same value s_i, so identical to GSPO unless A varies within the response).
- cispo: l = -sg(clip(rho, 1-eps_low, 1+eps_high)) * A * logp as in the spec, so the loss
  *value* contains logp itself (only its gradient is meaningful); clipfrac_low/high count
  tokens whose weight hit the lower / upper bound (CISPO clips both ways whatever A's sign).
- gmpo: per token the log-ratio is clipped to [-eps_low, eps_high] and the pessimistic
  (sign(A)-wise smaller) of clipped and unclipped is kept, then
  l_i = -A_i * exp(mean_t of that log-ratio): the geometric mean of token-clipped ratios.
- pg: no ratio in the loss (l = -A * logp), rho is still reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from moe_rl.algorithms.ratio import clamp_log_ratio, clamped_ratio

# B responses, T tokens


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


def _false(mask_BT: Tensor) -> Tensor:
    return torch.zeros_like(mask_BT, dtype=torch.bool)


def ppo_loss(
    logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor,
    *, clip_low: float, clip_high: float, dual_clip_c: float = 0.0,
) -> PolicyLossOutput:
    """Token-level clipped surrogate, separate bounds, optional dual clip (c > 1, 0 = off)."""
    m = mask_BT.bool()
    A = torch.where(m, adv_BT, torch.zeros_like(adv_BT)).detach()
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
    log_s_B = clamp_log_ratio(_seq_mean(delta, m))
    if token_level:
        A = torch.where(m, adv_BT, torch.zeros_like(adv_BT)).detach()
        log_s_BT = logp_BT - logp_BT.detach() + log_s_B.detach()[:, None]
        log_s_BT = torch.where(m, log_s_BT, torch.zeros_like(log_s_BT))
        s = torch.exp(log_s_BT)
    else:
        A = _seq_mean(adv_BT, m).detach()[:, None]
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
    A = torch.where(m, adv_BT, torch.zeros_like(adv_BT)).detach()
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
    A_B = _seq_mean(adv_BT, m).detach()
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


def pg_loss(logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor) -> PolicyLossOutput:
    """Plain on-policy policy gradient: l = -A * logp."""
    m = mask_BT.bool()
    A = torch.where(m, adv_BT, torch.zeros_like(adv_BT)).detach()
    lp = torch.where(m, logp_BT, torch.zeros_like(logp_BT))
    ratio = clamped_ratio(_delta(logp_BT, old_logp_BT, mask_BT)).detach()
    return PolicyLossOutput(
        loss_BT=-A * lp, ratio_BT=ratio, clip_low_BT=_false(mask_BT), clip_high_BT=_false(mask_BT),
        dualclip_BT=_false(mask_BT),
    )


def policy_loss(
    name: str, logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor,
    *, clip_low: float, clip_high: float, dual_clip_c: float = 0.0,
) -> PolicyLossOutput:
    """Dispatch by surrogate name (ppo, gspo, gspo_token, cispo, gmpo, pg)."""
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
    raise ValueError(f"policy loss {name!r} is not one of ppo, gspo, gspo_token, cispo, gmpo, pg")
