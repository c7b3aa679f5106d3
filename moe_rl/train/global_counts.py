"""Global statistics of one step over data parallelism: loss denominators and batch sums.

``count_global``: the loss denominators, counted before the first backward.

The aggregation modes (``moe_rl.algorithms.aggregation``) divide by the number of valid
tokens / responses of the whole step: every micro-batch on every data-parallel rank.
Each rank counts its own micro-batches and one all-reduce (SUM over ``dp_group``) gives
the step totals. Every rank of ``dp_group`` must call ``count_global`` with the masks it
will train on (after overlong filtering and any other mask edits), and they all receive
the same ``GlobalCounts``. ``dp_group=None`` means a single process (no communication).

The process group is passed in; this module never reads Megatron's global group registry.
With pipeline parallelism only the ranks that compute the loss need the counts, but every
DP replica must contribute its micro-batches, so pass the data-parallel group of the
last pipeline stage (or count on all stages with their own DP group: the data is the same).

Context parallelism: CP peers hold the same whole sequences (like TP peers; the model splits
them internally and ``policy_head`` gathers the per-token values back), so the counts are
over the DP group WITHOUT the CP ranks (``Groups.dp_group``): counting over DP x CP would
count every token CP times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from moe_rl.parallel.collectives import all_reduce

# B responses, T tokens


@dataclass(frozen=True)
class GlobalCounts:
    """Step-wide denominators, identical on every rank of the data-parallel group."""

    num_tokens: int  # valid (loss-masked) response tokens over all micro-batches and DP ranks
    num_seqs: int  # every response (rows of the masks, empty ones included) over all micro-batches and DP ranks

    def as_kwargs(self) -> Dict[str, int]:
        """Keyword arguments for ``aggregate`` / ``actor_loss``."""
        return {"num_global_tokens": self.num_tokens, "num_global_seqs": self.num_seqs}


def count_global(masks_BT: Sequence[Tensor], *, dp_group: Optional[dist.ProcessGroup] = None) -> GlobalCounts:
    """Sum valid tokens and responses over this rank's micro-batch masks, then over ``dp_group``.

    Every response counts toward ``num_seqs``, an empty (zero-token) one included: it adds 0
    to a sequence-mean numerator but 1 to its denominator, as verl's trainer (global batch
    size = mini-batch x n) and TRL's losses (B rows) divide. Counting only non-empty ones
    would scale every sequence-mean loss and gradient by N / (N - #empty).
    """
    device = masks_BT[0].device if len(masks_BT) else torch.device("cpu")
    local = torch.zeros(2, dtype=torch.int64, device=device)
    for mask_BT in masks_BT:
        m = mask_BT.bool()
        local[0] += m.sum()
        local[1] += m.shape[0]
    if dp_group is not None:
        local = all_reduce(local, op=dist.ReduceOp.SUM, group=dp_group)
    tokens, seqs = local.tolist()
    return GlobalCounts(num_tokens=int(tokens), num_seqs=int(seqs))


def dp_batch_sum(dp_group: Optional[dist.ProcessGroup]) -> Callable[[Tensor], Tensor]:
    """The ``batch_sum`` of ``moe_rl.algorithms.advantages``: a tensor summed over ``dp_group``.

    The advantage estimators with batch statistics (grpo std_scope=batch, rloo_normalize, the
    REINFORCE++ and gdpo whitening, gpg's alpha) call it on every rank in the same order, so
    every rank of ``dp_group`` must compute advantages for its own responses (whole groups) with
    the same config. ``dp_group=None``: the identity (one process holds the whole batch).
    """

    def batch_sum(x: Tensor) -> Tensor:
        if dp_group is None:
            return x
        return all_reduce(x.detach().clone(), op=dist.ReduceOp.SUM, group=dp_group)

    return batch_sum
