"""Stage 3 of the loop: detokenize, score with every named reward, then the shaping and
filters that act before the optimizer step (overlong penalty, GFPO, overlong filtering)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

import torch
import torch.distributed as dist

from moe_rl.algorithms.sampling import gfpo_select, overlong_filter_mask, overlong_penalty
from moe_rl.config.run import RunConfig
from moe_rl.data import train_batch as tb
from moe_rl.parallel.work_split import gather_lists, my_share
from moe_rl.rewards.types import RewardInput
from moe_rl.rollout.types import Sample


class Scorer:
    """Stage 3: detokenize each response once and score it with every named reward; then the
    shaping and filters that act before the step (overlong penalty, GFPO selection, overlong
    filtering). Every rank holds every sample; each scores a contiguous share (on its own
    reward executor) and the scores are gathered, so all ranks end with all rewards."""

    def __init__(self, cfg: RunConfig, tokenizer, evaluator) -> None:
        self.cfg, self.tokenizer, self.evaluator = cfg, tokenizer, evaluator

    def score(self, prompts, samples: List[Sample], rnd: int, *, group_size: int = 0) -> List[Dict[str, Any]]:
        """One dict per prompt: its ``group_size`` samples (default ``rollout.n_samples_per_prompt``),
        total and named rewards, and the reward errors (collective: every rank scores a share)."""
        G = group_size or self.cfg.rollout.n_samples_per_prompt
        share = my_share(len(samples), dist.get_rank(), dist.get_world_size())
        inputs = [RewardInput(response=self.tokenizer.decode(samples[i].response_ids, skip_special_tokens=True),
                              label=prompts[samples[i].group_id].record.label, prompt=prompts[samples[i].group_id].text,
                              metadata=prompts[samples[i].group_id].record.metadata) for i in share]
        rb = self.evaluator.evaluate(inputs, desc="rewards") if inputs else None
        local = [(float(rb.total()[k]), rb.values[k], rb.errors[k]) for k in range(len(inputs))] if rb else []
        scored = gather_lists(local)
        groups = []
        for g in range(len(prompts)):
            rows = list(range(g * G, (g + 1) * G))
            assert all(samples[i].group_id == g for i in rows)
            groups.append({"samples": [samples[i] for i in rows], "round": rnd,
                           "rewards": torch.tensor([scored[i][0] for i in rows], dtype=torch.float32),
                           "named": {n: torch.tensor([scored[i][1][n] for i in rows], dtype=torch.float32)
                                     for n in scored[rows[0]][1]},
                           "errors": [scored[i][2] for i in rows]})  # [G] name -> text (on_error=zero)
        return groups

    def error_metrics(self, groups: List[Dict[str, Any]]) -> tuple[Dict[str, float], str]:
        """``rollout/reward_error_frac/<name>`` over the step's groups (responses whose reward
        ``name`` raised, was not finite or timed out, and so scored 0 under ``on_error=zero``),
        and a one-line summary naming the first failure ('' when none failed)."""
        errs = [e for g in groups for e in g["errors"]]
        n = max(len(errs), 1)
        out = {f"rollout/reward_error_frac/{spec.name}": sum(spec.name in e for e in errs) / n
               for spec in self.cfg.rewards.rewards}
        failed = {name: sum(name in e for e in errs) for name in dict.fromkeys(k for e in errs for k in e)}
        if not failed:
            return out, ""
        first_name = next(iter(failed))
        first = next(e[first_name] for e in errs if first_name in e)
        counts = ", ".join(f"{name!r} on {k} of {len(errs)}" for name, k in failed.items())
        return out, (f"rewards failed and scored 0 (rewards.on_error=zero): {counts} responses; "
                     f"first, {first_name!r}: {first[:300]}")

    def to_batch(self, groups: List[Dict[str, Any]]) -> tb.TrainBatch:
        samples, rewards, named = [], [], {}
        for gid, g in enumerate(groups):  # renumber: groups of several rounds get distinct ids
            samples += [dataclasses.replace(s, group_id=gid) for s in g["samples"]]
            rewards.append(g["rewards"])
            for n, v in g["named"].items():
                named.setdefault(n, []).append(v)
        batch = tb.from_samples(samples, torch.cat(rewards), {n: torch.cat(v) for n, v in named.items()})
        alg = self.cfg.algorithm
        if alg.overlong_shaping:
            batch.rewards_B = batch.rewards_B + overlong_penalty(
                batch.lengths_B, max_len=alg.max_response_len, cache_len=alg.overlong_cache_len).to(torch.float32)
        return batch

    def select(self, batch: tb.TrainBatch):
        alg, m = self.cfg.algorithm, {}
        if alg.gfpo_keep:
            keep = gfpo_select(batch.group_ids_B, batch.lengths_B, batch.rewards_B, keep=alg.gfpo_keep,
                               metric=alg.gfpo_metric)
            batch = batch.select(keep.nonzero().flatten().tolist())
        if alg.overlong_filter:
            batch.mask_BT = overlong_filter_mask(batch.mask_BT, batch.truncated_B)
            m["rollout/overlong_filtered_frac"] = float(batch.truncated_B.float().mean())
        return batch, m

