"""API of the actor loss where peer recipes map onto it: the per-token loss matrix, per-response
advantages, seq_clipfrac over all responses, and one definition of every clamp constant."""

import ast
import math
from pathlib import Path

import pytest
import torch

import moe_rl.algorithms
from moe_rl.algorithms.actor_loss import actor_loss
from moe_rl.algorithms.aggregation import aggregate
from moe_rl.algorithms.config import BASE_DEFAULTS, POLICY_LOSSES, AlgorithmConfig
from moe_rl.algorithms.policy_loss import policy_loss

D = torch.float64
LENS = [5, 3, 0, 4, 1]
B, T = len(LENS), 5


def _data(seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g, dtype=D) * 2).requires_grad_()
    old = logp.detach() + spread * torch.randn(B, T, generator=g, dtype=D)
    roll = old + 0.4 * torch.randn(B, T, generator=g, dtype=D)
    ref = logp.detach() - 0.3 * torch.rand(B, T, generator=g, dtype=D)
    adv_B = torch.tensor([1.3, -0.7, 0.5, -2.0, 0.4], dtype=D)
    mask = torch.tensor([[t < n for t in range(T)] for n in LENS])
    return logp, old, roll, ref, adv_B, mask


def test_token_loss_matrix_is_weighted_surrogate_plus_beta_kl():
    logp, old, roll, ref, adv_B, mask = _data()
    cfg = AlgorithmConfig(preset="grpo", kl_beta=0.1, mismatch="tis", loss_agg="token-mean")
    loss, _, tok = actor_loss(cfg, logp, old, adv_B, mask, num_global_tokens=13, num_global_seqs=5,
                              ref_logp_BT=ref, rollout_logp_BT=roll, with_token_loss=True)
    assert not tok.requires_grad and (tok[~mask] == 0).all()
    for i, n in enumerate(LENS):
        for t in range(n):
            A = adv_B[i].item()
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            l = max(-A * rho, -A * min(max(rho, 0.8), 1.2))
            w = min(math.exp(old[i, t].item() - roll[i, t].item()), 2.0)
            x = logp[i, t].item() - ref[i, t].item()
            assert tok[i, t].item() == pytest.approx(w * l + 0.1 * (math.exp(-x) + x - 1), rel=1e-12)
    assert tok.sum().item() / 13 == pytest.approx(loss.item(), rel=1e-12)


@pytest.mark.parametrize("kw", [
    dict(preset="gspo", clip_low=0.01, clip_high=0.02),
    dict(preset="sapo", mismatch="seq-tis"),
    dict(preset="dr_grpo", max_response_len=7, kl_beta=0.2, kl_estimator="abs"),
    dict(preset="grpo", loss_agg="token-sum", kl_straight_through=True),
])
def test_token_loss_matrix_aggregates_to_the_loss(kw):
    logp, old, roll, ref, adv_B, mask = _data()
    cfg = AlgorithmConfig(**kw)
    kwargs = dict(num_global_tokens=13, num_global_seqs=5, ref_logp_BT=ref, rollout_logp_BT=roll)
    loss, m, tok = actor_loss(cfg, logp, old, adv_B, mask, with_token_loss=True, **kwargs)
    agg = aggregate(tok, mask, cfg.loss_agg, num_global_tokens=13, num_global_seqs=5,
                    max_response_len=cfg.max_response_len)
    assert agg.item() == pytest.approx(loss.item(), rel=1e-12)
    loss2, m2 = actor_loss(cfg, logp, old, adv_B, mask, **kwargs)  # default: two values, unchanged
    assert loss2.item() == loss.item() and m2.compute() == m.compute()


@pytest.mark.parametrize("name", POLICY_LOSSES)
def test_per_response_advantage_equals_broadcast(name):
    logp, old, roll, ref, adv_B, mask = _data(spread=0.05)
    cfg = AlgorithmConfig(preset="grpo", policy_loss=name, clip_low=0.1, clip_high=0.1, kl_beta=0.05,
                          mismatch="icepop")
    kwargs = dict(num_global_tokens=13, num_global_seqs=5, ref_logp_BT=ref, rollout_logp_BT=roll)
    l1, m1 = actor_loss(cfg, logp, old, adv_B, mask, **kwargs)
    l2, m2 = actor_loss(cfg, logp, old, adv_B[:, None].expand(B, T).clone(), mask, **kwargs)
    assert l1.item() == pytest.approx(l2.item(), rel=1e-12, abs=1e-15)
    g1, = torch.autograd.grad(l1, logp)
    g2, = torch.autograd.grad(l2, logp)
    assert torch.allclose(g1, g2, atol=1e-14)
    v1, v2 = m1.compute(), m2.compute()
    assert v1.keys() == v2.keys() and all(v1[k] == pytest.approx(v2[k], rel=1e-12, abs=1e-15) for k in v1)


def test_advantage_shape_is_checked():
    logp, old, _, _, adv_B, mask = _data()
    for bad in (adv_B[:3], adv_B[:, None].expand(B, 2), adv_B[:, None, None]):
        with pytest.raises(ValueError, match="advantages must be"):
            policy_loss("ppo", logp, old, bad, mask, clip_low=0.2, clip_high=0.2)


def test_seq_clipfrac_counts_every_response_empty_ones_included():
    logp, old, _, _, adv_B, mask = _data(spread=0.05)
    _, m = actor_loss(AlgorithmConfig(preset="gspo", clip_low=0.01, clip_high=0.01), logp, old, adv_B, mask,
                      num_global_tokens=13, num_global_seqs=5)
    clipped = 0
    for i, n in enumerate(LENS):
        if n:
            s = math.exp(sum(logp[i, t].item() - old[i, t].item() for t in range(n)) / n)
            A = adv_B[i].item()
            clipped += (A > 0 and s > 1.01) or (A < 0 and s < 0.99)
    assert 0 < clipped
    assert m.compute()["actor/seq_clipfrac"] == pytest.approx(clipped / B)  # 5 responses, one empty


# ------------------------------------------------------------------ one definition per clamp constant

PKG_DIR = Path(moe_rl.algorithms.__file__).parent


def _is_number(node):
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool)


def test_no_clamp_takes_a_literal_bound():
    """Clamp bounds are named constants (ratio.LOG_RATIO_CLAMP, kl.K3_MAX, policy_loss.VESPO_*)
    or config values; only the structural 0 and 1 (counts, probabilities) are written inline."""
    for path in PKG_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                    "clamp", "clamp_", "clip"):
                for arg in list(node.args) + [k.value for k in node.keywords]:
                    if _is_number(arg):
                        v = ast.literal_eval(arg)
                        assert v in (0, 1), f"{path.name}:{node.lineno} clamps at the literal {v}"


def test_function_defaults_come_from_base_defaults():
    """A function parameter named like a config field takes its default from BASE_DEFAULTS,
    never from a second literal copy."""
    for path in PKG_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            a = node.args
            pos = list(zip(a.args[len(a.args) - len(a.defaults):], a.defaults))
            kw = [(arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            for arg, default in pos + kw:
                if arg.arg in BASE_DEFAULTS:
                    assert not isinstance(default, ast.Constant), (
                        f"{path.name}:{node.lineno} {node.name}({arg.arg}=...) repeats a default of BASE_DEFAULTS")


def test_every_new_ratio_path_uses_the_one_log_ratio_clamp(monkeypatch):
    """Moving ratio.LOG_RATIO_CLAMP to 3 moves every bound built on it: gspo_token's combined
    log-ratio, sapo's ratio, vespo's sequence weight, seq-tis / seq-icepop's product."""
    from moe_rl.algorithms import ratio
    from moe_rl.algorithms.mismatch import mismatch_weights

    monkeypatch.setattr(ratio, "LOG_RATIO_CLAMP", 3.0)
    e3 = math.exp(3.0)
    logp = torch.zeros(1, 4, dtype=D, requires_grad=True)
    far = torch.full((1, 4), -10.0, dtype=D)  # log-ratio +10 per token
    adv, mask = -torch.ones(1, 4, dtype=D), torch.ones(1, 4, dtype=torch.bool)
    out = policy_loss("gspo_token", logp, far, adv, mask, clip_low=0.5, clip_high=100.0)
    assert out.loss_BT[0, 0].item() == pytest.approx(e3)  # -A * s with s = e^3
    assert (torch.autograd.grad(out.loss_BT.sum(), logp)[0] == 0).all()
    assert policy_loss("sapo", logp, far, adv, mask, clip_low=0.2, clip_high=0.2).ratio_BT.max().item() \
        == pytest.approx(e3)
    out = policy_loss("vespo", logp, far, adv, mask, clip_low=0.2, clip_high=0.2, vespo_k_neg=1.0,
                      vespo_lambda_neg=1e-4)
    # phi = e^lam * w^k * e^{-lam w} with w = e^3 (the sum 40 clamped to 3)
    lam = 1e-4
    phi = math.exp(lam + 3.0 - lam * e3)
    g, = torch.autograd.grad(out.loss_BT.sum(), logp)
    assert g[0, 0].item() == pytest.approx(phi, rel=1e-12)
    for mode in ("seq-tis", "seq-icepop"):
        w, _ = mismatch_weights(logp.detach(), far, mask, mode, tis_cap=1e9, icepop_low=0.0, icepop_high=1e9)
        assert w[0, 0].item() == pytest.approx(e3)
