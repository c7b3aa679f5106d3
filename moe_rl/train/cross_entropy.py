"""Token cross-entropy as a pluggable loss for ``schedule.forward_backward`` (next-token
training in the quickstart and the invariance tests), and the step-loss reduction."""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_rl.parallel.collectives import all_reduce
from moe_rl.parallel.context_parallel import gather_sequence, slice_sequence
from moe_rl.parallel.groups import Groups
from moe_rl.train.schedule import LossFn


def token_cross_entropy(global_tokens: float, *, cp_group=None) -> LossFn:
    """Loss over micro-batches with ``labels`` [B, S] and optional ``mask`` [B, S]: the sum of
    masked token cross-entropies divided by ``global_tokens`` (all micro-batches, all DP ranks),
    computed on the vocabulary-parallel logits. Under context parallelism (``cp_group``,
    ``Groups.cp_group``) the logits hold this CP rank's tokens: their cross-entropies are
    gathered into whole sequences."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    cp = cp_group.size() if cp_group is not None else 1

    def loss_fn(logits_BSV, mb):
        labels_BS = slice_sequence(mb["labels"], cp, cp_group.rank()) if cp > 1 else mb["labels"]
        ce_SB = vocab_parallel_cross_entropy(logits_BSV.float().transpose(0, 1).contiguous(),
                                             labels_BS.t().contiguous())
        ce_BS = gather_sequence(ce_SB.t(), cp_group if cp > 1 else None)
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
        local = all_reduce(local, group=groups.dp_group)
    else:
        local.fill_(float("-inf"))
    local = all_reduce(local, op=dist.ReduceOp.MAX)
    return float(local)
