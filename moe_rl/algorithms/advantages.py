"""Advantage estimators (docs/algorithms.md, axis 1): rewards in, per-token advantages out.

Shapes: B responses (the whole global batch of one step), T response tokens (padded),
K named rewards. ``group_ids_B`` says which prompt each response belongs to; groups may
have different sizes (ragged) and each uses its own size. Call these on the full batch
of a step (the rollout's output), before it is split into micro-batches: batch-wide
whitening needs every response.

Differences from the papers, and why:
- grpo: the std is the sample std (n-1) plus ``std_eps`` (1e-6, verl). A group of one,
  or a group whose rewards all equal, gets A = 0 exactly (not 0/eps noise).
- rloo: a group of one has no leave-one-out baseline; it gets A = 0.
- reinforce_pp / reinforce_pp_baseline: whitening is token-weighted over all valid tokens
  (as verl): mean and unbiased variance over tokens, (A - mean) * rsqrt(var + 1e-8).
- gdpo: the final batch whitening is over responses (one weight per response), using the
  same rsqrt(var + 1e-8) form; the paper normalizes over the batch without saying how
  tokens are weighted, and a per-response advantage is naturally whitened per response.
- KL in the reward (``token_penalty_BT`` = beta*k1 per token): for the token-level
  REINFORCE++ estimators the return at t is r_i - sum_{s>=t} penalty_s (gamma = 1), then
  whitened; for the group estimators (grpo, dr_grpo, rloo, gdpo) the summed penalty of the
  response is subtracted from its reward before the group statistics.
- Rewards that are NaN or inf are rejected with a ValueError naming the group and values.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from moe_rl.algorithms.metrics import Metrics

# B responses, T tokens, K rewards, G groups


def _check_finite(rewards_B: Tensor, group_ids_B: Tensor, what: str = "reward") -> None:
    bad = ~torch.isfinite(rewards_B)
    if bad.any():
        g = group_ids_B[bad.nonzero()[0, 0]]
        vals = rewards_B[group_ids_B == g].tolist()
        raise ValueError(f"{what} of group {int(g)} is not finite: {vals}")


def group_stats(values_B: Tensor, group_ids_B: Tensor) -> Dict[str, Tensor]:
    """Per-response view of its group's size, mean, sample std and all-equal flag."""
    if values_B.dim() != 1 or group_ids_B.shape != values_B.shape:
        raise ValueError(
            f"rewards must be [B] with group_ids [B]; got {tuple(values_B.shape)} and {tuple(group_ids_B.shape)}"
        )
    _, inv_B = torch.unique(group_ids_B, return_inverse=True)
    num_groups = int(inv_B.max()) + 1 if inv_B.numel() else 0
    zeros_G = values_B.new_zeros(num_groups)
    n_G = zeros_G.index_add(0, inv_B, torch.ones_like(values_B))
    mean_G = zeros_G.index_add(0, inv_B, values_B) / n_G
    dev_B = values_B - mean_G[inv_B]
    var_G = zeros_G.index_add(0, inv_B, dev_B**2) / (n_G - 1).clamp(min=1)
    max_G = zeros_G.scatter_reduce(0, inv_B, values_B, "amax", include_self=False)
    min_G = zeros_G.scatter_reduce(0, inv_B, values_B, "amin", include_self=False)
    return {
        "n_B": n_G[inv_B],
        "mean_B": mean_G[inv_B],
        "dev_B": dev_B,
        "std_B": var_G.sqrt()[inv_B],
        "all_equal_B": (max_G == min_G)[inv_B],
        "all_equal_G": max_G == min_G,
    }


def whiten(values: Tensor, weight: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) * rsqrt(var + eps) with weighted mean and unbiased weighted variance."""
    w = weight.to(values.dtype)
    n = w.sum()
    mean = (values * w).sum() / n.clamp(min=1)
    var = (((values - mean) ** 2) * w).sum() / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + eps) * (w > 0)


def _reverse_cumsum(x_BT: Tensor) -> Tensor:
    return x_BT.flip(-1).cumsum(-1).flip(-1)


def outcome_advantages(
    estimator: str,
    rewards_B: Tensor,
    group_ids_B: Tensor,
    mask_BT: Tensor,
    *,
    std_eps: float = 1e-6,
    token_penalty_BT: Optional[Tensor] = None,
) -> Tuple[Tensor, Metrics]:
    """Per-token advantages [B, T] (zero on padding) for one outcome reward per response.

    ``token_penalty_BT``: optional beta*k1 per token (KL placed in the reward).
    """
    mask_BT = mask_BT.bool()
    r_B = rewards_B.to(torch.promote_types(rewards_B.dtype, torch.float32))
    _check_finite(r_B, group_ids_B)
    pen_BT = None
    if token_penalty_BT is not None:
        pen_BT = torch.where(mask_BT, token_penalty_BT.to(r_B.dtype), 0.0)
        _check_finite(pen_BT.sum(-1), group_ids_B, "KL penalty")
    metrics = Metrics()
    metrics.add_mean("rollout/reward_mean", r_B.sum(), r_B.numel())

    if estimator in ("reinforce_pp", "reinforce_pp_baseline"):
        st = group_stats(r_B, group_ids_B)
        base_B = r_B if estimator == "reinforce_pp" else st["dev_B"]
        ret_BT = base_B[:, None].expand_as(mask_BT).clone()
        if pen_BT is not None:
            ret_BT = ret_BT - _reverse_cumsum(pen_BT)
        adv_BT = whiten(ret_BT, mask_BT)
    else:
        if pen_BT is not None:
            r_B = r_B - pen_BT.sum(-1)
        st = group_stats(r_B, group_ids_B)
        single_B = st["n_B"] == 1
        if estimator == "grpo":
            a_B = st["dev_B"] / (st["std_B"] + std_eps)
        elif estimator == "dr_grpo":
            a_B = st["dev_B"]
        elif estimator == "rloo":
            a_B = st["n_B"] / (st["n_B"] - 1).clamp(min=1) * st["dev_B"]
        else:
            raise ValueError(
                f"advantage estimator {estimator!r} is not one of grpo, dr_grpo, rloo, reinforce_pp, "
                "reinforce_pp_baseline (gdpo: use gdpo_advantages)"
            )
        a_B = torch.where(single_B | st["all_equal_B"], torch.zeros_like(a_B), a_B)
        adv_BT = a_B[:, None] * mask_BT
    metrics.add_mean("rollout/zero_std_group_frac", st["all_equal_G"].sum(), st["all_equal_G"].numel())
    return adv_BT, metrics


def gdpo_advantages(
    rewards: Dict[str, Tensor],
    weights: Dict[str, float],
    group_ids_B: Tensor,
    mask_BT: Tensor,
    *,
    std_eps: float = 1e-6,
    token_penalty_BT: Optional[Tensor] = None,
) -> Tuple[Tensor, Metrics]:
    """GDPO: each named reward normalized within its group, weighted sum, whitened over responses."""
    if set(rewards) != set(weights):
        raise ValueError(
            f"gdpo rewards {sorted(rewards)} and reward_weights {sorted(weights)} must name the same rewards"
        )
    mask_BT = mask_BT.bool()
    total_B = None
    metrics = Metrics()
    for name in sorted(rewards):
        r_B = rewards[name].to(torch.promote_types(rewards[name].dtype, torch.float32))
        _check_finite(r_B, group_ids_B, f"reward {name!r}")
        st = group_stats(r_B, group_ids_B)
        a_B = st["dev_B"] / (st["std_B"] + std_eps)
        a_B = torch.where((st["n_B"] == 1) | st["all_equal_B"], torch.zeros_like(a_B), a_B)
        total_B = weights[name] * a_B if total_B is None else total_B + weights[name] * a_B
        metrics.add_mean(f"rollout/reward_mean/{name}", r_B.sum(), r_B.numel())
    assert total_B is not None, "gdpo needs at least one reward"
    if token_penalty_BT is not None:
        total_B = total_B - torch.where(mask_BT, token_penalty_BT.to(total_B.dtype), 0.0).sum(-1)
    a_B = whiten(total_B, torch.ones_like(total_B))
    return a_B[:, None] * mask_BT, metrics


def process_advantages(
    step_rewards_BT: Tensor,
    step_end_BT: Tensor,
    group_ids_B: Tensor,
    mask_BT: Tensor,
    *,
    std_eps: float = 1e-6,
) -> Tuple[Tensor, Metrics]:
    """Process supervision: ``step_rewards_BT`` holds each step's reward at the token where
    the step ends (``step_end_BT`` True there). All step rewards of a group are normalized
    together (sample std + eps; one step or all equal -> 0); A_{i,t} is the sum of the
    normalized rewards of the steps ending at or after t."""
    mask_BT = mask_BT.bool()
    end_BT = step_end_BT.bool() & mask_BT
    r_BT = step_rewards_BT.to(torch.promote_types(step_rewards_BT.dtype, torch.float32))
    steps_N = r_BT[end_BT]
    gid_N = group_ids_B[:, None].expand_as(end_BT)[end_BT]
    _check_finite(steps_N, gid_N, "step reward")
    st = group_stats(steps_N, gid_N)
    norm_N = st["dev_B"] / (st["std_B"] + std_eps)
    norm_N = torch.where((st["n_B"] == 1) | st["all_equal_B"], torch.zeros_like(norm_N), norm_N)
    norm_BT = torch.zeros_like(r_BT)
    norm_BT[end_BT] = norm_N
    metrics = Metrics().add_mean("rollout/step_reward_mean", steps_N.sum(), steps_N.numel())
    return _reverse_cumsum(norm_BT) * mask_BT, metrics


def compute_advantages(
    cfg,
    rewards,
    group_ids_B: Tensor,
    mask_BT: Tensor,
    *,
    token_penalty_BT: Optional[Tensor] = None,
    step_end_BT: Optional[Tensor] = None,
) -> Tuple[Tensor, Metrics]:
    """Dispatch on ``cfg`` (an ``AlgorithmConfig``).

    ``rewards``: a [B] tensor, or for gdpo a dict name -> [B], or with
    ``cfg.process_rewards`` a [B, T] tensor of step rewards with ``step_end_BT``.
    """
    if cfg.process_rewards:
        if step_end_BT is None:
            raise ValueError("process_rewards needs step_end_BT (which tokens end a step)")
        return process_advantages(rewards, step_end_BT, group_ids_B, mask_BT, std_eps=cfg.std_eps)
    if cfg.advantage == "gdpo":
        if not isinstance(rewards, dict):
            raise ValueError("advantage=gdpo needs rewards as a dict name -> [B] tensor")
        return gdpo_advantages(
            rewards, cfg.reward_weight_map, group_ids_B, mask_BT, std_eps=cfg.std_eps, token_penalty_BT=token_penalty_BT
        )
    if isinstance(rewards, dict):
        if len(rewards) != 1:
            raise ValueError(f"advantage={cfg.advantage} takes one reward, got {sorted(rewards)}")
        (rewards,) = rewards.values()
    return outcome_advantages(
        cfg.advantage, rewards, group_ids_B, mask_BT, std_eps=cfg.std_eps, token_penalty_BT=token_penalty_BT
    )
