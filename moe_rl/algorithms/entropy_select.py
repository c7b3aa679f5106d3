"""High-entropy token selection (docs/algorithms.md, "Entropy"): train only the "forking" tokens.

Wang et al. 2025 ("Beyond the 80/20 rule") keep the policy gradient of the top 20% of tokens by
entropy; TRL's ``top_entropy_quantile``. With ``algorithm.top_entropy_quantile = q < 1`` a valid
token keeps its loss when its entropy is at least the ``1 - q`` quantile of the entropies of the
valid tokens it is trained with; the others get a loss weight of zero (like the mismatch masks,
the aggregation denominators do not change).

Which entropies, over which tokens: the old policy's (the trainer's scoring pass of the rollout
batch, stage 5 of the loop), over every valid token of one optimizer step's mini-batch on every
data-parallel rank. The mask is therefore fixed before the first update and does not depend on
how the step is cut into micro-batches or ranks. TRL takes the current policy's entropies of one
micro-batch (gathered over processes); the two agree on the first optimizer step of a batch
trained as one micro-batch.

The quantile is torch.quantile's linear interpolation, computed by sorting (torch.quantile
refuses inputs of more than 2^24 values, a few long responses of a large batch).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def entropy_threshold(values_N: Tensor, quantile: float) -> Optional[float]:
    """The ``1 - quantile`` quantile (linear interpolation) of ``values_N``: tokens at or above it
    are the top ``quantile`` fraction. None when there are no values (nothing to select)."""
    if not 0 < quantile <= 1:
        raise ValueError(f"top_entropy_quantile must be in (0, 1], got {quantile}")
    v = values_N.detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        return None
    v = torch.sort(v).values
    pos = (v.numel() - 1) * (1.0 - quantile)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def high_entropy_mask(entropy_BT: Tensor, mask_BT: Tensor, threshold: Optional[float]) -> Tensor:
    """Bool [B, T]: valid tokens whose entropy is >= ``threshold`` (all False when it is None)."""
    m = mask_BT.bool()
    if threshold is None:
        return torch.zeros_like(m)
    return m & (entropy_BT.detach().to(torch.float64) >= threshold)
