"""Advantage estimators against direct transcriptions of docs/algorithms.md (axis 1).

References are plain Python loops over lists (statistics module), written separately
from the vectorized code under test.
"""

import math
import statistics

import pytest
import torch

from moe_rl.algorithms.advantages import (
    compute_advantages,
    gdpo_advantages,
    outcome_advantages,
    process_advantages,
)
from moe_rl.algorithms.config import AlgorithmConfig

D = torch.float64


def _groups(gids):
    out = {}
    for i, g in enumerate(gids):
        out.setdefault(g, []).append(i)
    return out


def ref_group_adv(estimator, rewards, gids, eps=1e-6):
    A = [0.0] * len(rewards)
    for g, idx in _groups(gids).items():
        r = [rewards[i] for i in idx]
        n = len(r)
        mean = sum(r) / n
        for i in idx:
            if n == 1 or max(r) == min(r):
                A[i] = 0.0
            elif estimator == "grpo":
                A[i] = (rewards[i] - mean) / (statistics.stdev(r) + eps)
            elif estimator == "dr_grpo":
                A[i] = rewards[i] - mean
            elif estimator == "rloo":
                others = [rewards[j] for j in idx if j != i]
                A[i] = rewards[i] - sum(others) / len(others)
    return A


def ref_whiten_tokens(values_per_token, mask):
    """values_per_token[i][t] over valid tokens: token-weighted mean, unbiased var, rsqrt(var+1e-8)."""
    flat = [values_per_token[i][t] for i in range(len(mask)) for t in range(len(mask[i])) if mask[i][t]]
    mu = sum(flat) / len(flat)
    var = sum((x - mu) ** 2 for x in flat) / (len(flat) - 1)
    return [
        [(values_per_token[i][t] - mu) / math.sqrt(var + 1e-8) if mask[i][t] else 0.0 for t in range(len(mask[i]))]
        for i in range(len(mask))
    ]


REWARDS = [1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, -1.0, 4.0, 0.25, 7.0]
GIDS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4]  # ragged groups, an all-equal group, groups of one
LENS = [3, 5, 1, 4, 2, 5, 3, 4, 1, 2, 5]
T = 6


def _mask():
    return torch.tensor([[t < n for t in range(T)] for n in LENS])


@pytest.mark.parametrize("est", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_formula(est):
    mask = _mask()
    adv, metrics = outcome_advantages(est, torch.tensor(REWARDS, dtype=D), torch.tensor(GIDS), mask)
    ref = ref_group_adv(est, REWARDS, GIDS)
    for i, n in enumerate(LENS):
        for t in range(T):
            want = ref[i] if t < n else 0.0
            assert adv[i, t].item() == pytest.approx(want, abs=1e-12)
    # all-equal group 1 and the singleton groups 3, 4 -> exactly zero
    assert (adv[4:7] == 0).all() and (adv[9:] == 0).all()
    assert metrics.compute()["rollout/zero_std_group_frac"] == pytest.approx(3 / 5)


def test_rloo_closed_form_matches_leave_one_out():
    r = torch.tensor([1.0, 4.0, 2.0, 0.0], dtype=D)
    adv, _ = outcome_advantages("rloo", r, torch.zeros(4, dtype=torch.long), torch.ones(4, 1, dtype=torch.bool))
    G = 4
    assert torch.allclose(adv[:, 0], G / (G - 1) * (r - r.mean()))


def test_grpo_all_equal_non_representable_mean_is_exactly_zero():
    r = torch.tensor([0.1, 0.1, 0.1], dtype=D)
    adv, _ = outcome_advantages("grpo", r, torch.zeros(3, dtype=torch.long), torch.ones(3, 2, dtype=torch.bool))
    assert (adv == 0).all()


@pytest.mark.parametrize("est", ["reinforce_pp", "reinforce_pp_baseline"])
def test_reinforce_pp_token_whitening(est):
    mask = _mask()
    adv, _ = outcome_advantages(est, torch.tensor(REWARDS, dtype=D), torch.tensor(GIDS), mask)
    if est == "reinforce_pp":
        base = REWARDS
    else:
        base = [0.0] * len(REWARDS)
        for g, idx in _groups(GIDS).items():
            # a group of one (3, 4) has baseline 0, as verl
            mean = sum(REWARDS[i] for i in idx) / len(idx) if len(idx) > 1 else 0.0
            for i in idx:
                base[i] = REWARDS[i] - mean
    per_tok = [[base[i]] * T for i in range(len(base))]
    ref = ref_whiten_tokens(per_tok, mask.tolist())
    assert torch.allclose(adv, torch.tensor(ref, dtype=D), atol=1e-10)


def test_reinforce_pp_kl_in_reward_is_reverse_cumsum_of_penalty():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    pen = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.0, -0.1, 0.05, 0.2]], dtype=D)
    r = [1.0, 0.0]
    adv, _ = outcome_advantages("reinforce_pp", torch.tensor(r, dtype=D), torch.tensor([0, 0]), mask,
                                token_penalty_BT=pen)
    ret = []
    for i in range(2):
        row = []
        for t in range(4):
            row.append(r[i] - sum(pen[i, s].item() for s in range(t, 4) if mask[i, s]) if mask[i, t] else 0.0)
        ret.append(row)
    ref = ref_whiten_tokens(ret, mask.tolist())
    assert torch.allclose(adv, torch.tensor(ref, dtype=D), atol=1e-10)


def test_reinforce_pp_baseline_kl_in_reward_is_group_deviation_minus_penalty_returns():
    """OpenRLHF's REINFORCE++-baseline: the group mean is taken of the outcome rewards, then the
    per-token penalties are summed backwards into the returns; a group of one has baseline 0."""
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    pen = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.0, -0.1, 0.05, 0.2], [0.3, 0.1, 4.0, 4.0]], dtype=D)
    r, gids = [1.0, 0.0, 2.0], [0, 0, 1]
    adv, _ = outcome_advantages("reinforce_pp_baseline", torch.tensor(r, dtype=D), torch.tensor(gids), mask,
                                token_penalty_BT=pen)
    base = [r[0] - (r[0] + r[1]) / 2, r[1] - (r[0] + r[1]) / 2, r[2]]
    ret = [[base[i] - sum(pen[i, s].item() for s in range(t, 4) if mask[i, s]) if mask[i, t] else 0.0
            for t in range(4)] for i in range(3)]
    ref = ref_whiten_tokens(ret, mask.tolist())
    assert torch.allclose(adv, torch.tensor(ref, dtype=D), atol=1e-10)


def test_grpo_kl_in_reward_subtracts_summed_penalty_before_grouping():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    pen = torch.tensor([[0.1, 0.2, 5.0], [0.3, 0.0, 0.1], [0.4, 7.0, 7.0]], dtype=D)
    r = [1.0, 0.0, 1.0]
    adv, _ = outcome_advantages("grpo", torch.tensor(r, dtype=D), torch.zeros(3, dtype=torch.long), mask,
                                token_penalty_BT=pen)
    r2 = [r[0] - 0.3, r[1] - 0.4, r[2] - 0.4]
    ref = ref_group_adv("grpo", r2, [0, 0, 0])
    for i in range(3):
        assert adv[i, 0].item() == pytest.approx(ref[i], rel=1e-9)


def test_gdpo_normalizes_each_reward_then_whitens_over_responses():
    gids = [0, 0, 0, 1, 1, 1]
    acc = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    fmt = [0.2, 0.9, 0.9, 0.5, 0.5, 0.5]  # group 1 all equal
    w = {"acc": 1.0, "fmt": 0.5}
    mask = torch.ones(6, 2, dtype=torch.bool)
    adv, _ = gdpo_advantages({"acc": torch.tensor(acc, dtype=D), "fmt": torch.tensor(fmt, dtype=D)}, w,
                             torch.tensor(gids), mask)
    a_acc = ref_group_adv("grpo", acc, gids)
    a_fmt = ref_group_adv("grpo", fmt, gids)
    tot = [w["acc"] * a + w["fmt"] * b for a, b in zip(a_acc, a_fmt)]
    mu = sum(tot) / 6
    sd = math.sqrt(sum((x - mu) ** 2 for x in tot) / 5 + 1e-8)
    ref = [(x - mu) / sd for x in tot]
    assert torch.allclose(adv[:, 0], torch.tensor(ref, dtype=D), atol=1e-10)
    assert torch.equal(adv[:, 0], adv[:, 1])


def test_gdpo_reward_names_must_match_weights():
    with pytest.raises(ValueError, match="same rewards"):
        gdpo_advantages({"a": torch.zeros(2)}, {"b": 1.0}, torch.zeros(2, dtype=torch.long),
                        torch.ones(2, 1, dtype=torch.bool))


def test_process_rewards_normalized_per_group_and_summed_from_t():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ends = torch.tensor([[0, 1, 0, 1, 0], [0, 0, 1, 0, 0], [1, 0, 0, 0, 1]], dtype=torch.bool)
    step_r = torch.zeros(3, 5, dtype=D)
    vals = {(0, 1): 1.0, (0, 3): 0.0, (1, 2): 0.5, (2, 0): 2.0, (2, 4): -1.0}
    for k, v in vals.items():
        step_r[k] = v
    gids = [0, 0, 1]
    adv, _ = process_advantages(step_r, ends, torch.tensor(gids), mask)
    # group 0 steps: 1.0, 0.0, 0.5; group 1 steps: 2.0, -1.0
    norm = {}
    for g in (0, 1):
        ks = [k for k in vals if gids[k[0]] == g]
        xs = [vals[k] for k in ks]
        mu, sd = sum(xs) / len(xs), statistics.stdev(xs)
        for k in ks:
            norm[k] = (vals[k] - mu) / (sd + 1e-6)
    for i in range(3):
        for t in range(5):
            want = sum(v for (b, s), v in norm.items() if b == i and s >= t) if mask[i, t] else 0.0
            assert adv[i, t].item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_rejected_naming_group(bad):
    r = torch.tensor([1.0, 0.0, bad, 2.0], dtype=D)
    with pytest.raises(ValueError, match=r"group 7 .*not finite"):
        outcome_advantages("grpo", r, torch.tensor([3, 3, 7, 7]), torch.ones(4, 2, dtype=torch.bool))


def test_compute_advantages_dispatch_from_config():
    cfg = AlgorithmConfig(preset="gdpo", reward_names=["a", "b"], reward_weights=[1.0, 2.0])
    mask = torch.ones(4, 3, dtype=torch.bool)
    gids = torch.tensor([0, 0, 1, 1])
    rw = {"a": torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=D), "b": torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=D)}
    adv, _ = compute_advantages(cfg, rw, gids, mask)
    adv2, _ = gdpo_advantages(rw, {"a": 1.0, "b": 2.0}, gids, mask)
    assert torch.equal(adv, adv2)
    cfg = AlgorithmConfig(preset="rloo")
    adv, _ = compute_advantages(cfg, rw["a"], gids, mask)
    assert adv[0, 0].item() == pytest.approx(1.0) and adv[1, 0].item() == pytest.approx(-1.0)


# ------------------------------------------------------------- the peers' estimators and options


def _by_group(gids):
    return _groups(gids).items()


def test_opo_length_weighted_baseline():
    mask = _mask()
    adv, _ = outcome_advantages("opo", torch.tensor(REWARDS, dtype=D), torch.tensor(GIDS), mask)
    for g, idx in _by_group(GIDS):
        r = [REWARDS[i] for i in idx]
        base = 0.0 if len(idx) == 1 else sum(LENS[i] * REWARDS[i] for i in idx) / sum(LENS[i] for i in idx)
        for i in idx:
            want = 0.0 if (len(idx) > 1 and max(r) == min(r)) else REWARDS[i] - base
            for t in range(T):
                assert adv[i, t].item() == pytest.approx(want if t < LENS[i] else 0.0, abs=1e-12)
    assert adv[9, 0].item() == 0.25 and adv[10, 0].item() == 7.0  # groups of one: baseline 0


def test_gpg_alpha_over_batch_and_group_of_one():
    mask = _mask()
    adv, _ = outcome_advantages("gpg", torch.tensor(REWARDS, dtype=D), torch.tensor(GIDS), mask)
    alpha = len(REWARDS) / sum(1 for r in REWARDS if r != 0)  # 11 / 10: one zero reward
    for g, idx in _by_group(GIDS):
        r = [REWARDS[i] for i in idx]
        mean = 0.0 if len(idx) == 1 else sum(r) / len(r)
        for i in idx:
            want = 0.0 if (len(idx) > 1 and max(r) == min(r)) else alpha * (REWARDS[i] - mean)
            assert adv[i, 0].item() == pytest.approx(want, abs=1e-12)
            assert (adv[i, LENS[i]:] == 0).all()


def test_pass_at_k_only_the_best_response_gets_the_gap():
    gids = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 4]
    rewards = [1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, -1.0, 4.0, 0.25, 1.0, 1.0, 0.0]  # group 4: a tie at the top
    mask = torch.ones(len(rewards), 2, dtype=torch.bool)
    adv, _ = outcome_advantages("pass_at_k", torch.tensor(rewards, dtype=D), torch.tensor(gids), mask)
    want = [0.0] * len(rewards)
    for g, idx in _by_group(gids):
        if len(idx) < 2:
            continue
        r = sorted((rewards[i] for i in idx), reverse=True)
        best = max(idx, key=lambda i: (rewards[i], -i))
        want[best] = (r[0] - r[1]) / (statistics.stdev([rewards[i] for i in idx]) + 1e-6)
    assert adv[:, 0].tolist() == pytest.approx(want, abs=1e-12)
    assert adv[3, 0] > 0 and adv[8, 0] > 0 and (adv[10:, 0] == 0).all() and adv[9, 0] == 0


def test_grpo_batch_std_scope():
    mask = _mask()
    adv, _ = outcome_advantages("grpo", torch.tensor(REWARDS, dtype=D), torch.tensor(GIDS), mask, std_scope="batch")
    sd = statistics.stdev(REWARDS)  # every reward of the batch, one per response
    for g, idx in _by_group(GIDS):
        r = [REWARDS[i] for i in idx]
        for i in idx:
            want = 0.0 if max(r) == min(r) else (REWARDS[i] - sum(r) / len(r)) / (sd + 1e-6)
            assert adv[i, 0].item() == pytest.approx(want, abs=1e-12)


def test_rloo_normalize_over_the_batch():
    mask = _mask()
    adv, _ = outcome_advantages("rloo", torch.tensor(REWARDS, dtype=D), torch.tensor(GIDS), mask,
                                rloo_normalize=True, std_eps=1e-4)
    a = ref_group_adv("rloo", REWARDS, GIDS)
    mu, sd = sum(a) / len(a), statistics.stdev(a)
    for i, n in enumerate(LENS):
        assert adv[i, 0].item() == pytest.approx((a[i] - mu) / (sd + 1e-4), abs=1e-12)
        assert (adv[i, n:] == 0).all()


def test_reinforce_pp_discounted_returns_with_holes_and_kl():
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    pen = torch.tensor([[0.1, 0.2, 5.0, 0.3, 9.0], [0.0, -0.1, 0.05, 0.2, 0.1], [3.0, 0.1, 0.2, 7.0, 7.0]], dtype=D)
    r = [1.0, 0.0, 2.0]
    gamma = 0.9
    adv, _ = outcome_advantages("reinforce_pp", torch.tensor(r, dtype=D), torch.tensor([0, 0, 1]), mask,
                                gamma=gamma, token_penalty_BT=pen)
    rets = []
    for i in range(3):
        valid = [t for t in range(5) if mask[i, t]]
        last = valid[-1]
        row, R = [0.0] * 5, 0.0
        for t in reversed(range(5)):
            if mask[i, t]:
                u = (r[i] if t == last else 0.0) - pen[i, t].item()
                R = u + gamma * R
            row[t] = R
        rets.append(row)
    ref = ref_whiten_tokens(rets, mask.tolist())
    assert torch.allclose(adv, torch.tensor(ref, dtype=D), atol=1e-10)
    # gamma 1 is the undiscounted return r_i - sum_{s>=t} penalty_s
    adv1, _ = outcome_advantages("reinforce_pp", torch.tensor(r, dtype=D), torch.tensor([0, 0, 1]), mask,
                                 gamma=1.0, token_penalty_BT=pen)
    ret1 = [[(r[i] - sum(pen[i, s].item() for s in range(t, 5) if mask[i, s])) if mask[i, t] else 0.0
             for t in range(5)] for i in range(3)]
    assert torch.allclose(adv1, torch.tensor(ref_whiten_tokens(ret1, mask.tolist()), dtype=D), atol=1e-10)


def test_compute_advantages_passes_the_new_options():
    mask = _mask()
    r, g = torch.tensor(REWARDS, dtype=D), torch.tensor(GIDS)
    for kw, est, opts in [
        (dict(preset="grpo", std_scope="batch"), "grpo", dict(std_scope="batch")),
        (dict(preset="rloo", rloo_normalize=True), "rloo", dict(rloo_normalize=True)),
        (dict(preset="reinforce_pp", gamma=0.5), "reinforce_pp", dict(gamma=0.5)),
        (dict(preset="grpo", advantage="opo"), "opo", {}),
        (dict(preset="grpo", advantage="gpg"), "gpg", {}),
        (dict(preset="grpo", advantage="pass_at_k"), "pass_at_k", {}),
    ]:
        got, _ = compute_advantages(AlgorithmConfig(**kw), r, g, mask)
        want, _ = outcome_advantages(est, r, g, mask, **opts)
        assert torch.equal(got, want), kw


def test_batch_sum_is_called_the_same_way_whatever_the_data():
    """Each rank must issue the same batch_sum calls: their number and shapes depend on the
    estimator alone (a rank whose responses are all in flat groups calls like any other)."""
    calls = {}
    for data in ([1.0, 1.0, 2.0, 2.0], [0.0, 1.0, 3.0, 5.0]):
        for est, kw in [("grpo", dict(std_scope="batch")), ("rloo", dict(rloo_normalize=True)),
                        ("reinforce_pp", dict(gamma=0.9)), ("reinforce_pp_baseline", {}), ("gpg", {})]:
            seen = []
            outcome_advantages(est, torch.tensor(data, dtype=D), torch.tensor([0, 0, 1, 1]),
                               torch.ones(4, 3, dtype=torch.bool), batch_sum=lambda x: seen.append(tuple(x.shape)) or x,
                               **kw)
            calls.setdefault(est, []).append(seen)
    for est, (a, b) in calls.items():
        assert a == b and a, est
