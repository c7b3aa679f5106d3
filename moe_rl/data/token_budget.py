"""Pack prompts into batches whose token count stays under a budget.

A prompt's cost is ``(prompt_tokens + response_tokens) * samples_per_prompt``: the
tokens its whole group will occupy once the responses are sampled. Packing is greedy and
keeps the given order (the sampler already decided the order): a batch closes when the
next prompt would push it over the budget or the prompt cap. ``plan_token_batches`` is
the plan as plain data (lists of positions); ``TokenBudgetBatcher`` applies it to a
resumable sampler, one batch at a time.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .sampler import ResumableSampler


def prompt_cost(num_prompt_tokens: int, response_tokens: int = 0, samples_per_prompt: int = 1) -> int:
    return (num_prompt_tokens + response_tokens) * samples_per_prompt


def _check_fits(cost: int, budget: int, position: int) -> None:
    if cost > budget:
        raise ValueError(f"prompt at position {position} costs {cost} tokens, more than the "
                         f"token_budget ({budget}); raise data.token_budget or set data.max_prompt_tokens")


def plan_token_batches(costs: Sequence[int], token_budget: int, max_prompts: int = 0) -> List[List[int]]:
    """Positions ``0..len(costs)-1`` split, in order, into batches with
    ``sum(costs) <= token_budget`` and at most ``max_prompts`` each (0 = no cap)."""
    if token_budget < 1:
        raise ValueError(f"token_budget ({token_budget}) must be >= 1")
    batches: List[List[int]] = []
    cur: List[int] = []
    total = 0
    for i, c in enumerate(costs):
        _check_fits(c, token_budget, i)
        if cur and (total + c > token_budget or (max_prompts and len(cur) == max_prompts)):
            batches.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += c
    if cur:
        batches.append(cur)
    return batches


class TokenBudgetBatcher:
    """Infinite stream of token-budget batches of dataset indices drawn from a sampler.

    The state is the sampler's: a prompt that did not fit is not consumed, it opens the
    next batch, so ``load_state_dict(state_dict())`` resumes at exactly the next batch.
    """

    def __init__(self, num_tokens: Sequence[int], sampler: ResumableSampler, *, token_budget: int,
                 response_tokens: int = 0, samples_per_prompt: int = 1, max_prompts: int = 0):
        if len(num_tokens) != sampler.num_items:
            raise ValueError(f"{len(num_tokens)} prompt lengths for a sampler over {sampler.num_items} items")
        self.costs = [prompt_cost(n, response_tokens, samples_per_prompt) for n in num_tokens]
        for i, c in enumerate(self.costs):
            _check_fits(c, token_budget, i)
        self.sampler = sampler
        self.token_budget = token_budget
        self.max_prompts = max_prompts

    def next_batch(self) -> List[int]:
        batch: List[int] = []
        total = 0
        while True:
            idx = self.sampler.peek()
            c = self.costs[idx]
            if batch and (total + c > self.token_budget or (self.max_prompts and len(batch) == self.max_prompts)):
                return batch
            self.sampler.advance()
            batch.append(idx)
            total += c

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> Dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
