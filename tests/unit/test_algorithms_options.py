"""token-sum aggregation, the abs KL estimator, straight-through KL, seq-tis and seq-icepop:
each against its formula written out element by element, gradients included (gradcheck in
float64 where the loss is differentiable as written; straight-through KL has, by design, a
gradient that is not the derivative of its value, so it is compared with k2's gradient x).
"""

import math

import pytest
import torch

from moe_rl.algorithms.actor_loss import actor_loss
from moe_rl.algorithms.aggregation import aggregate
from moe_rl.algorithms.config import AlgorithmConfig
from moe_rl.algorithms.kl import kl_estimate
from moe_rl.algorithms.mismatch import mismatch_weights

D = torch.float64
LENS = [5, 3, 1, 4, 0]
B, T = len(LENS), 5


def _data(seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=D) * 2).requires_grad_()
    old = logp.detach() + spread * torch.randn(B, T, generator=g, dtype=D)
    roll = old + 0.4 * torch.randn(B, T, generator=g, dtype=D)
    ref = logp.detach() - 0.5 * torch.randn(B, T, generator=g, dtype=D)
    adv_B = torch.tensor([1.3, -0.7, 0.5, -2.0, 0.4], dtype=D)
    mask = torch.tensor([[t < n for t in range(T)] for n in LENS])
    return logp, old, roll, ref, adv_B, mask


def _ppo(lp, old, A, cl=0.2, ch=0.2):
    rho = torch.exp(lp - old)
    return torch.maximum(-A * rho, -A * torch.clamp(rho, 1 - cl, 1 + ch))


def test_token_sum_is_the_plain_sum_and_micro_batches_add_up():
    logp, old, _, _, adv_B, mask = _data()
    cfg = AlgorithmConfig(preset="grpo", kl_beta=0.0, loss_agg="token-sum")

    def f(lp):
        return actor_loss(cfg, lp, old, adv_B, mask, num_global_tokens=13, num_global_seqs=5)[0]

    got = f(logp)
    ref = sum(_ppo(logp[i, t], old[i, t], adv_B[i].item()) for i, n in enumerate(LENS) for t in range(n))
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(got, logp)[0], torch.autograd.grad(ref, logp)[0], atol=1e-14)
    assert torch.autograd.gradcheck(f, (logp,))
    parts = sum(actor_loss(cfg, logp[a:b], old[a:b], adv_B[a:b], mask[a:b], num_global_tokens=13,
                           num_global_seqs=5)[0] for a, b in ((0, 2), (2, 5)))
    assert parts.item() == pytest.approx(got.item(), rel=1e-12)


def test_kl_abs_value_and_gradient():
    x = torch.tensor([-30.0, -3.0, -0.5, 0.3, 2.0, 25.0], dtype=D, requires_grad=True)
    got = kl_estimate(x, torch.zeros_like(x), "abs")
    assert got.tolist() == [abs(v) for v in x.tolist()]
    assert torch.autograd.gradcheck(lambda z: kl_estimate(z, torch.zeros_like(z), "abs"), (x,))
    g, = torch.autograd.grad(got.sum(), x)
    assert g.tolist() == [math.copysign(1.0, v) for v in x.tolist()]


def _k(kind, x):
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x * x
    if kind == "abs":
        return abs(x)
    xc = max(-20.0, min(20.0, x))
    return min(math.exp(-xc) + xc - 1, 10.0)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3", "abs"])
def test_straight_through_has_the_estimators_value_and_k2s_gradient(kind):
    # x = -25 and 3: k3's clamps bind (x to -20, value to 10) and its own gradient there is 0
    x = torch.tensor([-25.0, -3.0, -0.5, 0.3, 2.0, 3.0, 25.0], dtype=D, requires_grad=True)
    got = kl_estimate(x, torch.zeros_like(x), kind, straight_through=True)
    for xi, gi in zip(x.tolist(), got.tolist()):
        assert gi == pytest.approx(_k(kind, xi), rel=1e-12)
    g, = torch.autograd.grad(got.sum(), x)
    assert torch.equal(g, x.detach())


def test_straight_through_kl_in_actor_loss():
    logp, old, _, ref, adv_B, mask = _data()
    cfg = AlgorithmConfig(preset="grpo", kl_beta=0.1, kl_estimator="k3", kl_straight_through=True,
                          loss_agg="token-mean")
    loss, m = actor_loss(cfg, logp, old, adv_B, mask, num_global_tokens=13, num_global_seqs=5, ref_logp_BT=ref)
    pg = sum(_ppo(logp[i, t], old[i, t], adv_B[i].item()) for i, n in enumerate(LENS) for t in range(n)) / 13
    kl_val = sum(_k("k3", logp[i, t].item() - ref[i, t].item()) for i, n in enumerate(LENS) for t in range(n)) / 13
    assert loss.item() == pytest.approx(pg.item() + 0.1 * kl_val, rel=1e-12)
    assert m.compute()["actor/kl_loss"] == pytest.approx(kl_val, rel=1e-12)
    g, = torch.autograd.grad(loss, logp)
    g_pg, = torch.autograd.grad(pg, logp)
    want = g_pg + 0.1 * torch.where(mask, logp.detach() - ref, torch.zeros_like(ref)) / 13
    assert torch.allclose(g, want, atol=1e-14)


def _seq_weights(old, roll, mask, mode, cap, lo, hi):
    out = []
    for i, n in enumerate(LENS):
        W = math.exp(max(-20.0, min(20.0, sum(old[i, t].item() - roll[i, t].item() for t in range(n)))))
        w = min(W, cap) if mode == "seq-tis" else (W if lo <= W <= hi else 0.0)
        out.append([w if t < n else 0.0 for t in range(T)])
    return out


@pytest.mark.parametrize("mode", ["seq-tis", "seq-icepop"])
def test_sequence_level_mismatch_weights(mode):
    logp, old, roll, _, adv_B, mask = _data(spread=0.2)
    roll = roll.clone()
    roll[3] = old[3] - 10.0  # response 3: W = e^40 -> clamped to e^20: capped / outside the band
    cap, lo, hi = 1.5, 0.3, 3.0
    w, mm = mismatch_weights(old, roll, mask, mode, tis_cap=cap, icepop_low=lo, icepop_high=hi)
    want = _seq_weights(old, roll, mask, mode, cap, lo, hi)
    assert torch.allclose(w, torch.tensor(want, dtype=D), rtol=1e-12, atol=0)
    assert not w.requires_grad
    zero_tokens = sum(1 for i, n in enumerate(LENS) for t in range(n) if want[i][t] == 0)
    assert mm.compute()["mismatch/masked_frac"] == pytest.approx(zero_tokens / 13)

    cfg = AlgorithmConfig(preset="grpo", kl_beta=0.0, loss_agg="seq-mean-token-mean", mismatch=mode, tis_cap=cap,
                          icepop_low=lo, icepop_high=hi)

    def f(lp):
        return actor_loss(cfg, lp, old, adv_B, mask, num_global_tokens=13, num_global_seqs=5,
                          rollout_logp_BT=roll)[0]

    got = f(logp)
    ref = sum(sum(want[i][t] * _ppo(logp[i, t], old[i, t], adv_B[i].item()) for t in range(n)) / n
              for i, n in enumerate(LENS) if n) / 5
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(got, logp)[0], torch.autograd.grad(ref, logp)[0], atol=1e-14)
    assert torch.autograd.gradcheck(f, (logp,))
