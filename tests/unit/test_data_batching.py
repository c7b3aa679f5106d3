"""Token-budget packing invariants and exact sampler resume."""

import random

import pytest

from moe_rl.data.sampler import ResumableSampler
from moe_rl.data.token_budget import TokenBudgetBatcher, plan_token_batches


@pytest.mark.parametrize("seed", range(5))
def test_plan_invariants(seed):
    rng = random.Random(seed)
    costs = [rng.randint(1, 100) for _ in range(rng.randint(1, 200))]
    budget, cap = rng.randint(100, 400), rng.choice([0, 3])
    batches = plan_token_batches(costs, budget, cap)
    assert [i for b in batches for i in b] == list(range(len(costs)))  # nothing lost, order kept
    for k, b in enumerate(batches):
        assert b and sum(costs[i] for i in b) <= budget
        assert not cap or len(b) <= cap
        if k + 1 < len(batches):  # greedy: the next prompt did not fit
            nxt = batches[k + 1][0]
            assert sum(costs[i] for i in b) + costs[nxt] > budget or len(b) == cap


def test_plan_rejects_oversized_prompt():
    with pytest.raises(ValueError, match=r"position 2 costs 50 tokens, more than the token_budget \(40\)"):
        plan_token_batches([10, 10, 50], 40)


def test_sampler_epochs_are_permutations():
    s = ResumableSampler(7, seed=1)
    first = s.take(7)
    second = s.take(7)
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    assert ResumableSampler(7, shuffle=False).take(9) == [0, 1, 2, 3, 4, 5, 6, 0, 1]
    assert ResumableSampler(7, seed=1).take(14) == first + second


@pytest.mark.parametrize("consumed", [0, 3, 7, 11, 20])
def test_sampler_resume_gives_exactly_the_rest(consumed):
    full = ResumableSampler(7, seed=5).take(30)
    s = ResumableSampler(7, seed=5)
    assert s.take(consumed) == full[:consumed]
    state = dict(s.state_dict())
    resumed = ResumableSampler(7, seed=5)
    resumed.load_state_dict(state)
    assert resumed.take(30 - consumed) == full[consumed:]


def test_sampler_state_mismatch():
    s = ResumableSampler(7, seed=5)
    with pytest.raises(ValueError, match="num_items=8 but this sampler has num_items=7"):
        s.load_state_dict({**s.state_dict(), "num_items": 8})


def test_batcher_resume_and_budget():
    rng = random.Random(0)
    lengths = [rng.randint(5, 60) for _ in range(23)]
    budget = 150

    def make():
        return TokenBudgetBatcher(lengths, ResumableSampler(23, seed=2), token_budget=budget,
                                  response_tokens=10, samples_per_prompt=2, max_prompts=4)

    ref = make()
    batches = [ref.next_batch() for _ in range(12)]
    order = ResumableSampler(23, seed=2).take(sum(len(b) for b in batches))
    assert [i for b in batches for i in b] == order  # consumes the sampler's order exactly
    for b in batches:
        assert 1 <= len(b) <= 4 and sum((lengths[i] + 10) * 2 for i in b) <= budget
    b2 = make()
    for _ in range(5):
        b2.next_batch()
    resumed = make()
    resumed.load_state_dict(b2.state_dict())
    assert [resumed.next_batch() for _ in range(7)] == batches[5:]
