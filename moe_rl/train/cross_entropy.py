"""Token cross-entropy as a pluggable loss for ``schedule.forward_backward`` (next-token
training in the quickstart and the invariance tests), and the step-loss reduction."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_rl.parallel.groups import Groups
from moe_rl.train.schedule import LossFn


def token_cross_entropy(global_tokens: float) -> LossFn:
    """Loss over micro-batches with ``labels`` [B, S] and optional ``mask`` [B, S]: the sum of
    masked token cross-entropies divided by ``global_tokens`` (all micro-batches, all DP ranks),
    computed on the vocabulary-parallel logits."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def loss_fn(logits_BSV, mb):
        ce_SB = vocab_parallel_cross_entropy(logits_BSV.float().transpose(0, 1).contiguous(),
                                             mb["labels"].t().contiguous())
        ce_BS = ce_SB.t()
        if "mask" in mb:
            ce_BS = ce_BS * mb["mask"]
        loss = ce_BS.sum() / global_tokens
        return loss, {"loss": loss.detach().clone()}

    return loss_fn


def step_loss(metrics: list[dict], groups: Groups, key: str = "loss") -> float:
    """Sum of ``key`` over one step's micro-batches and DP ranks, the same value on every rank.

    ``metrics`` is what ``forward_backward`` returned (filled on the last pipeline stage)."""
    local = torch.tensor([sum(float(m[key]) for m in metrics)], dtype=torch.float64)
    if groups.is_last_stage:
        dist.all_reduce(local, group=groups.dp_group)
    else:
        local.fill_(float("-inf"))
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    return float(local)
