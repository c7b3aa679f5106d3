"""Training-inference mismatch correction (docs/algorithms.md, axis 7) and its metrics.

w_{i,t} = exp(old_logp - rollout_logp): the trainer's recomputed log-prob of the sampled
token over the one the inference engine reported (kernels, precision, MoE routing
differ). The result is a detached per-token weight that multiplies the token loss:
- ``tis``: min(w, C) (truncated importance sampling), raised to a floor when ``tis_floor`` > 0
  (TRL's ``vllm_importance_sampling_clip_min``);
- ``icepop``: w where alpha <= w <= beta, else 0 (token masking: M(k) = k inside the band,
  as the IcePop paper, verl's rollout_is "lo_hi" and TRL's token_mask; not 1);
- ``seq-mis``: 1 for a response whose geometric-mean w lies in [lo, hi], else 0 for all
  its tokens;
- ``seq-tis``: every token of response i gets min(W_i, C), W_i = exp(clamp(sum_t log w, +-20))
  the product of its token weights (verl rollout_is="sequence"; TRL sequence_truncate has no
  +-20 clamp and C_max 3);
- ``seq-icepop``: every token of response i gets W_i where alpha <= W_i <= beta, else 0
  (verl rollout_is="sequence" with "lo_hi"; TRL sequence_mask).
Masking is a weight of zero on the loss: the aggregation denominators (counted before
the step, from the response masks) do not change, so a masked token is "no gradient",
not "not there". That keeps the global counts independent of old_logp, which is only
known after the old-policy pass. For sequence-level surrogates the per-token weight
multiplies the broadcast response loss, i.e. a token-weighted correction of l_i.

The off-policy sequence mask of DeepSeek-V3.2 (``off_policy_sequence_mask``, TRL's
``off_policy_mask_threshold``) is not a weight of this family: it drops whole responses with a
negative advantage whose mean log(pi_rollout / pi_theta) under the *current* policy exceeds
delta, i.e. those the update has already moved far from what was sampled.

Metrics (rollout vs trainer, on valid tokens): ``mismatch/k1`` = mean(rollout - old)
(estimates KL(pi_rollout || pi_old)), ``mismatch/k3`` = mean(w - log w - 1),
``mismatch/is_weight_mean|max`` (token w), ``mismatch/masked_frac`` (tokens whose weight is
zero under icepop/seq-mis/seq-icepop), ``mismatch/extreme_frac`` (|old - rollout| > ln 2).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from moe_rl.algorithms.config import BASE_DEFAULTS, MISMATCH_MODES
from moe_rl.algorithms.metrics import Metrics
from moe_rl.algorithms.ratio import clamped_ratio

# B responses, T tokens

# |log w| above this counts toward mismatch/extreme_frac (w beyond [1/2, 2])
EXTREME_LOG_W = math.log(2)


def mismatch_weights(
    old_logp_BT: Tensor,
    rollout_logp_BT: Tensor,
    mask_BT: Tensor,
    mode: str,
    *,
    tis_cap: float = BASE_DEFAULTS["tis_cap"],
    tis_floor: float = BASE_DEFAULTS["tis_floor"],
    icepop_low: float = BASE_DEFAULTS["icepop_low"],
    icepop_high: float = BASE_DEFAULTS["icepop_high"],
    seq_mis_low: float = BASE_DEFAULTS["seq_mis_low"],
    seq_mis_high: float = BASE_DEFAULTS["seq_mis_high"],
) -> Tuple[Tensor, Metrics]:
    """Detached loss weights [B, T] for ``mode`` (``config.MISMATCH_MODES``) and metrics; for the
    sequence modes (``config.SEQUENCE_MISMATCH_MODES``) every valid token of a response carries
    its response's one weight."""
    m = mask_BT.bool()
    log_w = (old_logp_BT - rollout_logp_BT).detach()
    log_w = torch.where(m, log_w, torch.zeros_like(log_w))
    w = clamped_ratio(log_w)
    if mode == "none":
        weight = torch.ones_like(w)
    elif mode == "tis":
        weight = w.clamp(min=tis_floor, max=tis_cap)
    elif mode == "icepop":
        weight = torch.where((w >= icepop_low) & (w <= icepop_high), w, torch.zeros_like(w))
    elif mode == "seq-mis":
        n_B = m.sum(-1).clamp(min=1).to(w.dtype)
        geo_B = clamped_ratio(log_w.sum(-1) / n_B)
        keep_B = (geo_B >= seq_mis_low) & (geo_B <= seq_mis_high)
        weight = keep_B[:, None].to(w.dtype).expand_as(w).clone()
    elif mode in ("seq-tis", "seq-icepop"):
        W_B = clamped_ratio(log_w.sum(-1))  # the product of the response's token weights
        if mode == "seq-tis":
            wseq_B = W_B.clamp(min=tis_floor, max=tis_cap)
        else:
            wseq_B = torch.where((W_B >= icepop_low) & (W_B <= icepop_high), W_B, torch.zeros_like(W_B))
        weight = wseq_B[:, None].expand_as(w).clone()
    else:
        raise ValueError(f"mismatch mode {mode!r} is not one of {', '.join(MISMATCH_MODES)}")
    weight = torch.where(m, weight, torch.zeros_like(weight))

    metrics = Metrics()
    metrics.add_masked("mismatch/k1", -log_w, m)
    metrics.add_masked("mismatch/k3", w - log_w - 1, m)
    metrics.add_masked("mismatch/is_weight_mean", w, m, max_name="mismatch/is_weight_max")
    metrics.add_masked("mismatch/masked_frac", (weight == 0).to(w.dtype), m)
    metrics.add_masked("mismatch/extreme_frac", (log_w.abs() > EXTREME_LOG_W).to(w.dtype), m)
    return weight, metrics


def off_policy_sequence_mask(
    logp_BT: Tensor, rollout_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor, delta: float,
) -> Tuple[Tensor, Metrics]:
    """DeepSeek-V3.2's off-policy sequence mask (OPSM), detached [B, T]: 0 on every token of a
    response with a negative advantage whose mean over its valid tokens of
    ``rollout_logp - sg(logp)`` exceeds ``delta``, 1 elsewhere (TRL ``get_off_policy_mask``:
    keep where A >= 0 or the mean <= delta; an empty response keeps). ``adv_BT`` per token
    [B, T] or per response [B]; with per-token advantages the sign test is per token.
    Metric ``mismatch/opsm_masked_frac``: fraction of responses (every one counts) with a
    dropped token."""
    m = mask_BT.bool()
    kl_BT = torch.where(m, rollout_logp_BT - logp_BT.detach(), torch.zeros_like(logp_BT))
    kl_B = kl_BT.sum(-1) / m.sum(-1).clamp(min=1)
    adv = adv_BT[:, None].expand_as(kl_BT) if adv_BT.dim() == 1 else adv_BT
    keep_BT = ((adv >= 0) | (kl_B <= delta)[:, None]).to(logp_BT.dtype)
    dropped_B = ((keep_BT == 0) & m).any(-1).to(torch.float64)
    metrics = Metrics().add_masked("mismatch/opsm_masked_frac", dropped_B, torch.ones_like(dropped_B))
    return keep_BT, metrics
