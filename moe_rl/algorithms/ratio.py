"""Importance ratios from log-probs, with the one log-ratio clamp (docs/algorithms.md).

Every ratio the algorithms form from two log-probs (the token ratio rho and the sequence
ratios of the surrogates, the k3 KL argument, the mismatch weight w) clamps its log to
+-``LOG_RATIO_CLAMP`` before ``exp``: a stale or wild token then gives a large but finite
ratio instead of inf (and inf * 0 = NaN in a masked or clipped branch). The clamp sits in
the forward value only; inside the bound the gradient is that of the unclamped ratio, and
outside it is zero, as ``torch.clamp`` gives.
"""

from __future__ import annotations

import torch
from torch import Tensor

# exp(20) ~ 4.9e8: far beyond any clip bound, far below float32/bfloat16 overflow (~3.4e38).
LOG_RATIO_CLAMP = 20.0


def clamp_log_ratio(log_ratio: Tensor) -> Tensor:
    """``log_ratio`` clamped to [-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP], any shape."""
    return log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def clamped_ratio(log_ratio: Tensor) -> Tensor:
    """exp(clamp(log_ratio, +-LOG_RATIO_CLAMP)), any shape."""
    return torch.exp(clamp_log_ratio(log_ratio))
