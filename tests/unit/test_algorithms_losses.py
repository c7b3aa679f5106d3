"""Policy losses, KL, aggregation, actor_loss and metrics against the spec's formulas.

Each reference is a per-element transcription of docs/algorithms.md built from scalar
float64 tensors in Python loops (so autograd also gives the reference gradient), written
independently of the vectorized code under test.
"""

import math

import pytest
import torch

from moe_rl.algorithms.actor_loss import actor_loss
from moe_rl.algorithms.aggregation import aggregate
from moe_rl.algorithms.config import AlgorithmConfig
from moe_rl.algorithms.kl import kl_estimate, reward_penalty
from moe_rl.algorithms.metrics import Metrics
from moe_rl.algorithms.policy_loss import policy_loss

D = torch.float64
B, T = 4, 5
LENS = [5, 3, 1, 4]


def _data(seed=0, spread=0.4):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=D) * 2).requires_grad_()
    old = logp.detach() + spread * torch.randn(B, T, generator=g, dtype=D)
    adv_B = torch.tensor([1.3, -0.7, 0.5, -2.0], dtype=D)
    mask = torch.tensor([[t < n for t in range(T)] for n in LENS])
    adv = adv_B[:, None].expand(B, T).clone()
    # garbage on padding must not leak
    logp_pad = torch.where(mask, logp, torch.full_like(logp, float("nan")))
    return logp, logp_pad, old, adv, mask


def clip(x, lo, hi):
    return torch.clamp(x, lo, hi)


def ref_token_losses(kind, logp, old, adv, mask, cl, ch, c=0.0):
    """{(i,t): scalar loss} for token-level surrogates."""
    out = {}
    for i in range(B):
        for t in range(T):
            if not mask[i, t]:
                continue
            A = adv[i, t].item()
            rho = torch.exp(logp[i, t] - old[i, t])
            if kind == "ppo":
                l = torch.maximum(-A * rho, -A * clip(rho, 1 - cl, 1 + ch))
                if c and A < 0:
                    l = torch.minimum(l, torch.tensor(-c * A, dtype=D))
            elif kind == "cispo":
                w = clip(rho.detach(), max(1 - cl, 0.0), 1 + ch)
                l = -w * A * logp[i, t]
            elif kind == "pg":
                l = -A * logp[i, t]
            out[(i, t)] = l
    return out


def ref_seq_losses(kind, logp, old, adv, mask, cl, ch):
    """{i: scalar loss l_i} for gspo / gmpo."""
    out = {}
    for i in range(B):
        n = int(mask[i].sum())
        A = adv[i, 0].item()
        if kind == "gspo":
            s = torch.exp(sum(logp[i, t] - old[i, t] for t in range(n)) / n)
            out[i] = torch.maximum(-A * s, -A * clip(s, 1 - cl, 1 + ch))
        elif kind == "gmpo":
            sg = 1.0 if A > 0 else (-1.0 if A < 0 else 0.0)
            acc = 0
            for t in range(n):
                d = logp[i, t] - old[i, t]
                dc = clip(d, -cl, ch)
                acc = acc + sg * torch.minimum(sg * d, sg * dc)
            out[i] = -A * torch.exp(acc / n)
    return out


def ref_aggregate(per_token, mask, mode, n_tok, n_seq, lmax):
    """per_token: {(i,t): l}; transcription of the axis-4 table."""
    if mode == "token-mean":
        return sum(per_token.values()) / n_tok
    if mode == "seq-mean-token-mean":
        tot = 0
        for i in range(mask.shape[0]):
            n = int(mask[i].sum())
            if n:
                tot = tot + sum(per_token[(i, t)] for t in range(mask.shape[1]) if mask[i, t]) / n
        return tot / n_seq
    if mode == "seq-mean-token-sum":
        return sum(per_token.values()) / n_seq
    if mode == "seq-mean-token-sum-norm":
        return sum(per_token.values()) / (n_seq * lmax)


MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@pytest.mark.parametrize("kind,cl,ch,c", [
    ("ppo", 0.2, 0.2, 0.0), ("ppo", 0.2, 0.28, 0.0), ("ppo", 0.1, 0.3, 3.0), ("cispo", 1.0, 0.28, 0.0),
    ("cispo", 0.2, 0.2, 0.0), ("pg", 0.2, 0.2, 0.0),
])
@pytest.mark.parametrize("mode", MODES)
def test_token_surrogates_value_and_grad(kind, cl, ch, c, mode):
    logp, logp_pad, old, adv, mask = _data(spread=0.6)
    out = policy_loss(kind, logp_pad, old, adv, mask, clip_low=cl, clip_high=ch, dual_clip_c=c)
    got = aggregate(out.loss_BT, mask, mode, num_global_tokens=20.0, num_global_seqs=6.0, max_response_len=8)
    ref = ref_aggregate(ref_token_losses(kind, logp, old, adv, mask, cl, ch, c), mask, mode, 20.0, 6.0, 8)
    assert got.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)
    (g_got,) = torch.autograd.grad(got, logp)
    (g_ref,) = torch.autograd.grad(ref, logp)
    assert torch.allclose(g_got, g_ref, atol=1e-12)
    assert (g_got[~mask] == 0).all()


def test_ppo_clip_masks_and_dualclip():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 5.0, 0.7]], dtype=D))  # ratio with old=0
    old = torch.zeros(1, 5, dtype=D)
    adv = torch.tensor([[1.0, -1.0, -1.0, -1.0, 1.0]], dtype=D)
    mask = torch.ones(1, 5, dtype=torch.bool)
    out = policy_loss("ppo", logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip_c=3.0)
    # tok0: A>0, rho 1.5 > 1.28 -> high clip; tok1: A<0, rho .5 < .8 -> low clip;
    # tok2: inside; tok3: A<0, rho 5 > c=3 -> dual clip (unclipped branch, no low clip); tok4: A>0, rho .7 -> unclipped
    assert out.clip_high_BT.tolist() == [[True, False, False, False, False]]
    assert out.clip_low_BT.tolist() == [[False, True, False, False, False]]
    assert out.dualclip_BT.tolist() == [[False, False, False, True, False]]
    assert out.loss_BT[0, 3].item() == pytest.approx(3.0)


@pytest.mark.parametrize("kind,cl,ch", [("gspo", 3e-4, 4e-4), ("gspo", 0.05, 0.1), ("gmpo", 0.4, 0.4),
                                         ("gmpo", 0.1, 0.2)])
def test_sequence_surrogates_value_and_grad(kind, cl, ch):
    logp, logp_pad, old, adv, mask = _data(spread=0.3)
    out = policy_loss(kind, logp_pad, old, adv, mask, clip_low=cl, clip_high=ch)
    got = aggregate(out.loss_BT, mask, "seq-mean-token-mean", num_global_tokens=13, num_global_seqs=B,
                    max_response_len=0)
    ref_l = ref_seq_losses(kind, logp, old, adv, mask, cl, ch)
    ref = sum(ref_l.values()) / B
    assert got.item() == pytest.approx(ref.item(), rel=1e-12)
    (g_got,) = torch.autograd.grad(got, logp)
    (g_ref,) = torch.autograd.grad(ref, logp)
    assert torch.allclose(g_got, g_ref, atol=1e-12)


def test_gspo_token_equals_gspo_value_and_gradient_with_sequence_advantage():
    logp, logp_pad, old, adv, mask = _data(spread=0.02)
    kw = dict(num_global_tokens=13, num_global_seqs=B, max_response_len=0)
    a = policy_loss("gspo", logp_pad, old, adv, mask, clip_low=0.01, clip_high=0.02)
    b = policy_loss("gspo_token", logp_pad, old, adv, mask, clip_low=0.01, clip_high=0.02)
    la = aggregate(a.loss_BT, mask, "seq-mean-token-mean", **kw)
    lb = aggregate(b.loss_BT, mask, "seq-mean-token-mean", **kw)
    assert la.item() == pytest.approx(lb.item(), rel=1e-12)
    ga = torch.autograd.grad(la, logp, retain_graph=True)[0]
    gb = torch.autograd.grad(lb, logp)[0]
    assert torch.allclose(ga, gb, atol=1e-12)
    assert torch.equal(a.seq_clipped_B, b.seq_clipped_B)


def test_cispo_never_zeroes_a_token_gradient():
    logp, logp_pad, old, adv, mask = _data(spread=2.0)
    out = policy_loss("cispo", logp_pad, old, adv, mask, clip_low=0.2, clip_high=0.2)
    g = torch.autograd.grad(out.loss_BT[mask].sum(), logp, retain_graph=True)[0]
    assert (g[mask] != 0).all()
    ppo = policy_loss("ppo", logp_pad, old, adv, mask, clip_low=0.2, clip_high=0.2)
    g2 = torch.autograd.grad(ppo.loss_BT[mask].sum(), logp)[0]
    assert (g2[mask] == 0).any()  # the contrast that CISPO exists for


def ref_kl(x, kind):
    if kind == "k1":
        return x
    if kind == "k2":
        return 0.5 * x * x
    xc = max(-20.0, min(20.0, x))
    return min(math.exp(-xc) + xc - 1, 10.0)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_estimators_and_clamps(kind):
    x = torch.tensor([-30.0, -3.0, -0.5, 0.0, 0.3, 2.0, 25.0], dtype=D)
    got = kl_estimate(x, torch.zeros_like(x), kind)
    for xi, gi in zip(x.tolist(), got.tolist()):
        assert gi == pytest.approx(ref_kl(xi, kind), rel=1e-12, abs=1e-15)
    if kind == "k3":
        assert (got >= 0).all() and got.max() <= 10


def test_every_ratio_uses_the_one_log_ratio_clamp(monkeypatch):
    """The bound lives in ``ratio.py`` alone: moved to 3, every ratio stops at e^3 (the token
    ratio, the gspo and gmpo sequence ratios, the mismatch weight and its geometric mean, k3's
    argument and the ratio weighting of k3 in actor_loss). A module with its own copy of the
    clamp would still stop at e^20 and fail here."""
    from moe_rl.algorithms import ratio
    from moe_rl.algorithms.mismatch import mismatch_weights

    monkeypatch.setattr(ratio, "LOG_RATIO_CLAMP", 3.0)
    e3 = math.exp(3.0)
    logp = torch.zeros(1, 4, dtype=D)
    far = torch.full((1, 4), -10.0, dtype=D)  # log-ratio +10, beyond the moved bound
    adv, mask = torch.ones(1, 4, dtype=D), torch.ones(1, 4, dtype=torch.bool)
    for kind in ("ppo", "cispo", "pg"):
        assert policy_loss(kind, logp, far, adv, mask, clip_low=0.2, clip_high=0.2).ratio_BT.max().item() \
            == pytest.approx(e3)
    for kind in ("gspo", "gmpo"):
        # clip bounds wider than e^10 leave the sequence ratio to the clamp alone
        out = policy_loss(kind, logp, far, adv, mask, clip_low=0.5, clip_high=20.0)
        assert out.seq_ratio_B.item() == pytest.approx(e3)
    w, mm = mismatch_weights(logp, far, mask, "tis", tis_cap=1e9)
    assert w.max().item() == pytest.approx(e3) and mm.compute()["mismatch/is_weight_max"] == pytest.approx(e3)
    w, _ = mismatch_weights(logp, far, mask, "seq-mis", seq_mis_low=e3 - 1e-6, seq_mis_high=e3 + 1e-6)
    assert (w == 1).all()  # geometric mean e^3 (e^10 unclamped) lies in the keep band
    x = torch.tensor([10.0], dtype=D)
    assert kl_estimate(x, torch.zeros_like(x), "k3").item() == pytest.approx(math.exp(-3.0) + 3.0 - 1)
    cfg = AlgorithmConfig(preset="grpo", kl_beta=0.1, kl_ratio_weighted=True, loss_agg="token-mean")
    _, m = actor_loss(cfg, logp, far, adv, mask, num_global_tokens=4, num_global_seqs=1, ref_logp_BT=logp - 1)
    assert m.compute()["actor/kl_loss"] == pytest.approx(e3 * math.exp(-1.0))  # rho * k3(x=1)


def test_ratio_weighted_k3_gradient_is_unbiased_form():
    logp, logp_pad, old, adv, mask = _data()
    ref_lp = logp.detach() - 0.3
    rho = torch.exp(logp - old)
    got = kl_estimate(logp, ref_lp, "k3", ratio_BT=rho)
    want = rho * (torch.exp(-(logp - ref_lp)) + (logp - ref_lp) - 1)
    assert torch.allclose(got, want)
    g = torch.autograd.grad(got[mask].sum(), logp, retain_graph=True)[0]
    gw = torch.autograd.grad(want[mask].sum(), logp)[0]
    assert torch.allclose(g, gw)


def test_reward_penalty_is_beta_k1_detached_and_masked():
    old = torch.tensor([[0.0, -1.0, -2.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-0.5, -1.0, 0.0]], dtype=D)
    pen = reward_penalty(old, ref, torch.tensor([[1, 1, 0]], dtype=torch.bool), beta=0.1)
    assert pen[0].tolist() == pytest.approx([0.05, 0.0, 0.0])
    assert not pen.requires_grad


def test_aggregate_zero_denominator_and_bad_mode():
    loss = torch.ones(2, 3, dtype=D, requires_grad=True)
    m = torch.zeros(2, 3, dtype=torch.bool)
    z = aggregate(loss, m, "token-mean", num_global_tokens=0, num_global_seqs=0, max_response_len=1)
    assert z.item() == 0 and z.requires_grad
    with pytest.raises(ValueError, match="not one of"):
        aggregate(loss, m, "mean", num_global_tokens=1, num_global_seqs=1, max_response_len=1)
    with pytest.raises(ValueError, match="max_response_len"):
        aggregate(loss, ~m, "seq-mean-token-sum-norm", num_global_tokens=1, num_global_seqs=1, max_response_len=0)


def test_actor_loss_composes_pg_kl_mismatch_and_metrics():
    logp, logp_pad, old, adv, mask = _data(spread=0.3)
    g = torch.Generator().manual_seed(5)
    ref_lp = old - 0.2 * torch.rand(B, T, generator=g, dtype=D)
    roll = old + 0.5 * torch.randn(B, T, generator=g, dtype=D)
    ent = torch.rand(B, T, generator=g, dtype=D)
    cfg = AlgorithmConfig(preset="grpo", clip_high=0.28, kl_beta=0.1, kl_estimator="k3", mismatch="tis",
                          loss_agg="token-mean")
    n_tok = int(mask.sum())
    loss, metrics = actor_loss(cfg, logp_pad, old, adv, mask, num_global_tokens=n_tok, num_global_seqs=B,
                               ref_logp_BT=ref_lp, rollout_logp_BT=roll, entropy_BT=ent)
    # reference
    tok = ref_token_losses("ppo", logp, old, adv, mask, 0.2, 0.28)
    pg = 0
    kl = 0
    for (i, t), l in tok.items():
        w = min(math.exp(old[i, t].item() - roll[i, t].item()), 2.0)
        pg = pg + l * w
        x = logp[i, t] - ref_lp[i, t]
        kl = kl + torch.exp(-x) + x - 1
    pg, kl = pg / n_tok, kl / n_tok
    ref = pg + 0.1 * kl
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(ref, logp)[0], atol=1e-12)
    v = metrics.compute()
    assert v["actor/pg_loss"] == pytest.approx(pg.item(), rel=1e-12)
    assert v["actor/kl_loss"] == pytest.approx(kl.item(), rel=1e-12)
    valid = [(i, t) for i in range(B) for t in range(T) if mask[i, t]]
    ratios = [math.exp(logp[i, t].item() - old[i, t].item()) for i, t in valid]
    assert v["actor/ratio_mean"] == pytest.approx(sum(ratios) / len(ratios))
    assert v["actor/ratio_min"] == pytest.approx(min(ratios)) and v["actor/ratio_max"] == pytest.approx(max(ratios))
    assert v["actor/ppo_kl"] == pytest.approx(sum(old[i, t].item() - logp[i, t].item() for i, t in valid) / n_tok)
    assert v["actor/entropy"] == pytest.approx(sum(ent[i, t].item() for i, t in valid) / n_tok)
    hi = [1 for i, t in valid if adv[i, t] > 0 and math.exp(logp[i, t].item() - old[i, t].item()) > 1.28]
    lo = [1 for i, t in valid if adv[i, t] < 0 and math.exp(logp[i, t].item() - old[i, t].item()) < 0.8]
    assert v["actor/clipfrac_high"] == pytest.approx(len(hi) / n_tok)
    assert v["actor/clipfrac_low"] == pytest.approx(len(lo) / n_tok)
    assert v["actor/clipfrac"] == pytest.approx((len(hi) + len(lo)) / n_tok)
    assert v["actor/dualclip_frac"] == 0
    lw = [old[i, t].item() - roll[i, t].item() for i, t in valid]
    assert v["mismatch/k1"] == pytest.approx(-sum(lw) / n_tok)
    assert v["mismatch/k3"] == pytest.approx(sum(math.exp(x) - x - 1 for x in lw) / n_tok)
    assert v["mismatch/is_weight_max"] == pytest.approx(max(math.exp(x) for x in lw))
    assert v["mismatch/extreme_frac"] == pytest.approx(sum(abs(x) > math.log(2) for x in lw) / n_tok)
    assert "actor/seq_clipfrac" not in v


def test_actor_loss_sequence_level_metrics_and_requirements():
    logp, logp_pad, old, adv, mask = _data(spread=0.05)
    cfg = AlgorithmConfig(preset="gspo", clip_low=0.01, clip_high=0.01)
    _, metrics = actor_loss(cfg, logp_pad, old, adv, mask, num_global_tokens=13, num_global_seqs=B)
    v = metrics.compute()
    s = [math.exp(sum(logp[i, t].item() - old[i, t].item() for t in range(n)) / n) for i, n in enumerate(LENS)]
    assert v["actor/ratio_max"] == pytest.approx(max(s)) and v["actor/ratio_min"] == pytest.approx(min(s))
    clipped = [(adv[i, 0] > 0 and s[i] > 1.01) or (adv[i, 0] < 0 and s[i] < 0.99) for i in range(B)]
    assert v["actor/seq_clipfrac"] == pytest.approx(sum(clipped) / B)
    assert v["actor/clipfrac"] == pytest.approx(sum(n for n, c in zip(LENS, clipped) if c) / 13)
    with pytest.raises(ValueError, match="ref_logp_BT"):
        actor_loss(AlgorithmConfig(preset="grpo"), logp_pad, old, adv, mask, num_global_tokens=13, num_global_seqs=B)
    with pytest.raises(ValueError, match="rollout_logp_BT"):
        actor_loss(AlgorithmConfig(preset="gspo", mismatch="icepop"), logp_pad, old, adv, mask,
                   num_global_tokens=13, num_global_seqs=B)


@pytest.mark.parametrize("mismatch", ["tis", "icepop", "seq-tis"])
def test_gmpo_takes_the_geometric_mean_of_the_mismatch_weights_as_verl(mismatch):
    """verl compute_policy_loss_geo_mean with rollout_is_weights, written out per response:
    l_i = -A_i r_i W_i, W_i = exp(sum_t log(w_t + 1e-10) / (n_i + 1e-8)), loss = mean_i l_i."""
    logp, logp_pad, old, adv, mask = _data(spread=0.3)
    g = torch.Generator().manual_seed(7)
    roll = old + 0.8 * torch.randn(B, T, generator=g, dtype=D)  # wide: icepop masks some tokens
    cfg = AlgorithmConfig(preset="gmpo", mismatch=mismatch)
    loss, _ = actor_loss(cfg, logp_pad, old, adv, mask, num_global_tokens=int(mask.sum()), num_global_seqs=B,
                         rollout_logp_BT=roll)
    seq = ref_seq_losses("gmpo", logp, old, adv, mask, 0.4, 0.4)
    ref = 0
    masked = 0
    for i, n in enumerate(LENS):
        lw = [old[i, t].item() - roll[i, t].item() for t in range(n)]
        if mismatch == "tis":
            w = [min(math.exp(x), 2.0) for x in lw]
        elif mismatch == "icepop":
            w = [math.exp(x) if 0.5 <= math.exp(x) <= 5.0 else 0.0 for x in lw]
            masked += w.count(0.0)
        else:
            w = [min(math.exp(sum(lw)), 2.0)] * n
        W = math.exp(sum(math.log(x + 1e-10) for x in w) / (n + 1e-8))
        ref = ref + seq[i] * W
    ref = ref / B
    if mismatch == "icepop":
        assert masked > 0  # the case where a geometric and an arithmetic mean part ways
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    assert torch.allclose(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(ref, logp)[0], atol=1e-12)


@pytest.mark.parametrize("delta", [0.05, 0.3])
def test_off_policy_sequence_mask_drops_negative_advantage_responses_far_from_the_sampler(delta):
    """DeepSeek-V3.2's OPSM written out: response i keeps its loss unless A_i < 0 and
    mean_t(rollout_logp - logp) > delta; the KL term is not masked."""
    logp, logp_pad, old, adv, mask = _data(spread=0.3)
    # mean KL per response 0.6, 0.5, 0.6, 0.1 (A = 1.3, -0.7, 0.5, -2.0): the A > 0 ones always stay,
    # response 1 goes at both deltas, response 3 only at 0.05
    shift = torch.tensor([0.6, 0.5, 0.6, 0.1], dtype=D)[:, None]
    roll = logp.detach() + shift + 0.05 * torch.randn(B, T, generator=torch.Generator().manual_seed(11), dtype=D)
    ref_lp = old - 0.1
    cfg = AlgorithmConfig(preset="grpo", kl_beta=0.05, off_policy_mask=delta, loss_agg="token-mean")
    n_tok = int(mask.sum())
    loss, met = actor_loss(cfg, logp_pad, old, adv, mask, num_global_tokens=n_tok, num_global_seqs=B,
                           ref_logp_BT=ref_lp, rollout_logp_BT=roll)
    tok = ref_token_losses("ppo", logp, old, adv, mask, 0.2, 0.2)
    dropped = []
    ref = 0
    for i, n in enumerate(LENS):
        kl = sum(roll[i, t].item() - logp[i, t].item() for t in range(n)) / max(n, 1)
        drop = adv[i, 0].item() < 0 and kl > delta
        dropped.append(drop and n > 0)
        for t in range(n):
            x = logp[i, t] - ref_lp[i, t]
            ref = ref + (0.0 if drop else 1.0) * tok[(i, t)] + 0.05 * (torch.exp(-x) + x - 1)
    ref = ref / n_tok
    assert dropped == [False, True, False, delta < 0.1]
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(ref, logp)[0], atol=1e-12)
    assert met.compute()["mismatch/opsm_masked_frac"] == pytest.approx(sum(dropped) / B)
    with pytest.raises(ValueError, match="off_policy_mask needs rollout_logp_BT"):
        actor_loss(cfg, logp_pad, old, adv, mask, num_global_tokens=n_tok, num_global_seqs=B, ref_logp_BT=ref_lp)
    assert cfg.needs_rollout_logp and not AlgorithmConfig(preset="grpo").needs_rollout_logp


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("coeff", [0.01, -0.5])
def test_entropy_bonus_written_out(agg, coeff):
    """loss = pg - entropy_coeff * agg(H) + beta * agg(KL), H the policy's entropy with its gradient,
    aggregated like the policy loss (verl's entropy_coeff); the entropy on padding never counts."""
    logp, logp_pad, old, adv, mask = _data()
    g = torch.Generator().manual_seed(5)
    z = torch.randn(B, T, 7, generator=g, dtype=D, requires_grad=True)  # logits behind the entropy
    ls = torch.log_softmax(z, -1)
    ent = -(ls.exp() * ls).sum(-1)
    ent_pad = torch.where(mask, ent, torch.full_like(ent, float("nan")))
    ref_lp = old - 0.1
    cfg = AlgorithmConfig(preset="grpo", kl_beta=0.05, loss_agg=agg, max_response_len=T, entropy_coeff=coeff)
    n_tok, n_seq = int(mask.sum()), B + 1  # one empty response elsewhere in the step
    loss, met, tok_loss = actor_loss(cfg, logp_pad, old, adv, mask, num_global_tokens=n_tok, num_global_seqs=n_seq,
                                     ref_logp_BT=ref_lp, entropy_BT=ent_pad, with_token_loss=True)
    tok = ref_token_losses("ppo", logp, old, adv, mask, 0.2, 0.2)
    ref, ref_ent = 0, 0
    for i, n in enumerate(LENS):
        per_seq, per_seq_ent = 0, 0
        for t in range(n):
            x = logp[i, t] - ref_lp[i, t]
            per_seq = per_seq + tok[(i, t)] + 0.05 * (torch.exp(-x) + x - 1) - coeff * ent[i, t]
            per_seq_ent = per_seq_ent + ent[i, t]
        if agg == "token-mean":
            ref, ref_ent = ref + per_seq / n_tok, ref_ent + per_seq_ent / n_tok
        elif agg == "seq-mean-token-mean":
            ref, ref_ent = ref + per_seq / max(n, 1) / n_seq, ref_ent + per_seq_ent / max(n, 1) / n_seq
        else:
            ref, ref_ent = ref + per_seq / (n_seq * T), ref_ent + per_seq_ent / (n_seq * T)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    got = torch.autograd.grad(loss, (logp, z), retain_graph=True)
    want = torch.autograd.grad(ref, (logp, z))
    assert want[1].abs().max() > 1e-4  # the bonus reaches the logits
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12)
    m = met.compute()
    assert m["actor/entropy_loss"] == pytest.approx(ref_ent.item(), rel=1e-12)
    assert m["actor/entropy"] == pytest.approx(ent[mask].mean().item(), rel=1e-12)
    # the per-token loss holds the bonus: aggregated it is the loss share
    agg_tok = aggregate(tok_loss, mask, agg, num_global_tokens=n_tok, num_global_seqs=n_seq, max_response_len=T)
    assert agg_tok.item() == pytest.approx(ref.item(), rel=1e-12)
    with pytest.raises(ValueError, match="entropy_coeff=.* needs entropy_BT"):
        actor_loss(cfg, logp_pad, old, adv, mask, num_global_tokens=n_tok, num_global_seqs=n_seq, ref_logp_BT=ref_lp)


def test_entropy_bonus_off_leaves_the_loss_and_entropy_gradient_alone():
    logp, logp_pad, old, adv, mask = _data()
    z = torch.randn(B, T, 7, dtype=D, requires_grad=True)
    ls = torch.log_softmax(z, -1)
    ent = -(ls.exp() * ls).sum(-1)
    cfg = AlgorithmConfig(preset="grpo", kl_beta=0.0)
    kw = dict(num_global_tokens=int(mask.sum()), num_global_seqs=B)
    with_ent, met = actor_loss(cfg, logp_pad, old, adv, mask, entropy_BT=ent, **kw)
    without, _ = actor_loss(cfg, logp_pad, old, adv, mask, **kw)
    assert with_ent.item() == without.item() and "actor/entropy_loss" not in met.compute()
    assert not with_ent.requires_grad or torch.autograd.grad(with_ent, z, allow_unused=True)[0] is None
    with pytest.raises(ValueError, match="entropy_coeff"):
        AlgorithmConfig(preset="grpo", entropy_coeff=float("nan"))


def test_metrics_merge_is_exact_not_mean_of_means():
    vals = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0])]
    ms = [Metrics().add_masked("x", v, torch.ones_like(v, dtype=torch.bool), min_name="x_min", max_name="x_max")
          .add_sum("s", v.sum()) for v in vals]
    merged = Metrics().merge(ms[0]).merge(ms[1]).compute()
    assert merged["x"] == pytest.approx(16 / 4)  # a mean of means would be 6.0
    assert merged["x_min"] == 1 and merged["x_max"] == 10 and merged["s"] == 16
    # pack / unpack round trip, and element-wise SUM/MIN/MAX of two packs = merge
    p0, p1 = ms[0].pack(), ms[1].pack()
    red = {"sum": p0["sum"] + p1["sum"], "min": torch.minimum(p0["min"], p1["min"]),
           "max": torch.maximum(p0["max"], p1["max"])}
    assert ms[0].unpack(red).compute() == merged
    empty = Metrics().add_masked("y", torch.zeros(2), torch.zeros(2, dtype=torch.bool), min_name="y_min")
    assert empty.compute() == {}
