"""Routing drift and load metrics against hand-written references (Python sets and loops),
exact summability over micro-batches, masks, and the errors for bad input."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from moe_rl.routing.metrics import (drift_counts, drift_name, finalize_drift, finalize_load, load_counts,
                                    load_name, sum_counts)

# T tokens, L MoE layers, K top-k, E experts


def _ref_drift(a, b, mask=None, pa=None, pb=None):
    """Per-layer flip / overlap / KL means and the any-layer flip fraction, by loops over lists."""
    T, L, K = len(a), len(a[0]), len(a[0][0])
    toks = [t for t in range(T) if mask is None or mask[t]]
    flip, over, kl = [0.0] * L, [0.0] * L, [0.0] * L
    any_flip = 0
    for t in toks:
        flipped = False
        for l in range(L):
            sa, sb = set(a[t][l]), set(b[t][l])
            if sa != sb:
                flip[l] += 1
                flipped = True
            over[l] += len(sa & sb) / K
            if pa is not None:
                kl[l] += sum(p * math.log(p / q) for p, q in zip(pa[t][l], pb[t][l]) if p > 0)
        any_flip += flipped
    n = len(toks)
    return [f / n for f in flip], [o / n for o in over], [k / n for k in kl], any_flip / n


def _random_case(T=40, L=3, K=2, E=6, seed=0, p_keep=0.7):
    g = torch.Generator().manual_seed(seed)
    a = torch.stack([torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(L)]) for _ in range(T)])
    b = a.clone()
    resample = torch.rand(T, L, generator=g) > p_keep
    for t, l in resample.nonzero().tolist():
        b[t, l] = torch.randperm(E, generator=g)[:K]
    pa = torch.softmax(torch.randn(T, L, E, generator=g), -1)
    pb = torch.softmax(pa.log() + 0.3 * torch.randn(T, L, E, generator=g), -1)
    return a, b, pa, pb


def test_hand_computed_small_case():
    # 3 tokens, 2 layers, top-2. Token 0: same sets (order swapped in layer 1 is not a flip);
    # token 1: layer 0 shares one expert; token 2: layer 1 shares none.
    a = torch.tensor([[[0, 1], [2, 3]], [[0, 1], [2, 3]], [[4, 5], [0, 1]]], dtype=torch.int16)
    b = torch.tensor([[[0, 1], [3, 2]], [[1, 2], [2, 3]], [[5, 4], [2, 3]]], dtype=torch.int16)
    m = finalize_drift(drift_counts(a, b), "old_new", [3, 7])
    assert m["routing/flip_frac/old_new/layer_3"] == pytest.approx(1 / 3)
    assert m["routing/flip_frac/old_new/layer_7"] == pytest.approx(1 / 3)
    assert m["routing/flip_frac/old_new"] == pytest.approx(1 / 3)
    assert m["routing/topk_overlap/old_new/layer_3"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["routing/topk_overlap/old_new/layer_7"] == pytest.approx((1 + 1 + 0) / 3)
    assert m["routing/topk_overlap/old_new"] == pytest.approx((2.5 / 3 + 2 / 3) / 2)
    assert m["routing/any_layer_flip_frac/old_new"] == pytest.approx(2 / 3)
    assert not any("router_kl" in k for k in m)  # no probabilities given
    assert "routing/any_layer_flip_frac/old_new/layer_3" not in m


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_random_case_matches_set_reference(dtype):
    a, b, pa, pb = _random_case(seed=1)
    mask = torch.rand(a.shape[0], generator=torch.Generator().manual_seed(5)) > 0.3
    m = finalize_drift(drift_counts(a.to(dtype), b.to(dtype), mask, probs_a_TLE=pa, probs_b_TLE=pb),
                       "rollout_old", [1, 2, 5])
    flip, over, kl, anyf = _ref_drift(a.tolist(), b.tolist(), mask.tolist(), pa.tolist(), pb.tolist())
    for j, layer in enumerate([1, 2, 5]):
        assert m[f"routing/flip_frac/rollout_old/layer_{layer}"] == pytest.approx(flip[j], abs=1e-12)
        assert m[f"routing/topk_overlap/rollout_old/layer_{layer}"] == pytest.approx(over[j], abs=1e-12)
        assert m[f"routing/router_kl/rollout_old/layer_{layer}"] == pytest.approx(kl[j], rel=1e-5)
    assert m["routing/flip_frac/rollout_old"] == pytest.approx(sum(flip) / 3, abs=1e-12)
    assert m["routing/router_kl/rollout_old"] == pytest.approx(sum(kl) / 3, rel=1e-5)
    assert m["routing/any_layer_flip_frac/rollout_old"] == pytest.approx(anyf, abs=1e-12)
    assert 0 < m["routing/flip_frac/rollout_old"] < 1 and m["routing/router_kl/rollout_old"] > 0


def test_kl_direction_and_zero_probabilities():
    # KL(p_a || p_b): experts with p_a = 0 add nothing, whatever p_b is there.
    pa = torch.tensor([[[0.5, 0.5, 0.0]]], dtype=torch.float64)
    pb = torch.tensor([[[0.25, 0.25, 0.5]]], dtype=torch.float64)
    idx = torch.tensor([[[0, 1]]])
    m = finalize_drift(drift_counts(idx, idx, probs_a_TLE=pa, probs_b_TLE=pb), "old_new", [0])
    assert m["routing/router_kl/old_new"] == pytest.approx(math.log(2))  # reverse direction is inf
    c16 = drift_counts(idx, idx, probs_a_TLE=pa.to(torch.bfloat16), probs_b_TLE=pb.half())
    assert c16["kl_L"].dtype == torch.float64 and c16["kl_L"].item() == pytest.approx(math.log(2), rel=1e-6)
    m2 = finalize_drift(drift_counts(idx, idx, probs_a_TLE=pb, probs_b_TLE=pa), "old_new", [0])
    assert m2["routing/router_kl/old_new"] == math.inf
    assert m["routing/flip_frac/old_new"] == 0.0 and m["routing/topk_overlap/old_new"] == 1.0


def test_micro_batches_and_ranks_sum_to_the_whole_batch():
    a, b, pa, pb = _random_case(T=50, seed=3)
    mask = torch.ones(50, dtype=torch.bool)
    mask[[3, 17, 40]] = False
    whole = drift_counts(a, b, mask, probs_a_TLE=pa, probs_b_TLE=pb)
    cuts = [(0, 7), (7, 30), (30, 50)]
    parts = [drift_counts(a[i:j], b[i:j], mask[i:j], probs_a_TLE=pa[i:j], probs_b_TLE=pb[i:j]) for i, j in cuts]
    summed = sum_counts(parts)
    for k in ("tokens_L", "flips_L", "overlap_L", "slots_L", "tokens", "any_layer_flips"):
        assert torch.equal(summed[k], whole[k]), k
    ids = [0, 1, 2]
    assert finalize_drift(summed, "old_new", ids) == pytest.approx(finalize_drift(whole, "old_new", ids), rel=1e-12)
    assert int(whole["tokens"]) == 47
    # load counts: a plain sum too, and equal to a per-token loop
    lw = load_counts(a, 6, mask)
    assert torch.equal(sum(load_counts(a[i:j], 6, mask[i:j]) for i, j in cuts), lw)
    ref = [[0] * 6 for _ in range(3)]
    for t in range(50):
        if mask[t]:
            for l in range(3):
                for e in a[t, l].tolist():
                    ref[l][e] += 1
    assert lw.tolist() == ref and lw.dtype == torch.int64


def test_mask_ignores_placeholders_and_accepts_0_1():
    a = torch.tensor([[[0, 1]], [[2, 3]], [[0, 0]]])  # last token: no route, placeholder row
    b = torch.tensor([[[1, 0]], [[2, 4]], [[0, 0]]])
    c = drift_counts(a, b, torch.tensor([1, 1, 0]), return_flips=True)
    assert c["tokens"].item() == 2 and c["flips_L"].tolist() == [1]
    assert c["flip_T"].tolist() == [False, True, False]
    with pytest.raises(ValueError, match="repeats an expert"):
        drift_counts(a, b)


def test_load_metrics_against_statistics_module():
    load = torch.tensor([[4, 0, 2, 2], [2, 2, 2, 2], [8, 0, 0, 0]])
    m = finalize_load(load, [1, 3, 5])
    for j, row in enumerate(load.tolist()):
        mean = sum(row) / len(row)
        layer = [1, 3, 5][j]
        assert m[f"routing/load_max_over_mean/layer_{layer}"] == pytest.approx(max(row) / mean)
        assert m[f"routing/load_cv/layer_{layer}"] == pytest.approx(statistics.pstdev(row) / mean)
        assert m[f"routing/dead_experts/layer_{layer}"] == row.count(0)
    assert m["routing/load_max_over_mean"] == pytest.approx((2 + 1 + 4) / 3)
    assert m["routing/dead_experts"] == pytest.approx((1 + 0 + 3) / 3)
    assert m["routing/load_cv/layer_3"] == 0.0


def test_names():
    assert drift_name("flip_frac", "old_new", 12) == "routing/flip_frac/old_new/layer_12"
    assert load_name("load_cv") == "routing/load_cv"
    with pytest.raises(ValueError, match="no per-layer"):
        drift_name("any_layer_flip_frac", "old_new", 0)
    with pytest.raises(ValueError, match="pair"):
        drift_name("flip_frac", "old_rollout")


def test_bad_input_names_the_numbers():
    a = torch.zeros(4, 2, 2, dtype=torch.int64)
    a[..., 1] = 1
    with pytest.raises(ValueError, match=r"\(4, 2, 2\) and \(4, 2, 3\)"):
        drift_counts(a, torch.zeros(4, 2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer expert indices"):
        drift_counts(a.float(), a.float())
    with pytest.raises(ValueError, match=r"3 dims.*\(4, 4\)"):
        drift_counts(a.reshape(4, 4), a.reshape(4, 4))
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        drift_counts(a, a, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="0/1"):
        drift_counts(a, a, torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="both"):
        drift_counts(a, a, probs_a_TLE=torch.rand(4, 2, 3))
    with pytest.raises(ValueError, match=r"tokens=4, layers=2"):
        drift_counts(a, a, probs_a_TLE=torch.rand(4, 3, 3), probs_b_TLE=torch.rand(4, 3, 3))
    with pytest.raises(ValueError, match=r"\[0, 4\).*max 5"):
        load_counts(a + 4, 4)
    with pytest.raises(ValueError, match="3 entries but the counts has 2 layers"):
        finalize_drift(drift_counts(a, a), "old_new", [0, 1, 2])
    with pytest.raises(ValueError, match=r"layer\(s\) \[0, 1\]"):
        finalize_drift(drift_counts(a, a, torch.zeros(4, dtype=torch.bool)), "old_new", [0, 1])
    with pytest.raises(ValueError, match=r"layer\(s\) \[9\]"):
        finalize_load(torch.tensor([[1, 2], [0, 0]]), [8, 9])
    with pytest.raises(ValueError, match="keys"):
        sum_counts([drift_counts(a, a), drift_counts(a, a, probs_a_TLE=torch.rand(4, 2, 3),
                                                     probs_b_TLE=torch.rand(4, 2, 3))])
