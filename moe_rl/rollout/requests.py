"""The rollout requests of one step: one ``RolloutRequest`` per prompt (a group of
``rollout.n_samples_per_prompt`` samples), each with a sampling seed that is a pure
function of the run seed and the group's position, so a resumed run regenerates exactly
what the uninterrupted one generated. The evaluation's requests (``eval_requests``) take the
``eval`` section's sampling and the rollout's length and stops."""

from __future__ import annotations

from typing import List

from moe_rl.config.run import RunConfig
from moe_rl.rollout.types import RolloutRequest, SamplingParams, per_sample_seed


def group_seed(seed: int, step: int, rnd: int, group: int) -> int:
    """The sampling seed of one group: a pure function of the run seed and its position."""
    return per_sample_seed(per_sample_seed(per_sample_seed(seed, step + 1), rnd + 1), group + 1)


def make_requests(cfg: RunConfig, step: int, rnd: int, prompts) -> List[RolloutRequest]:
    r = cfg.rollout
    return [RolloutRequest(
        prompt_ids=list(p.input_ids),
        sampling=SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                top_k=r.top_k, n=r.n_samples_per_prompt, stop=list(r.stop),
                                stop_token_ids=list(r.stop_token_ids),
                                sampling_seed=group_seed(cfg.train.seed, step, rnd, g)),
        group_id=g) for g, p in enumerate(prompts)]



def eval_requests(cfg: RunConfig, version: int, prompts) -> List[RolloutRequest]:
    """One request per held-out prompt (``eval.n_samples`` responses each), seeded by the policy
    version and the prompt's position, so a resumed run evaluates exactly as the first did."""
    e, r = cfg.eval, cfg.rollout
    return [RolloutRequest(
        prompt_ids=list(p.input_ids),
        sampling=SamplingParams(max_new_tokens=r.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                                top_k=e.top_k, n=e.n_samples, stop=list(r.stop), stop_token_ids=list(r.stop_token_ids),
                                sampling_seed=group_seed(cfg.train.seed + 1, version, 0, g)),
        group_id=g) for g, p in enumerate(prompts)]
