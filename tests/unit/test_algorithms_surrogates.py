"""SAPO and VESPO against their formulas written out element by element, with gradients.

SAPO is smooth in logp, so ``torch.autograd.gradcheck`` (float64) checks its analytic
gradient against finite differences too. VESPO's weight is stop-gradient by definition
(only the gradient -phi_i * A is meaningful, as in CISPO), so its gradient is compared with
that expression, not with finite differences of the value.
"""

import math

import pytest
import torch

from moe_rl.algorithms.actor_loss import actor_loss
from moe_rl.algorithms.aggregation import aggregate
from moe_rl.algorithms.config import AlgorithmConfig
from moe_rl.algorithms.policy_loss import policy_loss

D = torch.float64
LENS = [5, 3, 1, 4, 0]
B, T = len(LENS), 5
AGG = dict(num_global_tokens=13.0, num_global_seqs=5.0, max_response_len=8)


def _data(seed=0, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=D) * 2).requires_grad_()
    old = logp.detach() + spread * torch.randn(B, T, generator=g, dtype=D)
    adv_B = torch.tensor([1.3, -0.7, 0.0, -2.0, 0.4], dtype=D)  # A = 0 takes the A <= 0 / A >= 0 branches
    mask = torch.tensor([[t < n for t in range(T)] for n in LENS])
    return logp, old, adv_B, mask


def ref_sapo(logp, old, adv_B, mask, tau_pos, tau_neg):
    out = {}
    for i in range(B):
        A = adv_B[i].item()
        tau = tau_pos if A > 0 else tau_neg
        for t in range(T):
            if mask[i, t]:
                rho = torch.exp(logp[i, t] - old[i, t])
                out[(i, t)] = -A * (4 / tau) * torch.sigmoid(tau * (rho - 1))
    return out


@pytest.mark.parametrize("adv_shape", ["token", "response"])
@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 3.0)])
def test_sapo_value_gradient_and_gradcheck(adv_shape, taus):
    logp, old, adv_B, mask = _data()
    adv = adv_B if adv_shape == "response" else adv_B[:, None].expand(B, T).clone()

    def f(lp):
        out = policy_loss("sapo", lp, old, adv, mask, clip_low=0.2, clip_high=0.2,
                          sapo_tau_pos=taus[0], sapo_tau_neg=taus[1])
        return aggregate(out.loss_BT, mask, "seq-mean-token-mean", **AGG)

    got = f(logp)
    tok = ref_sapo(logp, old, adv_B, mask, *taus)
    ref = sum(sum(tok[(i, t)] for t in range(n)) / n for i, n in enumerate(LENS) if n) / 5
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    g, = torch.autograd.grad(got, logp)
    g_ref, = torch.autograd.grad(ref, logp)
    assert torch.allclose(g, g_ref, atol=1e-14)
    assert torch.autograd.gradcheck(f, (logp,))


def test_sapo_gradient_at_ratio_one_is_the_policy_gradient_and_nothing_clips():
    logp = torch.zeros(1, 3, dtype=D, requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 0.5]], dtype=D)
    out = policy_loss("sapo", logp, logp.detach(), adv, torch.ones(1, 3, dtype=torch.bool), clip_low=0.2,
                      clip_high=0.2)
    g, = torch.autograd.grad(out.loss_BT.sum(), logp)
    assert torch.allclose(g, -adv)  # d/dlogp of -A * rho at rho = 1
    assert not (out.clip_low_BT | out.clip_high_BT | out.dualclip_BT).any()


def ref_vespo_phi(logp, old, adv_B, mask, kp, lp_, kn, ln_, log_is=None):
    phis = []
    for i in range(B):
        n = int(mask[i].sum())
        s = sum(max(-20.0, min(20.0, logp[i, t].item() - old[i, t].item())) for t in range(n))
        if log_is is not None:
            s += log_is[i]
        log_w = max(math.log(1e-8), min(20.0, s))
        w = math.exp(log_w)
        k, lam = (kp, lp_) if adv_B[i].item() >= 0 else (kn, ln_)
        lam = max(lam, 1e-4)
        try:
            phi = math.exp(lam + k * log_w - lam * w)
        except OverflowError:
            phi = 0.0
        phis.append(phi if math.isfinite(phi) else 0.0)
    return phis


@pytest.mark.parametrize("params", [(2.0, 3.0, 3.0, 2.0), (1.0, 0.0, 0.5, 5.0)])
def test_vespo_value_and_gradient(params):
    logp, old, adv_B, mask = _data(spread=0.3)
    kp, lp_, kn, ln_ = params
    cfg = AlgorithmConfig(preset="grpo", policy_loss="vespo", kl_beta=0.0, loss_agg="token-mean",
                          vespo_k_pos=kp, vespo_lambda_pos=lp_, vespo_k_neg=kn, vespo_lambda_neg=ln_)
    loss, _ = actor_loss(cfg, logp, old, adv_B, mask, num_global_tokens=13, num_global_seqs=5)
    phi = ref_vespo_phi(logp, old, adv_B, mask, kp, lp_, kn, ln_)
    ref = sum(-phi[i] * adv_B[i].item() * logp[i, t] for i, n in enumerate(LENS) for t in range(n)) / 13
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    g, = torch.autograd.grad(loss, logp)
    want = torch.tensor([[-phi[i] * adv_B[i].item() / 13 if t < n else 0.0 for t in range(T)]
                         for i, n in enumerate(LENS)], dtype=D)
    assert torch.allclose(g, want, atol=1e-15, rtol=1e-12)
    assert any(p not in (0.0, 1.0) for p in phi)  # not vacuous


def test_vespo_phi_is_one_on_policy_and_zero_far_off():
    logp = torch.tensor([[-1.0, -2.0], [-1.0, -2.0], [-0.5, -0.5]], dtype=D, requires_grad=True)
    old = torch.stack([logp.detach()[0], logp.detach()[1] - 30.0, logp.detach()[2] + 30.0])
    adv = torch.tensor([1.0, 1.0, -1.0], dtype=D)
    out = policy_loss("vespo", logp, old, adv, torch.ones(3, 2, dtype=torch.bool), clip_low=0.2, clip_high=0.2)
    g, = torch.autograd.grad(out.loss_BT.sum(), logp)
    assert torch.allclose(g[0], -adv[0].expand(2))  # phi(1) = 1: the plain policy gradient
    assert g[1].abs().max() == 0  # w = e^20: e^{-lambda w} underflows, phi = 0 (not NaN)
    assert g[2].abs().max().item() == pytest.approx(math.exp(2.0) * 1e-24, rel=1e-6)  # w floored at 1e-8: e^2 w^3


@pytest.mark.parametrize("mode", ["tis", "icepop", "seq-mis"])
def test_vespo_folds_the_mismatch_weight_into_its_sequence_weight(mode):
    """TRL: log w_i += sum_t m * clamp(log weight_t, ln 1e-8, 20) (per-token corrections) or the
    response's one clamped log weight (per-sequence corrections); the loss is not multiplied."""
    logp, old, adv_B, mask = _data(spread=0.2)
    g = torch.Generator().manual_seed(3)
    roll = old + 0.6 * torch.randn(B, T, generator=g, dtype=D)
    cfg = AlgorithmConfig(preset="grpo", policy_loss="vespo", kl_beta=0.0, loss_agg="token-mean", mismatch=mode,
                          tis_cap=1.5, icepop_low=0.6, icepop_high=1.6, seq_mis_low=0.7, seq_mis_high=1.3)
    loss, _ = actor_loss(cfg, logp, old, adv_B, mask, num_global_tokens=13, num_global_seqs=5,
                         rollout_logp_BT=roll)
    log_is = []
    for i, n in enumerate(LENS):
        lw = [old[i, t].item() - roll[i, t].item() for t in range(n)]
        if mode == "seq-mis":
            geo = math.exp(sum(lw) / n) if n else 1.0
            keep = 0.7 <= geo <= 1.3
            log_is.append(0.0 if keep or not n else math.log(1e-8))
            continue
        tot = 0.0
        for x in lw:
            w = math.exp(x)
            c = min(w, 1.5) if mode == "tis" else (w if 0.6 <= w <= 1.6 else 0.0)
            tot += max(math.log(1e-8), min(20.0, math.log(c))) if c > 0 else math.log(1e-8)
        log_is.append(tot)
    phi = ref_vespo_phi(logp, old, adv_B, mask, 2.0, 3.0, 3.0, 2.0, log_is=log_is)
    ref = sum(-phi[i] * adv_B[i].item() * logp[i, t] for i, n in enumerate(LENS) for t in range(n)) / 13
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    gr, = torch.autograd.grad(loss, logp)
    want = torch.tensor([[-phi[i] * adv_B[i].item() / 13 if t < n else 0.0 for t in range(T)]
                         for i, n in enumerate(LENS)], dtype=D)
    assert torch.allclose(gr, want, atol=1e-15, rtol=1e-10)
