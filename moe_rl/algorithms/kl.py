"""Per-token KL estimators to the reference policy (docs/algorithms.md, axis 5).

x = logp - ref_logp on tokens sampled from the (old) policy.
- k1 = x (unbiased, can be negative)
- k2 = x^2 / 2
- k3 = exp(-x) + x - 1 (Schulman's low-variance estimator, >= 0), x clamped to +-20 (the
  log-ratio clamp of ``ratio.py``) and the value clamped to <= 10 (as verl's ``low_var_kl``),
  so one wild token cannot blow up.
- abs = |x| (verl kl_penalty "abs"; gradient sign(x)).

Straight-through (verl's "+" suffix, e.g. "k3+"): sg(kX) + k2 - sg(k2), the value of the
chosen estimator (with its clamps) and the gradient of k2, which is x, also where k3's
clamps bind (there k3 itself has zero gradient).

Ratio-weighted k3 (DeepSeek-V3.2): the samples come from pi_old, not pi_theta, so the
estimate of KL(pi_theta || pi_ref) is weighted by rho = pi_theta / pi_old. rho keeps its
gradient here: d/dtheta E_old[rho * k3] is exactly the gradient of E_theta[k3]; a
detached rho would drop the score-function term and bias the gradient.

KL in the reward uses k1 on the old policy (no gradient): ``reward_penalty`` gives beta*k1
per token for ``advantages.*(token_penalty_BT=...)``. Its beta is fixed, or adaptive
(``kl_target`` > 0; Ziegler et al. 2019, verl's ``kl_ctrl.type=adaptive``): after each batch
``adaptive_kl_coef`` moves beta toward the target by the measured ``sequence_mean_kl``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe_rl.algorithms.config import KL_ESTIMATORS
from moe_rl.algorithms.ratio import clamp_log_ratio

# B responses, T tokens

K3_MAX = 10.0


def kl_estimate(
    logp_BT: Tensor, ref_logp_BT: Tensor, estimator: str, *, ratio_BT: Optional[Tensor] = None,
    straight_through: bool = False,
) -> Tensor:
    """Per-token KL estimate [B, T]; ``ratio_BT`` (k3 only) weights it by rho.

    ``straight_through``: the estimator's value with k2's gradient, sg(kX) + k2 - sg(k2)."""
    x = logp_BT - ref_logp_BT
    if estimator == "k1":
        kl = x
    elif estimator == "k2":
        kl = 0.5 * x * x
    elif estimator == "k3":
        xc = clamp_log_ratio(x)
        kl = (torch.exp(-xc) + xc - 1).clamp(max=K3_MAX)
    elif estimator == "abs":
        kl = x.abs()
    else:
        raise ValueError(f"kl estimator {estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")
    if straight_through and estimator != "k2":
        k2 = 0.5 * x * x
        kl = kl.detach() + k2 - k2.detach()
    if ratio_BT is not None:
        if estimator != "k3":
            raise ValueError(f"ratio weighting applies to k3 only, got {estimator}")
        kl = ratio_BT * kl
    return kl


def reward_penalty(old_logp_BT: Tensor, ref_logp_BT: Tensor, mask_BT: Tensor, *, beta: float) -> Tensor:
    """beta * k1 per token (detached), zero on padding: subtract from the token rewards."""
    pen = beta * (old_logp_BT - ref_logp_BT).detach()
    return torch.where(mask_BT.bool(), pen, torch.zeros_like(pen))


def sequence_mean_kl(kl_BT: Tensor, mask_BT: Tensor) -> float:
    """The batch's KL as verl measures it for its controller: each response's mean over its valid
    tokens (0 for an empty response), averaged over responses."""
    m = mask_BT.to(torch.float64)
    per_B = (kl_BT.detach().to(torch.float64) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return float(per_B.mean()) if per_B.numel() else 0.0


def adaptive_kl_coef(beta: float, current_kl: float, *, target: float, n_responses: int, horizon: int) -> float:
    """The next beta: beta * (1 + clip(current_kl / target - 1, -0.2, 0.2) * n_responses / horizon),
    n_responses the batch just measured (Ziegler et al.'s adaptive controller, as verl's)."""
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_responses / horizon)
