"""The loop's scoring stage (``moe_rl.rewards.scoring.Scorer``) on a 1-rank gloo world: rewards
that fail under ``rewards.on_error=zero`` score 0 and are counted per reward, never silently."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moe_rl.config import load_config
from moe_rl.config.run import RunConfig
from moe_rl.data.types import PromptRecord, TokenizedPrompt
from moe_rl.rewards.evaluator import RewardEvaluator
from moe_rl.rewards.scoring import Scorer
from moe_rl.rollout.types import Sample

CHARS = "0123456789"


class _DigitTokenizer:
    """Token i is the digit i: enough to decode the responses below."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(CHARS[i] for i in ids)


def picky(sample, **_):
    """Scores 1 for an even digit, raises on a 7, returns NaN on a 9: a reward with bugs."""
    d = int(sample.response)
    if d == 7:
        raise RuntimeError(f"cannot score {d}")
    return float("nan") if d == 9 else float(d % 2 == 0)


def _sample(gid, k, digit):
    return Sample(group_id=gid, sample_index=k, prompt_ids=[1], response_ids=[digit],
                  rollout_logprobs_T=torch.zeros(1), routed_experts_NLK=None, finish_reason="stop",
                  weight_version="0")


def test_failed_rewards_score_zero_and_are_counted_per_reward(one_rank_world):
    cfg = load_config(RunConfig, None, [
        "rollout.n_samples_per_prompt=4", "rewards.on_error=zero", "rewards.executor=serial", "rewards.progress=false",
        "rewards.rewards=[{name: exact, fn: 'moe_rl.data.toy_tasks:exact_answer_reward'},"
        f" {{name: picky, fn: '{__name__}:picky', weight: 0.5}}]"])
    digits = [[7, 2, 9, 4], [1, 7, 7, 8]]
    prompts = [TokenizedPrompt(PromptRecord(index=g, messages=[], label=str(d[1])), text="p", input_ids=[1])
               for g, d in enumerate(digits)]
    samples = [_sample(g, k, d) for g, ds in enumerate(digits) for k, d in enumerate(ds)]
    scorer = Scorer(cfg, _DigitTokenizer(), RewardEvaluator(cfg.rewards))
    groups = scorer.score(prompts, samples, rnd=0)

    # written out: picky fails on the three 7s and the 9; those score 0, the rest as defined
    picky_ok = {1: 0.0, 2: 1.0, 4: 1.0, 8: 1.0}
    for g, ds in enumerate(digits):
        exact = [float(str(d) == str(ds[1])) for d in ds]
        assert groups[g]["named"]["picky"].tolist() == [picky_ok.get(d, 0.0) for d in ds]
        assert groups[g]["rewards"].tolist() == pytest.approx([e + 0.5 * picky_ok.get(d, 0.0)
                                                               for e, d in zip(exact, ds)])
    metrics, message = scorer.error_metrics(groups)
    assert metrics == {"rollout/reward_error_frac/exact": 0.0, "rollout/reward_error_frac/picky": 4 / 8}
    assert "'picky' on 4 of 8 responses" in message and "cannot score 7" in message
    assert "exact" not in message

    clean = [dict(g, errors=[{} for _ in g["errors"]]) for g in groups]
    assert scorer.error_metrics(clean) == ({"rollout/reward_error_frac/exact": 0.0,
                                            "rollout/reward_error_frac/picky": 0.0}, "")
