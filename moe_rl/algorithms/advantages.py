"""Advantage estimators (docs/algorithms.md, axis 1): rewards in, per-token advantages out.

Shapes: B responses, T response tokens (padded), K named rewards. ``group_ids_B`` says which
prompt each response belongs to; groups may have different sizes (ragged) and each uses its
own size. Call these on the step's responses before they are split into micro-batches.

Parallel semantics: the group statistics need a whole group, the batch statistics (grpo
``std_scope="batch"``, ``rloo_normalize``, the REINFORCE++ and gdpo whitening, gpg's alpha)
need the whole global batch. A process that holds the whole batch passes nothing. With data
parallelism each rank passes its own responses (whole groups) and ``batch_sum``, a function
that sums a tensor over the data-parallel ranks (``moe_rl.train.global_counts.dp_batch_sum``);
every rank must call with the same estimator and options, since the number and order of
``batch_sum`` calls depend on those alone, never on the data. This package itself never
communicates.

Differences from the papers and peers, and why:
- grpo: the std is the sample std (n-1) plus ``std_eps`` (1e-6, verl). A group of one,
  or a group whose rewards all equal, gets A = 0 exactly (not 0/eps noise). ``std_scope=
  "batch"`` (TRL scale_rewards="batch") divides by the sample std of every reward of the
  global batch plus ``std_eps`` (TRL adds 1e-4; one epsilon field serves both scopes).
- rloo: a group of one has no leave-one-out baseline; it gets A = 0. ``rloo_normalize``
  (TRL RLOOTrainer normalize_advantages) then re-normalizes A over every response of the
  global batch with the sample std plus ``std_eps`` (TRL: 1e-4).
- reinforce_pp / reinforce_pp_baseline: whitening is token-weighted over all valid tokens
  (as verl): mean and unbiased variance over tokens, (A - mean) * rsqrt(var + WHITEN_EPS).
  reinforce_pp discounts with ``gamma`` counting valid tokens only (a masked position carries
  the return unchanged, as verl 0.9.1; earlier verl restarted it at every masked position,
  which differs only on interior holes of a mask). reinforce_pp_baseline: a group of one has baseline 0 (A = r_i
  before the whitening), as verl.
- gdpo: the final batch whitening is over responses (one weight per response), using the
  same rsqrt(var + WHITEN_EPS) form; the paper normalizes over the batch without saying how
  tokens are weighted, and a per-response advantage is naturally whitened per response.
- opo, gpg: a group of one has baseline 0 (A = r_i, gpg alpha * r_i), as verl; a larger group
  whose rewards all equal gets exactly 0.
- pass_at_k: a group of one gets 0 (verl raises).
- KL in the reward (``token_penalty_BT`` = beta*k1 per token): for the token-level
  REINFORCE++ estimators the token reward is r_i on the last valid token minus the penalty
  of every token, summed backwards into returns; for the group estimators the summed penalty
  of the response is subtracted from its reward before the group statistics.
  reinforce_pp_baseline subtracts the group mean of the outcome rewards, then the penalty
  returns, as OpenRLHF (the REINFORCE++ authors' code) does, so A varies along the response;
  verl instead subtracts each response's summed penalty before the group mean, giving every
  token of a response the same value. Without KL in the reward the two agree.
- Rewards that are NaN or inf are rejected with a ValueError naming the group and values.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from moe_rl.algorithms.config import BASE_DEFAULTS
from moe_rl.algorithms.metrics import Metrics

# B responses, T tokens, K rewards, G groups

# Sums a tensor over the data-parallel ranks that hold the rest of the global batch.
BatchSum = Callable[[Tensor], Tensor]

# rsqrt(var + WHITEN_EPS) in the batch whitening (verl masked_whiten's 1e-8).
WHITEN_EPS = 1e-8

OUTCOME_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "opo", "gpg", "pass_at_k")


def _local_sum(x: Tensor) -> Tensor:
    return x


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
        "inv_B": inv_B,
        "max_B": max_G[inv_B],
        "n_B": n_G[inv_B],
        "mean_B": mean_G[inv_B],
        "dev_B": dev_B,
        "std_B": var_G.sqrt()[inv_B],
        "all_equal_B": (max_G == min_G)[inv_B],
        "all_equal_G": max_G == min_G,
    }


def batch_mean_var(
    values: Tensor, weight: Tensor, *, batch_sum: Optional[BatchSum] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """(total weight, weighted mean, unbiased weighted variance) over the global batch.

    Two passes, each one ``batch_sum`` call: the weight and the weighted sum, then the
    squared deviations from the global mean (no sum-of-squares cancellation)."""
    bsum = batch_sum or _local_sum
    w = weight.to(values.dtype)
    first = bsum(torch.stack([w.sum(), (values * w).sum()]))
    n = first[0]
    mean = first[1] / n.clamp(min=1)
    var = bsum((((values - mean) ** 2) * w).sum().reshape(1))[0] / (n - 1).clamp(min=1)
    return n, mean, var


def whiten(values: Tensor, weight: Tensor, eps: float = WHITEN_EPS, *, batch_sum: Optional[BatchSum] = None) -> Tensor:
    """(x - mean) * rsqrt(var + eps) with weighted mean and unbiased weighted variance over
    the global batch; zero where ``weight`` is 0."""
    _, mean, var = batch_mean_var(values, weight, batch_sum=batch_sum)
    return (values - mean) * torch.rsqrt(var + eps) * (weight.to(values.dtype) > 0)


def _reverse_cumsum(x_BT: Tensor) -> Tensor:
    return x_BT.flip(-1).cumsum(-1).flip(-1)


def outcome_advantages(
    estimator: str,
    rewards_B: Tensor,
    group_ids_B: Tensor,
    mask_BT: Tensor,
    *,
    std_eps: float = BASE_DEFAULTS["std_eps"],
    std_scope: str = BASE_DEFAULTS["std_scope"],
    gamma: float = BASE_DEFAULTS["gamma"],
    rloo_normalize: bool = BASE_DEFAULTS["rloo_normalize"],
    token_penalty_BT: Optional[Tensor] = None,
    batch_sum: Optional[BatchSum] = None,
) -> Tuple[Tensor, Metrics]:
    """Per-token advantages [B, T] (zero on padding) for one outcome reward per response.

    ``token_penalty_BT``: optional beta*k1 per token (KL placed in the reward).
    ``batch_sum``: see the module docstring (None: this call holds the whole batch).
    """
    if estimator not in OUTCOME_ESTIMATORS:
        raise ValueError(
            f"advantage estimator {estimator!r} is not one of {', '.join(OUTCOME_ESTIMATORS)} "
            "(gdpo: use gdpo_advantages)"
        )
    bsum = batch_sum or _local_sum
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
        if estimator == "reinforce_pp":
            ret_BT = discounted_returns(r_B, mask_BT, gamma, token_penalty_BT=pen_BT)
        else:
            dev_B = torch.where(st["n_B"] == 1, r_B, st["dev_B"])  # a group of one: baseline 0 (verl)
            ret_BT = dev_B[:, None].expand_as(mask_BT).clone()
            if pen_BT is not None:
                ret_BT = ret_BT - _reverse_cumsum(pen_BT)
        adv_BT = whiten(ret_BT, mask_BT, batch_sum=bsum)
    else:
        if pen_BT is not None:
            r_B = r_B - pen_BT.sum(-1)
        st = group_stats(r_B, group_ids_B)
        single_B = st["n_B"] == 1
        flat_B = ~single_B & st["all_equal_B"]  # a group of two or more whose rewards all equal
        if estimator == "grpo":
            if std_scope == "batch":
                _, _, var = batch_mean_var(r_B, torch.ones_like(r_B), batch_sum=bsum)
                a_B = st["dev_B"] / (var.sqrt() + std_eps)
            elif std_scope == "group":
                a_B = st["dev_B"] / (st["std_B"] + std_eps)
            else:
                raise ValueError(f"std_scope {std_scope!r} is not one of group, batch")
            a_B = torch.where(single_B | flat_B, torch.zeros_like(a_B), a_B)
        elif estimator == "dr_grpo":
            a_B = torch.where(single_B | flat_B, torch.zeros_like(r_B), st["dev_B"])
        elif estimator == "rloo":
            a_B = st["n_B"] / (st["n_B"] - 1).clamp(min=1) * st["dev_B"]
            a_B = torch.where(single_B | flat_B, torch.zeros_like(a_B), a_B)
            if rloo_normalize:
                _, mean, var = batch_mean_var(a_B, torch.ones_like(a_B), batch_sum=bsum)
                a_B = (a_B - mean) / (var.sqrt() + std_eps)
        elif estimator == "opo":
            len_B = mask_BT.sum(-1).to(r_B.dtype)
            inv_B = st["inv_B"]
            zeros_G = r_B.new_zeros(int(inv_B.max()) + 1 if inv_B.numel() else 0)
            num_G = zeros_G.index_add(0, inv_B, len_B * r_B)
            den_G = zeros_G.index_add(0, inv_B, len_B)
            base_B = (num_G / den_G.clamp(min=1))[inv_B]
            base_B = torch.where(single_B, torch.zeros_like(base_B), base_B)
            a_B = torch.where(flat_B, torch.zeros_like(r_B), r_B - base_B)
        elif estimator == "gpg":
            counts = bsum(torch.stack([r_B.new_tensor(float(r_B.numel())), (r_B != 0).sum().to(r_B.dtype)]))
            alpha = counts[0] / counts[1].clamp(min=1)
            dev_B = torch.where(single_B, r_B, st["dev_B"])
            a_B = torch.where(flat_B, torch.zeros_like(r_B), alpha * dev_B)
        else:  # pass_at_k
            a_B = _pass_at_k(r_B, st, std_eps)
        adv_BT = a_B[:, None] * mask_BT
    metrics.add_mean("rollout/zero_std_group_frac", st["all_equal_G"].sum(), st["all_equal_G"].numel())
    return adv_BT, metrics


def _pass_at_k(r_B: Tensor, st: Dict[str, Tensor], std_eps: float) -> Tensor:
    """The best response of each group (the first, if tied): (r_(1) - r_(2)) / (std_g + eps);
    every other response 0. A tie at the top gives r_(1) - r_(2) = 0."""
    inv_B = st["inv_B"]
    num_groups = int(inv_B.max()) + 1 if inv_B.numel() else 0
    idx_B = torch.arange(r_B.numel(), device=r_B.device)
    at_max_B = r_B == st["max_B"]
    first_G = torch.full((num_groups,), r_B.numel(), dtype=idx_B.dtype, device=r_B.device).scatter_reduce(
        0, inv_B, torch.where(at_max_B, idx_B, r_B.numel()), "amin")
    best_B = idx_B == first_G[inv_B]
    others_B = torch.where(best_B, torch.full_like(r_B, -torch.inf), r_B)
    second_G = r_B.new_full((num_groups,), -torch.inf).scatter_reduce(0, inv_B, others_B, "amax")
    gap_B = st["max_B"] - second_G[inv_B]
    a_B = gap_B / (st["std_B"] + std_eps)
    return torch.where(best_B & (st["n_B"] > 1), a_B, torch.zeros_like(r_B))


def discounted_returns(
    rewards_B: Tensor, mask_BT: Tensor, gamma: float, *, token_penalty_BT: Optional[Tensor] = None
) -> Tensor:
    """REINFORCE++ token returns [B, T]: token reward u_t = r_i on the last valid token minus
    ``token_penalty_BT`` (beta*k1, masked); from the end R_t = u_t + gamma*R_{t+1} at a valid
    t, R_t = R_{t+1} at a masked one (gamma counts valid tokens only)."""
    m = mask_BT.bool()
    B, T = m.shape
    pos_T = torch.arange(T, device=m.device)
    last_B = torch.where(m, pos_T, -1).amax(-1) if T else torch.full((B,), -1, device=m.device)
    u_BT = torch.where(pos_T[None] == last_B[:, None], rewards_B[:, None], torch.zeros((), dtype=rewards_B.dtype))
    u_BT = u_BT.to(rewards_B.dtype)
    if token_penalty_BT is not None:
        u_BT = u_BT - torch.where(m, token_penalty_BT.to(u_BT.dtype), 0.0)
    if gamma == 1.0:
        return _reverse_cumsum(torch.where(m, u_BT, 0.0))
    out_BT = torch.empty_like(u_BT)
    R_B = u_BT.new_zeros(B)
    for t in range(T - 1, -1, -1):
        R_B = torch.where(m[:, t], u_BT[:, t] + gamma * R_B, R_B)
        out_BT[:, t] = R_B
    return out_BT


def gdpo_advantages(
    rewards: Dict[str, Tensor],
    weights: Dict[str, float],
    group_ids_B: Tensor,
    mask_BT: Tensor,
    *,
    std_eps: float = BASE_DEFAULTS["std_eps"],
    token_penalty_BT: Optional[Tensor] = None,
    batch_sum: Optional[BatchSum] = None,
) -> Tuple[Tensor, Metrics]:
    """GDPO: each named reward normalized within its group, weighted sum, whitened over the
    responses of the global batch (``batch_sum``: see the module docstring)."""
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
    a_B = whiten(total_B, torch.ones_like(total_B), batch_sum=batch_sum)
    return a_B[:, None] * mask_BT, metrics


def process_advantages(
    step_rewards_BT: Tensor,
    step_end_BT: Tensor,
    group_ids_B: Tensor,
    mask_BT: Tensor,
    *,
    std_eps: float = BASE_DEFAULTS["std_eps"],
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
    batch_sum: Optional[BatchSum] = None,
) -> Tuple[Tensor, Metrics]:
    """Dispatch on ``cfg`` (an ``AlgorithmConfig``).

    ``rewards``: a [B] tensor, or for gdpo a dict name -> [B], or with
    ``cfg.process_rewards`` a [B, T] tensor of step rewards with ``step_end_BT``.
    ``batch_sum``: None when this call holds the whole global batch; with data parallelism
    ``moe_rl.train.global_counts.dp_batch_sum(dp_group)``, called on every DP rank with that
    rank's responses (whole groups).
    """
    if cfg.process_rewards:
        if step_end_BT is None:
            raise ValueError("process_rewards needs step_end_BT (which tokens end a step)")
        return process_advantages(rewards, step_end_BT, group_ids_B, mask_BT, std_eps=cfg.std_eps)
    if cfg.advantage == "gdpo":
        if not isinstance(rewards, dict):
            raise ValueError("advantage=gdpo needs rewards as a dict name -> [B] tensor")
        return gdpo_advantages(
            rewards, cfg.reward_weight_map, group_ids_B, mask_BT, std_eps=cfg.std_eps,
            token_penalty_BT=token_penalty_BT, batch_sum=batch_sum,
        )
    if isinstance(rewards, dict):
        if len(rewards) != 1:
            raise ValueError(f"advantage={cfg.advantage} takes one reward, got {sorted(rewards)}")
        (rewards,) = rewards.values()
    return outcome_advantages(
        cfg.advantage, rewards, group_ids_B, mask_BT, std_eps=cfg.std_eps, std_scope=cfg.std_scope,
        gamma=cfg.gamma, rloo_normalize=cfg.rloo_normalize, token_penalty_BT=token_penalty_BT, batch_sum=batch_sum,
    )
