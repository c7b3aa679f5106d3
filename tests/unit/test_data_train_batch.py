"""Samples -> TrainBatch -> micro-batches by token budget: positions, padding, packing."""

import torch

from moe_rl.data import train_batch as tb
from moe_rl.rollout.types import FinishReason, Sample


def _sample(g, i, prompt, resp, finish=FinishReason.STOP, version="3"):
    return Sample(group_id=g, sample_index=i, prompt_ids=prompt, response_ids=resp,
                  rollout_logprobs_T=-torch.arange(1, len(resp) + 1, dtype=torch.float32), routed_experts_NLK=None,
                  finish_reason=finish, weight_version=version)


def _batch():
    s = [_sample(0, 0, [1, 5, 6], [7, 2]), _sample(0, 1, [1, 5, 6], [8, 9, 10], FinishReason.LENGTH),
         _sample(1, 0, [1, 4], [2]), _sample(1, 1, [1, 4], [11, 12, 2])]
    return tb.from_samples(s, torch.tensor([1.0, 0.0, 0.5, 0.25]))


def test_from_samples_is_response_space():
    b = _batch()
    assert b.mask_BT.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]
    assert b.truncated_B.tolist() == [False, True, False, False] and b.versions_B.tolist() == [3] * 4
    assert b.seq_lengths == [4, 5, 2, 4] and b.group_ids_B.tolist() == [0, 0, 1, 1]
    sub = b.select([3, 0])
    assert sub.response_ids == [[11, 12, 2], [7, 2]] and sub.rewards_B.tolist() == [0.25, 1.0]


def test_engine_routes_follow_their_rows():
    import dataclasses

    s = [_sample(0, 0, [1, 5, 6], [7, 2]), _sample(0, 1, [1, 4], [2]), _sample(1, 0, [1], [3, 4])]
    assert tb.from_samples(s, torch.zeros(3)).routes is None  # no sample has routes
    r = [torch.full((n, 2, 1), k, dtype=torch.int32) for k, n in enumerate([4, 2, 2])]  # P + T - 1 rows
    s = [dataclasses.replace(x, routed_experts_NLK=r[k] if k != 1 else None) for k, x in enumerate(s)]
    b = tb.from_samples(s, torch.zeros(3))
    assert b.routes[0] is r[0] and b.routes[1] is None and b.routes[2] is r[2]
    sub = b.select([2, 1, 0])
    assert sub.routes[0] is r[2] and sub.routes[1] is None and sub.routes[2] is r[0]
    assert [len(x) for x in sub.routes if x is not None] == [sub.seq_lengths[0], sub.seq_lengths[2]]


def test_microbatch_positions_score_each_response_token_once():
    b = _batch()
    b.adv_BT = torch.arange(12, dtype=torch.float32).view(4, 3)
    mb = tb.to_microbatch(b, [1, 2], pad_multiple=4)
    assert mb["tokens"].shape == (2, 8)  # longest 5 positions, padded to a multiple of 4
    # row 0: prompt [1,5,6] + response [8,9,10]: position t predicts targets[t]
    assert mb["tokens"][0, :5].tolist() == [1, 5, 6, 8, 9] and mb["targets"][0, :5].tolist() == [5, 6, 8, 9, 10]
    assert mb["mask"][0].tolist() == [False, False, True, True, True, False, False, False]
    assert mb["rollout_logp"][0, 2:5].tolist() == [-1.0, -2.0, -3.0]
    assert mb["adv"][0, 2:5].tolist() == [3.0, 4.0, 5.0] and mb["adv"][1, 1].item() == 6.0
    assert mb["mask"][1].tolist() == [False, True] + [False] * 6
    # the inverse mapping gives the response-space rows back
    back = tb.response_values(b, mb, mb["rollout_logp"])
    assert torch.equal(back, b.rollout_logp_BT[[1, 2]])


def test_plan_respects_budget_and_rows_and_split_is_balanced():
    lens = [10, 3, 7, 7, 2, 9, 4, 4]
    plan = tb.plan_microbatches(lens, token_budget=20, max_rows=3)
    assert sorted(i for p in plan for i in p) == list(range(8))
    for p in plan:
        assert len(p) <= 3 and (len(p) == 1 or len(p) * max(lens[i] for i in p) <= 20)
    for count in range(1, 9):
        parts = tb.split_rows(lens, count)
        assert len(parts) == count and all(parts) and sorted(i for p in parts for i in p) == list(range(8))
