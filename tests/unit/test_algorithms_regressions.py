"""Regressions found by running verl's and TRL's own loss code against ours on the same inputs.

Each test writes the spec's formula out element by element (scalar float64 tensors, so
autograd gives the reference gradient) and compares value and gradient:
1. empty responses count in N_seq (both peers divide by every response of the batch);
2. IcePop multiplies a token's loss by w inside [alpha, beta] (not by 1) and by 0 outside;
3. GSPO-token clamps the combined log s_{i,t}, so a clamped token has zero gradient.
"""

import math

import pytest
import torch

from moe_rl.algorithms.actor_loss import actor_loss
from moe_rl.algorithms.config import AlgorithmConfig
from moe_rl.algorithms.mismatch import mismatch_weights
from moe_rl.algorithms.policy_loss import policy_loss
from moe_rl.train.global_counts import count_global

D = torch.float64


def _batch(lens, T, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    logp = (-torch.rand(B, T, generator=g, dtype=D) * 2).requires_grad_()
    old = logp.detach() + spread * torch.randn(B, T, generator=g, dtype=D)
    adv = torch.randn(B, generator=g, dtype=D)[:, None].expand(B, T).clone()
    mask = torch.tensor([[t < n for t in range(T)] for n in lens])
    return logp, old, adv, mask


def _ppo(logp, old, A, cl=0.2, ch=0.2):
    rho = torch.exp(logp - old)
    return torch.maximum(-A * rho, -A * torch.clamp(rho, 1 - cl, 1 + ch))


# ---------------------------------------------------------------- 1. empty responses


@pytest.mark.parametrize("mode", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_empty_response_counts_in_the_sequence_denominator(mode):
    lens = [5, 3, 0, 4, 1, 6, 2, 6]  # one empty response among 8
    T = 6
    logp, old, adv, mask = _batch(lens, T)
    counts = count_global([mask[:3], mask[3:]])  # two micro-batches, the empty one in the first
    assert counts.num_seqs == 8 and counts.num_tokens == sum(lens)
    cfg = AlgorithmConfig(preset="grpo", kl_beta=0.0, loss_agg=mode, max_response_len=7)
    loss = sum(actor_loss(cfg, logp[a:b], old[a:b], adv[a:b], mask[a:b], **counts.as_kwargs())[0]
               for a, b in ((0, 3), (3, 8)))
    ref = 0
    for i, n in enumerate(lens):
        per_seq = sum((_ppo(logp[i, t], old[i, t], adv[i, t].item()) for t in range(n)), torch.zeros((), dtype=D))
        if mode == "seq-mean-token-mean":
            ref = ref + (per_seq / n if n else 0.0)
        else:
            ref = ref + per_seq
    ref = ref / 8 if mode != "seq-mean-token-sum-norm" else ref / (8 * 7)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    g, = torch.autograd.grad(loss, logp)
    g_ref, = torch.autograd.grad(ref, logp)
    assert torch.allclose(g, g_ref, atol=1e-14, rtol=1e-12)


# ---------------------------------------------------------------- 2. IcePop weight


def test_icepop_multiplies_by_w_inside_the_band_and_zero_outside():
    lens = [4, 2, 3]
    T = 4
    logp, old, adv, mask = _batch(lens, T, seed=1)
    # engine log-probs putting w = exp(old - rollout) below, inside and above [0.5, 5]
    log_w = torch.tensor([[-1.0, -0.2, 0.3, 2.0], [1.6, 1.7, 9.0, 9.0], [-0.69, -0.7, 0.0, 0.0]], dtype=D)
    roll = old - log_w
    lo, hi = 0.5, 5.0
    weight, mm = mismatch_weights(old, roll, mask, "icepop", icepop_low=lo, icepop_high=hi)
    for i, n in enumerate(lens):
        for t in range(T):
            w = math.exp(log_w[i, t].item())
            want = (w if lo <= w <= hi else 0.0) if t < n else 0.0
            assert weight[i, t].item() == pytest.approx(want, rel=1e-14)
    assert mm.compute()["mismatch/masked_frac"] == pytest.approx(4 / 9)  # (0,0), (0,3), (1,1), (2,1)

    cfg = AlgorithmConfig(preset="dapo", mismatch="icepop", icepop_low=lo, icepop_high=hi)
    n_tok = sum(lens)
    loss, _ = actor_loss(cfg, logp, old, adv, mask, num_global_tokens=n_tok, num_global_seqs=3, rollout_logp_BT=roll)
    ref = 0
    for i, n in enumerate(lens):
        for t in range(n):
            w = math.exp(log_w[i, t].item())
            m_w = w if lo <= w <= hi else 0.0
            ref = ref + m_w * _ppo(logp[i, t], old[i, t], adv[i, t].item(), 0.2, 0.28)
    ref = ref / n_tok
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(ref, logp)[0], atol=1e-14)


# ---------------------------------------------------------------- 3. GSPO-token clamp


def test_gspo_token_clamped_token_has_zero_gradient():
    """A length-1 response with log-ratio 25 and A < 0: the unclipped branch -A*s is taken,
    s = e^20 after the clamp. Clamping only sg(log s_i) gave the gradient -A*e^20 (4.9e8 here);
    the spec's clamp on the combined term gives 0, as gspo does."""
    logp = torch.tensor([[-0.5, 0.0, 0.0], [-1.0, -2.0, -0.5]], dtype=D, requires_grad=True)
    old = torch.tensor([[-25.5, 0.0, 0.0], [-1.1, -1.8, -0.4]], dtype=D)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    A = [-1.0, 0.7]
    adv = torch.tensor(A, dtype=D)[:, None].expand(2, 3).clone()
    cl, ch = 0.2, 0.3
    out = policy_loss("gspo_token", logp, old, adv, mask, clip_low=cl, clip_high=ch)
    loss = out.loss_BT[mask].sum()
    # the spec, element by element: log s_it = clamp(logp - sg(logp) + sg(mean_t delta), +-20)
    ref = 0
    for i, n in enumerate([1, 3]):
        mean_delta = sum(logp[i, t].item() - old[i, t].item() for t in range(n)) / n
        for t in range(n):
            log_s = torch.clamp(logp[i, t] - logp[i, t].detach() + mean_delta, -20.0, 20.0)
            s = torch.exp(log_s)
            ref = ref + torch.maximum(-A[i] * s, -A[i] * torch.clamp(s, 1 - cl, 1 + ch))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    g, = torch.autograd.grad(loss, logp)
    g_ref, = torch.autograd.grad(ref, logp)
    assert torch.allclose(g, g_ref, atol=1e-12)
    assert g[0, 0].item() == 0.0 and out.loss_BT[0, 0].item() == pytest.approx(math.exp(20.0))
    # and gspo (one sequence ratio) agrees on the clamped response
    gs = policy_loss("gspo", logp, old, adv, mask, clip_low=cl, clip_high=ch)
    g_gspo, = torch.autograd.grad(gs.loss_BT[0, 0], logp)
    assert (g_gspo == 0).all()
