"""High-entropy token selection (top_entropy_quantile) against its definition written out: the
threshold is the 1 - q quantile with linear interpolation (torch.quantile, and a transcription by
hand), the mask keeps valid tokens at or above it, and the actor loss drops the others' surrogate
while the KL stays on every token and the denominators do not move."""

import math

import pytest
import torch

from moe_rl.algorithms.actor_loss import actor_loss
from moe_rl.algorithms.config import AlgorithmConfig
from moe_rl.algorithms.entropy_select import entropy_threshold, high_entropy_mask

D = torch.float64


def _quantile_by_hand(values, p):
    v = sorted(values)
    pos = (len(v) - 1) * p
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


@pytest.mark.parametrize("n", [1, 2, 7, 100])
@pytest.mark.parametrize("q", [0.2, 0.5, 0.9, 1.0])
def test_threshold_is_the_linear_quantile(n, q):
    g = torch.Generator().manual_seed(n)
    v = torch.rand(n, generator=g, dtype=D)
    v[: n // 3] = v[0]  # ties
    got = entropy_threshold(v, q)
    assert got == pytest.approx(_quantile_by_hand(v.tolist(), 1 - q), rel=1e-15, abs=1e-15)
    assert got == pytest.approx(float(torch.quantile(v, 1 - q)), rel=1e-15, abs=1e-15)
    kept = int((v >= got).sum())
    assert kept >= math.floor(q * n)  # at least the top q (ties at the threshold stay)
    if q == 1.0:
        assert kept == n


def test_threshold_edges():
    assert entropy_threshold(torch.zeros(0), 0.2) is None
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert not high_entropy_mask(torch.rand(2, 3), mask, None).any()
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="top_entropy_quantile must be in"):
            entropy_threshold(torch.rand(4), bad)
    with pytest.raises(ValueError, match=r"algorithm.top_entropy_quantile \(0.0\) must be in \(0, 1\]"):
        AlgorithmConfig(preset="grpo", top_entropy_quantile=0.0)


def test_mask_never_keeps_padding():
    ent = torch.tensor([[5.0, 4.0, 3.0], [9.0, 1.0, 2.0]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    thr = entropy_threshold(ent[mask], 0.5)  # valid: 5, 4, 1, 2 -> median 3.0
    assert thr == 3.0
    assert high_entropy_mask(ent, mask, thr).tolist() == [[True, True, False], [False, False, False]]


def test_actor_loss_drops_low_entropy_tokens_written_out():
    """token-mean loss = (sum over kept tokens of the ppo surrogate + beta * sum over all valid tokens of
    k3) / N_tok: the KL is on every token, and N_tok counts every valid token."""
    B, T, lens = 3, 4, [4, 2, 3]
    g = torch.Generator().manual_seed(3)
    logp = (-torch.rand(B, T, generator=g, dtype=D)).requires_grad_()
    old = logp.detach() + 0.2 * torch.randn(B, T, generator=g, dtype=D)
    ref = old - 0.1
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=D)
    mask = torch.tensor([[t < n for t in range(T)] for n in lens])
    ent = torch.rand(B, T, generator=g, dtype=D)
    keep = high_entropy_mask(ent, mask, entropy_threshold(ent[mask], 0.4))
    cfg = AlgorithmConfig(preset="grpo", loss_agg="token-mean", kl_beta=0.1, top_entropy_quantile=0.4)
    n_tok = int(mask.sum())
    loss, met = actor_loss(cfg, logp, old, adv, mask, num_global_tokens=n_tok, num_global_seqs=B, ref_logp_BT=ref,
                           entropy_keep_BT=keep)
    ref_loss = 0
    for i in range(B):
        for t in range(lens[i]):
            rho = torch.exp(logp[i, t] - old[i, t])
            a = adv[i].item()
            surr = torch.maximum(-a * rho, -a * torch.clamp(rho, 0.8, 1.2))
            x = logp[i, t] - ref[i, t]
            ref_loss = ref_loss + (surr if keep[i, t] else 0.0) + 0.1 * (torch.exp(-x) + x - 1)
    ref_loss = ref_loss / n_tok
    assert 0 < int(keep.sum()) < n_tok
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(ref_loss, logp)[0], atol=1e-12)
    assert met.compute()["actor/entropy_kept_frac"] == pytest.approx(int(keep.sum()) / n_tok)
    with pytest.raises(ValueError, match="needs entropy_keep_BT"):
        actor_loss(cfg, logp, old, adv, mask, num_global_tokens=n_tok, num_global_seqs=B, ref_logp_BT=ref)
