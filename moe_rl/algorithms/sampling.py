"""Sampling filters and length shaping (docs/algorithms.md, axis 6): DAPO and GFPO.

All functions work on the responses of one step: B responses, T tokens, with
``group_ids_B`` naming each response's prompt.

- ``informative_groups``: keep mask for groups whose rewards are not all equal (DAPO
  dynamic sampling; such a group's deviation from its mean is zero under every group
  estimator: it carries no signal and only dilutes the batch). ``fill_informative`` drives
  the "generate until enough informative groups, at most N extra rounds" loop around a
  caller-supplied generation function (the RL loop's); when the cap is hit it completes the
  batch with non-informative groups rather than failing the step.
- ``overlong_penalty``: DAPO's soft length penalty, added to the reward.
- ``overlong_filter_mask``: truncated responses get zero loss weight (their mask is
  cleared before the step's global counts, so they leave the denominators too, as DAPO).
- ``gfpo_select``: of G' sampled responses per group keep the ``keep`` shortest (or the
  highest reward per token). The caller computes advantages on the kept responses only,
  so the group statistics are those of the retained subset, as in the GFPO paper.
  Ties are broken by position in the batch (stable sort), so selection is deterministic.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, TypeVar

import torch
from torch import Tensor

from moe_rl.algorithms.advantages import group_stats
from moe_rl.algorithms.metrics import Metrics

# B responses, T tokens

G = TypeVar("G")


def informative_groups(rewards_B: Tensor, group_ids_B: Tensor) -> Tuple[Tensor, Metrics]:
    """Bool keep mask [B]: False for every response of a group whose rewards all equal."""
    st = group_stats(rewards_B.to(torch.float64), group_ids_B)
    metrics = Metrics().add_mean("rollout/zero_std_group_frac", st["all_equal_G"].sum(), st["all_equal_G"].numel())
    return ~st["all_equal_B"], metrics


def fill_informative(
    generate_round: Callable[[int], Sequence[G]],
    rewards_of: Callable[[G], Sequence[float]],
    *,
    num_groups: int,
    max_extra_rounds: int,
) -> Tuple[List[G], int, int]:
    """DAPO dynamic sampling: call ``generate_round(round index)`` (one batch of groups) until
    ``num_groups`` informative groups (two or more rewards, not all equal) are collected or
    ``max_extra_rounds`` rounds beyond the first have run.

    Returns ``(groups, rounds run, filled)``: the first ``num_groups`` informative groups in
    arrival order; when the cap is hit first, completed with the non-informative groups that
    arrived last (``filled`` of them, fewer if there are not enough), so that every step trains
    the same number of groups and its shapes stay fixed."""
    kept: List[G] = []
    spare: List[G] = []
    rounds = 0
    while len(kept) < num_groups and rounds <= max_extra_rounds:
        for group in generate_round(rounds):
            r = list(rewards_of(group))
            (kept if len(r) > 1 and max(r) != min(r) else spare).append(group)
        rounds += 1
    filled = min(max(0, num_groups - len(kept)), len(spare))
    return kept[:num_groups] + spare[len(spare) - filled:], rounds, filled


def overlong_penalty(lengths_B: Tensor, *, max_len: int, cache_len: int) -> Tensor:
    """DAPO soft overlong punishment: 0 up to L_max - L_c, linear down to -1 at L_max, -1 beyond."""
    if not 0 < cache_len < max_len:
        raise ValueError(f"overlong shaping needs 0 < cache_len ({cache_len}) < max_len ({max_len})")
    lengths = lengths_B.to(torch.float64)
    expected = max_len - cache_len
    ramp = (expected - lengths) / cache_len
    pen = torch.where(lengths <= expected, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), pen)


def overlong_filter_mask(mask_BT: Tensor, truncated_B: Tensor) -> Tensor:
    """``mask_BT`` with the tokens of truncated responses cleared (zero loss weight)."""
    return mask_BT.bool() & ~truncated_B.bool()[:, None]


def gfpo_select(
    group_ids_B: Tensor, lengths_B: Tensor, rewards_B: Tensor, *, keep: int, metric: str = "length"
) -> Tensor:
    """Bool keep mask [B]: per group the ``keep`` responses with the shortest length
    (``metric="length"``) or the highest reward / length (``"reward_per_token"``).
    A group with fewer than ``keep`` responses is rejected with a ValueError."""
    if metric == "length":
        score_B = -lengths_B.to(torch.float64)
    elif metric == "reward_per_token":
        score_B = rewards_B.to(torch.float64) / lengths_B.to(torch.float64).clamp(min=1)
    else:
        raise ValueError(f"gfpo metric {metric!r} is not one of length, reward_per_token")
    if keep <= 0:
        raise ValueError(f"gfpo keep ({keep}) must be > 0")
    keep_B = torch.zeros_like(group_ids_B, dtype=torch.bool)
    for g in torch.unique(group_ids_B).tolist():
        idx = (group_ids_B == g).nonzero().flatten()
        if idx.numel() < keep:
            raise ValueError(f"gfpo: group {g} has {idx.numel()} responses, fewer than keep={keep}")
        order = torch.sort(score_B[idx], descending=True, stable=True).indices
        keep_B[idx[order[:keep]]] = True
    return keep_B


def rollout_metrics(
    rewards_B: Tensor, group_ids_B: Tensor, lengths_B: Tensor, truncated_B: Tensor
) -> Metrics:
    """``rollout/reward_mean``, ``rollout/response_len_mean|max``, ``rollout/truncated_frac``,
    ``rollout/zero_std_group_frac`` over the step's responses."""
    n = rewards_B.numel()
    ones = torch.ones(n, dtype=torch.bool)
    m = Metrics()
    m.add_mean("rollout/reward_mean", rewards_B.to(torch.float64).sum(), n)
    m.add_masked("rollout/response_len_mean", lengths_B.to(torch.float64), ones, max_name="rollout/response_len_max")
    m.add_mean("rollout/truncated_frac", truncated_B.bool().sum(), n)
    m.merge(informative_groups(rewards_B, group_ids_B)[1])
    return m
