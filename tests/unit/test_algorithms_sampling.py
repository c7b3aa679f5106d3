"""Mismatch correction (TIS, IcePop, seq-MIS) and sampling filters (DAPO, GFPO) against the spec."""

import math

import pytest
import torch

from moe_rl.algorithms.mismatch import mismatch_weights
from moe_rl.algorithms.sampling import (
    fill_informative,
    gfpo_select,
    informative_groups,
    overlong_filter_mask,
    overlong_penalty,
    rollout_metrics,
)

D = torch.float64


def _mm_data():
    # log w = old - rollout per token
    log_w = torch.tensor([[0.0, math.log(3.0), math.log(0.4), 0.1],
                          [math.log(6.0), -0.05, 0.0, 9.0],
                          [0.05, -0.05, 0.02, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    rollout = torch.full((3, 4), -1.0, dtype=D)
    return rollout + log_w, rollout, mask, log_w


def test_tis_truncates_weight_at_cap():
    old, roll, mask, log_w = _mm_data()
    w, _ = mismatch_weights(old, roll, mask, "tis", tis_cap=2.0)
    for i in range(3):
        for t in range(4):
            want = min(math.exp(log_w[i, t].item()), 2.0) if mask[i, t] else 0.0
            assert w[i, t].item() == pytest.approx(want)


def test_icepop_masks_tokens_outside_band():
    old, roll, mask, log_w = _mm_data()
    w, m = mismatch_weights(old, roll, mask, "icepop", icepop_low=0.5, icepop_high=5.0)
    # IcePop's M(k) = k inside the band: the weight is w there, not 1 (issue 9: it was 1)
    for i in range(3):
        for t in range(4):
            wi = math.exp(log_w[i, t].item())
            want = wi if (mask[i, t] and 0.5 <= wi <= 5.0) else 0.0
            assert w[i, t].item() == pytest.approx(want, rel=1e-14)
    # tokens (0,2) w=0.4 and (1,0) w=6 are masked: 2 of 11 valid tokens
    assert m.compute()["mismatch/masked_frac"] == pytest.approx(2 / 11)


def test_seq_mis_drops_whole_response_by_geometric_mean():
    old, roll, mask, log_w = _mm_data()
    w, m = mismatch_weights(old, roll, mask, "seq-mis", seq_mis_low=0.8, seq_mis_high=1.25)
    for i in range(3):
        n = int(mask[i].sum())
        geo = math.exp(sum(log_w[i, t].item() for t in range(n)) / n)
        keep = 0.8 <= geo <= 1.25
        for t in range(4):
            assert w[i, t].item() == (1.0 if keep and mask[i, t] else 0.0)
    assert w[2].sum() == 4 and w[1].sum() == 0  # row 2 near on-policy; row 1 geo-mean w = 1.79
    v = m.compute()
    assert v["mismatch/is_weight_max"] == pytest.approx(6.0)  # the padded 9.0 is ignored
    assert v["mismatch/extreme_frac"] == pytest.approx(3 / 11)  # |log w| > ln 2: w=3, 0.4, 6


def test_mismatch_weights_are_detached_and_mode_checked():
    old, roll, mask, _ = _mm_data()
    old = old.clone().requires_grad_()
    w, _ = mismatch_weights(old, roll, mask, "tis")
    assert not w.requires_grad
    with pytest.raises(ValueError, match="not one of none, tis, icepop, seq-mis"):
        mismatch_weights(old, roll, mask, "mis")


def test_dynamic_sampling_drops_all_equal_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 2.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2, 3])
    keep, m = informative_groups(r, g)
    assert keep.tolist() == [False, False, True, True, False, False, False]
    assert m.compute()["rollout/zero_std_group_frac"] == pytest.approx(3 / 4)


def test_fill_informative_stops_at_target_or_cap():
    rounds = [[[1, 1], [0, 1]], [[0, 0], [1, 0]], [[0, 1], [1, 1]], [[1, 0]]]
    seen = []

    def gen(i):
        seen.append(i)
        return rounds[i]
    got, n, filled = fill_informative(gen, lambda gr: gr, num_groups=3, max_extra_rounds=5)
    assert got == [[0, 1], [1, 0], [0, 1]] and n == 3 and filled == 0 and seen == [0, 1, 2]


def test_fill_informative_completes_with_the_latest_uninformative_groups_at_the_cap():
    """The cap is 1 + max_extra_rounds rounds; the batch is then completed with the
    non-informative groups that arrived last (a group of one is never informative)."""
    rounds = [[[1, 1], [0, 1], [2]], [[0, 0], [3, 3]], [[5, 5]]]
    got, n, filled = fill_informative(lambda i: rounds[i], lambda gr: gr, num_groups=3, max_extra_rounds=1)
    assert n == 2 and filled == 2 and got == [[0, 1], [0, 0], [3, 3]]
    got, n, filled = fill_informative(lambda i: rounds[i], lambda gr: gr, num_groups=9, max_extra_rounds=2)
    spare = [[1, 1], [2], [0, 0], [3, 3], [5, 5]]
    assert n == 3 and filled == len(spare) and got == [[0, 1]] + spare  # fewer than asked: all there is


def test_overlong_penalty_piecewise():
    L, C = 100, 20
    lens = [0, 80, 81, 90, 100, 101, 500]
    got = overlong_penalty(torch.tensor(lens), max_len=L, cache_len=C).tolist()
    want = [0.0 if n <= L - C else ((L - C) - n) / C if n <= L else -1.0 for n in lens]
    assert got == pytest.approx(want)
    assert got[4] == -1.0 and got[2] == pytest.approx(-0.05)
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor(lens), max_len=10, cache_len=10)


def test_overlong_filter_clears_truncated_responses():
    mask = torch.ones(3, 4, dtype=torch.bool)
    out = overlong_filter_mask(mask, torch.tensor([False, True, False]))
    assert out.sum(-1).tolist() == [4, 0, 4]


def test_gfpo_keeps_shortest_or_most_efficient():
    g = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    lens = torch.tensor([10, 3, 7, 3, 50, 20, 30, 40])
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    keep = gfpo_select(g, lens, r, keep=2, metric="length")
    assert keep.tolist() == [False, True, False, True, False, True, True, False]
    keep = gfpo_select(g, lens, r, keep=2, metric="reward_per_token")
    # group 0: r/len = .1, 0, .143, .333 -> idx 3, 2; group 1: .02, 0, .033, .025 -> idx 6, 7
    assert keep.tolist() == [False, False, True, True, False, False, True, True]
    with pytest.raises(ValueError, match="group 0 has 4 responses, fewer than keep=5"):
        gfpo_select(g, lens, r, keep=5)


def test_rollout_metrics():
    m = rollout_metrics(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]),
                        torch.tensor([5, 7, 9, 3]), torch.tensor([False, True, False, False])).compute()
    assert m["rollout/reward_mean"] == 0.75 and m["rollout/response_len_mean"] == 6
    assert m["rollout/response_len_max"] == 9 and m["rollout/truncated_frac"] == 0.25
    assert m["rollout/zero_std_group_frac"] == 0.5
