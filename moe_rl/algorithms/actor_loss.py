"""The actor's step loss for one micro-batch: surrogate x mismatch weight, KL, aggregation, metrics.

This composes the axes chosen in an ``AlgorithmConfig``; it has no knowledge of any
named algorithm. Call it once per micro-batch with the step's global denominators (from
``moe_rl.train.global_counts``); the returned loss is the micro-batch's share of the step
loss (see ``aggregation.py``) and the metrics merge exactly across micro-batches and
ranks (``metrics.py``):

- ``actor/pg_loss``, ``actor/kl_loss``, ``actor/entropy_loss``: sums of the shares (the step
  value once summed); ``actor/entropy_loss`` (with ``entropy_coeff``) is the entropy aggregated
  like the policy loss, before the coefficient;
- ``actor/entropy``: token mean; ``actor/ppo_kl``: token mean of -(logp - old_logp);
- ``actor/ratio_mean|min|max``: token ratio for token-level surrogates, sequence ratio
  (one value per response) for gspo/gspo_token/gmpo;
- ``actor/clipfrac``, ``actor/clipfrac_low``, ``actor/clipfrac_high``, ``actor/dualclip_frac``:
  fractions of valid tokens (gspo: a token counts when its response's clipped branch was
  taken; gmpo: when its own log-ratio was clipped); ``actor/seq_clipfrac``: fraction of
  responses with a clipped branch taken, over every response, empty ones included
  (sequence-level surrogates only); sapo and vespo clip nothing (all 0);
- ``mismatch/*`` when ``rollout_logp_BT`` is given; ``mismatch/opsm_masked_frac`` with
  ``off_policy_mask`` (DeepSeek-V3.2's off-policy sequence mask);
- ``actor/entropy_kept_frac`` with ``top_entropy_quantile`` < 1: the fraction of valid tokens
  whose loss ``entropy_keep_BT`` keeps (``entropy_select.py`` makes that mask).

Advantages may be per token [B, T] or per response [B]. With ``with_token_loss=True`` the
per-token loss matrix comes back too: the surrogate times the mismatch weight plus
kl_beta x the KL estimate when the KL is in the loss, detached, zero at padding;
``aggregate`` of it under ``cfg.loss_agg`` is the returned loss share.

With ``cfg.entropy_coeff != 0`` the entropy bonus is part of the loss (verl's ``entropy_coeff``):
``loss = pg - entropy_coeff * aggregate(entropy) + kl_beta * aggregate(KL)``, so ``entropy_BT``
must be given and must carry the gradient of the policy's entropy; the per-token loss then
includes ``-entropy_coeff * entropy``. With ``top_entropy_quantile`` < 1 the surrogate and the
entropy bonus act only on the tokens of ``entropy_keep_BT`` (as TRL's entropy mask); the KL
acts on every valid token.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from moe_rl.algorithms.aggregation import aggregate
from moe_rl.algorithms.config import SEQUENCE_MISMATCH_MODES, AlgorithmConfig
from moe_rl.algorithms.kl import kl_estimate
from moe_rl.algorithms.metrics import Metrics
from moe_rl.algorithms.mismatch import mismatch_weights, off_policy_sequence_mask
from moe_rl.algorithms.policy_loss import policy_loss, vespo_is_log_weight
from moe_rl.algorithms.ratio import clamped_ratio

# B responses, T tokens


# verl's geo_mean loss: the log of a zero weight (icepop's out-of-band tokens) is taken at this floor
GMPO_LOG_WEIGHT_EPS = 1e-10


def gmpo_sequence_weight(weight_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """GMPO's mismatch weight: the geometric mean of the response's token weights, on every token
    of the response, W_i = exp(sum_t m log(w + 1e-10) / (sum_t m + 1e-8)), as verl's
    compute_policy_loss_geo_mean (a geometric-mean objective takes a geometric-mean weight; a
    sequence mode's weight, one value per response, comes out the same up to the epsilons)."""
    m = mask_BT.to(weight_BT.dtype)
    log_w = torch.where(mask_BT, torch.log(weight_BT + GMPO_LOG_WEIGHT_EPS), torch.zeros_like(weight_BT))
    W_B = torch.exp(log_w.sum(-1) / (m.sum(-1) + 1e-8))
    return W_B[:, None].expand_as(weight_BT)


def actor_loss(
    cfg: AlgorithmConfig,
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_BT: Tensor,
    mask_BT: Tensor,
    *,
    num_global_tokens: float,
    num_global_seqs: float,
    ref_logp_BT: Optional[Tensor] = None,
    rollout_logp_BT: Optional[Tensor] = None,
    entropy_BT: Optional[Tensor] = None,
    entropy_keep_BT: Optional[Tensor] = None,
    with_token_loss: bool = False,
) -> Union[Tuple[Tensor, Metrics], Tuple[Tensor, Metrics, Tensor]]:
    """(loss share, metrics) for one micro-batch under ``cfg``; with ``with_token_loss``
    also the detached per-token loss [B, T] (zero at padding).

    ``adv_BT``: [B, T] or per response [B]. ``ref_logp_BT`` is required when
    ``cfg.kl_beta > 0`` and the KL is in the loss; ``rollout_logp_BT`` when
    ``cfg.mismatch != "none"``.
    """
    m = mask_BT.bool()
    denoms = dict(
        num_global_tokens=num_global_tokens, num_global_seqs=num_global_seqs,
        max_response_len=cfg.max_response_len,
    )
    weight_BT = None
    metrics = Metrics()
    if cfg.mismatch != "none":
        if rollout_logp_BT is None:
            raise ValueError(f"mismatch={cfg.mismatch} needs rollout_logp_BT (the engine's log-probs)")
        weight_BT, mm = mismatch_weights(
            old_logp_BT, rollout_logp_BT, m, cfg.mismatch, tis_cap=cfg.tis_cap, tis_floor=cfg.tis_floor,
            icepop_low=cfg.icepop_low, icepop_high=cfg.icepop_high,
            seq_mis_low=cfg.seq_mis_low, seq_mis_high=cfg.seq_mis_high,
        )
        metrics.merge(mm)
    elif rollout_logp_BT is not None:
        metrics.merge(mismatch_weights(old_logp_BT, rollout_logp_BT, m, "none")[1])
    # VESPO folds the correction into its sequence weight (as TRL) instead of multiplying the loss
    fold = cfg.policy_loss == "vespo" and weight_BT is not None
    out = policy_loss(
        cfg.policy_loss, logp_BT, old_logp_BT, adv_BT, m,
        clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip_c=cfg.dual_clip_c,
        sapo_tau_pos=cfg.sapo_tau_pos, sapo_tau_neg=cfg.sapo_tau_neg,
        vespo_k_pos=cfg.vespo_k_pos, vespo_lambda_pos=cfg.vespo_lambda_pos,
        vespo_k_neg=cfg.vespo_k_neg, vespo_lambda_neg=cfg.vespo_lambda_neg,
        vespo_log_is_B=vespo_is_log_weight(weight_BT, m, per_sequence=cfg.mismatch in SEQUENCE_MISMATCH_MODES)
        if fold else None,
    )
    loss_BT = out.loss_BT
    if weight_BT is not None and cfg.policy_loss == "gmpo":
        weight_BT = gmpo_sequence_weight(weight_BT, m)
    if weight_BT is not None and not fold:
        loss_BT = loss_BT * weight_BT
    if cfg.off_policy_mask > 0:  # after the surrogate and its weight, before the KL (as TRL)
        if rollout_logp_BT is None:
            raise ValueError("off_policy_mask needs rollout_logp_BT (the engine's log-probs)")
        keep_BT, om = off_policy_sequence_mask(logp_BT, rollout_logp_BT, adv_BT, m, cfg.off_policy_mask)
        loss_BT = loss_BT * keep_BT
        metrics.merge(om)
    if cfg.selects_entropy:  # the high-entropy tokens only (the KL below stays on every token, as TRL)
        if entropy_keep_BT is None:
            raise ValueError(f"top_entropy_quantile={cfg.top_entropy_quantile} needs entropy_keep_BT "
                             "(moe_rl.algorithms.entropy_select.high_entropy_mask)")
        keep_BT = entropy_keep_BT.bool() & m
        loss_BT = loss_BT * keep_BT.to(loss_BT.dtype)
        metrics.add_masked("actor/entropy_kept_frac", keep_BT.to(torch.float64), m)

    pg = aggregate(loss_BT, m, cfg.loss_agg, **denoms)
    total = pg
    metrics.add_sum("actor/pg_loss", pg)
    if cfg.kl_beta > 0 and cfg.kl_placement == "loss":
        if ref_logp_BT is None:
            raise ValueError(f"kl_beta={cfg.kl_beta} with kl_placement=loss needs ref_logp_BT")
        ratio_BT = None
        if cfg.kl_ratio_weighted:
            delta = torch.where(m, logp_BT - old_logp_BT.detach(), torch.zeros_like(logp_BT))
            ratio_BT = clamped_ratio(delta)
        kl_BT = kl_estimate(logp_BT, ref_logp_BT.detach(), cfg.kl_estimator, ratio_BT=ratio_BT,
                            straight_through=cfg.kl_straight_through)
        kl = aggregate(kl_BT, m, cfg.loss_agg, **denoms)
        total = total + cfg.kl_beta * kl
        metrics.add_sum("actor/kl_loss", kl)
        if with_token_loss:
            loss_BT = loss_BT + cfg.kl_beta * kl_BT

    if cfg.entropy_coeff != 0:
        if entropy_BT is None:
            raise ValueError(f"entropy_coeff={cfg.entropy_coeff} needs entropy_BT (the policy's entropy, with grad)")
        ent_BT = entropy_BT
        if cfg.selects_entropy:
            ent_BT = entropy_BT * (entropy_keep_BT.bool() & m).to(entropy_BT.dtype)
        ent = aggregate(ent_BT, m, cfg.loss_agg, **denoms)
        total = total - cfg.entropy_coeff * ent
        metrics.add_sum("actor/entropy_loss", ent.detach())
        if with_token_loss:
            loss_BT = loss_BT - cfg.entropy_coeff * ent_BT.detach()
    if entropy_BT is not None:
        metrics.add_masked("actor/entropy", entropy_BT.detach(), m)
    delta = torch.where(m, logp_BT - old_logp_BT, torch.zeros_like(logp_BT)).detach()
    metrics.add_masked("actor/ppo_kl", -delta, m)
    if out.seq_ratio_B is not None:
        has_B = m.any(-1)
        metrics.add_masked("actor/ratio_mean", out.seq_ratio_B, has_B,
                           min_name="actor/ratio_min", max_name="actor/ratio_max")
        metrics.add_masked("actor/seq_clipfrac", out.seq_clipped_B.to(torch.float64), torch.ones_like(has_B))
    else:
        metrics.add_masked("actor/ratio_mean", out.ratio_BT, m,
                           min_name="actor/ratio_min", max_name="actor/ratio_max")
    metrics.add_masked("actor/clipfrac", (out.clip_low_BT | out.clip_high_BT).to(torch.float64), m)
    metrics.add_masked("actor/clipfrac_low", out.clip_low_BT.to(torch.float64), m)
    metrics.add_masked("actor/clipfrac_high", out.clip_high_BT.to(torch.float64), m)
    metrics.add_masked("actor/dualclip_frac", out.dualclip_BT.to(torch.float64), m)
    if with_token_loss:
        return total, metrics, torch.where(m, loss_BT, torch.zeros_like(loss_BT)).detach()
    return total, metrics
