"""Loss aggregation (docs/algorithms.md, axis 4): token losses [B, T] -> one scalar.

Every mode divides by denominators of the GLOBAL batch of one optimizer step (all
micro-batches on all data-parallel ranks), passed in as keyword arguments; count them
before the first backward with ``moe_rl.train.global_counts``. The value returned is
this micro-batch's *share* of the step loss: summing it over every micro-batch on every
rank gives the loss of the whole batch, so gradient accumulation gives the same
gradient as one big batch. Consequences for the caller:
- do not divide by the number of micro-batches (Megatron's schedule does
  ``loss /= num_microbatches``: multiply back, or pass the loss so that it cancels);
- if the data-parallel gradient reduction averages instead of summing, multiply the
  loss by the data-parallel world size.

``num_global_seqs`` counts every response of the step, empty (zero-token) ones included:
they add 0 to the numerator and 1 to N_seq, as verl's trainer and TRL's losses divide.

``seq-mean-token-mean`` needs a response's own token count, so a response must not be
split across micro-batches (it never is: micro-batches hold whole responses).
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_rl.algorithms.config import LOSS_AGGS

# B responses, T tokens



def aggregate(
    loss_BT: Tensor,
    mask_BT: Tensor,
    mode: str,
    *,
    num_global_tokens: float,
    num_global_seqs: float,
    max_response_len: float,
) -> Tensor:
    """This micro-batch's share of the step loss under ``mode``.

    token-mean:              sum m*l / num_global_tokens
    seq-mean-token-mean:     sum_i (sum_t m*l / |o_i|) / num_global_seqs
    seq-mean-token-sum:      sum m*l / num_global_seqs
    seq-mean-token-sum-norm: sum m*l / (num_global_seqs * max_response_len)
    token-sum:               sum m*l (no denominator; verl agg_loss "token-sum")
    A zero denominator (nothing to train on anywhere) gives a zero loss that still
    carries the graph.
    """
    mask = mask_BT.bool()
    lm_BT = torch.where(mask, loss_BT, torch.zeros_like(loss_BT))
    if mode == "token-sum":
        return lm_BT.sum()
    if mode == "token-mean":
        num, den = lm_BT.sum(), num_global_tokens
    elif mode == "seq-mean-token-mean":
        len_B = mask.sum(-1).clamp(min=1).to(loss_BT.dtype)
        num, den = (lm_BT.sum(-1) / len_B).sum(), num_global_seqs
    elif mode == "seq-mean-token-sum":
        num, den = lm_BT.sum(), num_global_seqs
    elif mode == "seq-mean-token-sum-norm":
        if max_response_len <= 0:
            raise ValueError(f"seq-mean-token-sum-norm needs max_response_len > 0, got {max_response_len}")
        num, den = lm_BT.sum(), num_global_seqs * max_response_len
    else:
        raise ValueError(f"loss aggregation {mode!r} is not one of {', '.join(LOSS_AGGS)}")
    den = float(den)
    if den < 0:
        raise ValueError(f"global denominator for {mode} must be >= 0, got {den}")
    if den == 0:
        assert not mask.any(), f"{mode}: local valid tokens but a zero global denominator"
        return num * 0.0
    return num / den
