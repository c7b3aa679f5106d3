"""Routes in the trainer's layout (pure parts of moe_rl.routing.layout / capture), against
positions and top-k computed by hand in the test."""

from __future__ import annotations

import pytest
import torch

from moe_rl.data import train_batch as tb
from moe_rl.rollout.types import FinishReason, Sample
from moe_rl.routing import RoutingConfig
from moe_rl.routing.capture import experts_from_map
from moe_rl.routing.layout import (OLD, ROLLOUT, VALID, Routes, attach_engine_routes, attach_positions,
                                   fill_missing, index_dtype, to_router_order)


def _sample(prompt, response, routes):
    return Sample(group_id=0, sample_index=0, prompt_ids=prompt, response_ids=response,
                  rollout_logprobs_T=torch.zeros(len(response)), routed_experts_NLK=routes,
                  finish_reason=FinishReason.LENGTH, weight_version="0")


def _engine_routes(n, L=3, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(8, generator=g)[:K] for _ in range(n * L)]).reshape(n, L, K).to(torch.int32)


def test_engine_routes_line_up_with_the_trainers_positions():
    samples = [_sample([5, 6, 7], [8, 9], _engine_routes(4, seed=1)),  # P + T - 1 = 4 rows
               _sample([5], [8, 9, 10, 11, 12], _engine_routes(5, seed=2)),
               _sample([4, 4], [3], None)]  # an engine that gave no routes for this one
    batch = tb.from_samples(samples, torch.zeros(3))
    mb = tb.to_microbatch(batch, [1, 0, 2], pad_multiple=4)  # S padded to 8
    attach_engine_routes([mb], [s.routed_experts_NLK for s in samples], batch.seq_lengths, [1, 2, 3], num_experts=8)
    r = mb[ROLLOUT]
    assert r.layer_ids == [1, 2, 3] and r.experts_BSLK.shape == (3, 8, 3, 2) and r.experts_BSLK.dtype == torch.int8
    for b, i in enumerate([1, 0, 2]):
        n = batch.seq_lengths[i]
        assert mb[VALID][b].tolist() == [t < n for t in range(8)]
        if samples[i].routed_experts_NLK is not None:
            # position t of the row is the engine's row t: the forward that read tokens[b, t]
            assert torch.equal(r.experts_BSLK[b, :n].long(), samples[i].routed_experts_NLK.long())
            assert mb["tokens"][b, :n].tolist() == (samples[i].prompt_ids + samples[i].response_ids)[:n]
        else:
            assert (r.experts_BSLK[b] == -1).all()
        assert (r.experts_BSLK[b, n:] == -1).all()


def test_engine_routes_of_the_wrong_length_or_range_are_refused():
    with pytest.raises(AssertionError):  # response-only rows (the old contract) no longer make a Sample
        _sample([5, 6, 7], [8, 9], _engine_routes(2))
    good = _sample([5, 6, 7], [8, 9], _engine_routes(4))
    batch = tb.from_samples([good], torch.zeros(1))
    mb = tb.to_microbatch(batch, [0])
    with pytest.raises(ValueError, match="prompt \\+ response - 1 = 4"):
        attach_engine_routes([mb], [_engine_routes(2)], batch.seq_lengths, [0, 1, 2], num_experts=8)
    with pytest.raises(ValueError, match="outside"):
        attach_engine_routes([mb], [good.routed_experts_NLK], batch.seq_lengths, [0, 1, 2], num_experts=4)
    with pytest.raises(ValueError, match="no batch row has engine routes"):
        attach_engine_routes([mb], [None], batch.seq_lengths, [0, 1, 2], num_experts=8)


def test_router_order_is_sequence_major_and_sliced_per_tp_rank():
    B, S = 3, 8
    x_BS = torch.arange(B * S).reshape(B, S)  # value = b * S + s
    full = to_router_order(x_BS, tp_rank=0, tp=1, sp=False)
    assert full.tolist() == [b * S + s for s in range(S) for b in range(B)]  # token s * B + b
    parts = [to_router_order(x_BS, tp_rank=r, tp=2, sp=True) for r in range(2)]
    assert torch.equal(torch.cat(parts), full)  # rank r holds positions [r*S/2, (r+1)*S/2)
    assert torch.equal(to_router_order(x_BS, tp_rank=1, tp=2, sp=False), full)  # no SP: every rank all
    with pytest.raises(ValueError, match="not divisible"):
        to_router_order(torch.zeros(2, 5), tp_rank=0, tp=2, sp=True)


def test_experts_from_map_gives_the_sets_and_counts_bad_rows():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 16, generator=g)
    top = logits.topk(4, dim=-1).indices
    routing_map = torch.zeros(50, 16, dtype=torch.bool).scatter_(1, top, True)
    idx, bad = experts_from_map(routing_map, 4)
    assert torch.equal(idx, top.sort(-1).values) and int(bad) == 0
    routing_map[3, top[3, 0]] = False  # a dropped token slot
    assert int(experts_from_map(routing_map, 4)[1]) == 1


def test_routes_select_layers_and_compact_dtype():
    r = Routes([0, 2, 5], torch.arange(2 * 3 * 3 * 2).reshape(2, 3, 3, 2))
    sub = r.layers([0, 5])
    assert sub.layer_ids == [0, 5] and torch.equal(sub.experts_BSLK[:, :, 1], r.experts_BSLK[:, :, 2])
    with pytest.raises(ValueError, match="not \\[3\\]"):
        r.layers([3])
    assert index_dtype(8) == torch.int8 and index_dtype(256) == torch.int16 and index_dtype(40000) == torch.int32
    mb = {"tokens": torch.zeros(2, 5, dtype=torch.int64), "rows": torch.tensor([1, 0])}
    attach_positions([mb], [3, 5])
    assert mb[VALID].tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert OLD == "routes_old"


def test_r3_training_routes_fill_only_unrouted_tokens_from_the_old_pass():
    # engine routes for layers 1, 3, 5; the old pass (this pipeline stage) has layers 3 and 5
    eng = torch.tensor([[[[0, 1], [2, 3], [4, 5]], [[-1, -1], [-1, -1], [-1, -1]], [[6, 7], [-1, -1], [1, 2]]]],
                       dtype=torch.int8)  # [B=1, S=3, L=3, K=2]
    old = torch.tensor([[[[7, 6], [5, 4]], [[3, 2], [1, 0]], [[0, 2], [-1, -1]]]], dtype=torch.int8)
    out = fill_missing(Routes([1, 3, 5], eng), Routes([3, 5], old)).experts_BSLK
    want = eng.clone()
    want[0, 1, 1] = old[0, 1, 0]  # position 1, layer 3: the engine gave none -> the old pass's
    want[0, 1, 2] = old[0, 1, 1]  # position 1, layer 5
    want[0, 2, 1] = old[0, 2, 0]  # position 2, layer 3
    # layer 1 (not in the old pass, another stage) stays -1; position 2 layer 5 keeps the engine's
    assert torch.equal(out, want) and out[0, 1, 0].tolist() == [-1, -1]
    assert torch.equal(eng[0, 1, 1], torch.tensor([-1, -1], dtype=torch.int8))  # input untouched
    with pytest.raises(ValueError, match="different tokens"):
        fill_missing(Routes([1, 3, 5], eng), Routes([3, 5], old[:, :2]))


def test_routing_config_validates():
    assert RoutingConfig().replay == "none" and RoutingConfig().capture
    assert RoutingConfig(replay="r2", capture=False).records_old
    with pytest.raises(ValueError, match="routing.replay='r4'"):
        RoutingConfig(replay="r4")
    with pytest.raises(ValueError, match="dump_every"):
        RoutingConfig(dump_every=-1)
