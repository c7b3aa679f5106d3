"""Held-out evaluation: how the policy does on prompts it never trains on (config section ``eval``).

When: with ``eval.interval = N > 0``, policy version 0 before the first update, every version
that is a multiple of N (at the start of the loop step that samples with it), and the final
policy after the last step. With ``train.steps=0`` only that last one: the policy as loaded (a
resumed checkpoint's, in an output_dir that has one), evaluated without training. What: the engines that serve the rollouts generate
``eval.n_samples`` responses to each held-out prompt with the weights of that version and the
``eval`` sampling (greedy by default, as verl validates), as long as the rollout's responses
(``rollout.max_new_tokens``, ``rollout.stop``); the run's own rewards score them. Nothing of it
reaches training: the samples are dropped after scoring, and their seeds are their own.

The prompts: ``eval.path`` read as ``data.path`` is (chat template, prompt-length limit; its
columns ``eval.prompt_key`` / ``eval.answer_key``, by default data's), the first
``eval.num_prompts`` rows (0 = all); without a path, ``eval.num_prompts`` toy
tasks of ``data.toy_task`` generated with seed ``data.seed + 1`` (the training prompts use
``data.seed``), leaving out any the training set holds (a toy task's space can be small: four
digits have 10,000 prompts).

Where: one record per evaluation in ``<output_dir>/eval.jsonl`` and the same scalars in the run's
tensorboard, on the training records' x-axis: ``step`` = optimizer steps done when the version
was evaluated (``policy_version`` says which). A resumed run drops the records at and after its
resume step and evaluates again from there, as the metric writer does for training records.

Metrics (P prompts, n responses each, r_pj the reward of response j to prompt p):
- ``eval/reward_mean``: mean of r_pj over all responses (mean@n);
- ``eval/reward_best_mean``: mean over prompts of max_j r_pj (best@n; pass@n for 0/1 rewards), n > 1;
- ``eval/reward_mean/<name>``: the mean of each named reward;
- ``eval/response_len_mean``, ``eval/truncated_frac`` (responses that hit ``max_new_tokens``);
- ``eval/reward_error_frac/<name>``: responses whose reward failed and scored 0;
- ``eval/num_prompts``; ``timing/eval_s`` (wall time of the evaluation);
- when the prompts carry a ``data_source`` column (verl's files do): ``eval/by_source/<source>/``
  ``reward_mean``, ``reward_best_mean`` (n > 1) and ``num_prompts`` for each source, as verl's
  ``val-core/<source>/reward/mean@n`` and ``best@n``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Dict, List, Optional

import torch

from moe_rl.config.run import RunConfig
from moe_rl.data.dataset import load_prompts, tokenize_prompts
from moe_rl.data.types import TokenizedPrompt
from moe_rl.rollout.requests import eval_requests
from moe_rl.rollout.types import FinishReason

# toy-task prompts for evaluation are generated with data.seed + this (training uses data.seed)
EVAL_TOY_SEED_OFFSET = 1


def load_eval_prompts(cfg: RunConfig, tokenizer: Any) -> List[TokenizedPrompt]:
    """The held-out prompts, rendered and tokenized as the training prompts are; a ValueError
    for a bad file names ``eval.path``."""
    e = cfg.eval
    data = dataclasses.replace(cfg.data, path=e.path, extra_paths=[], shuffle=False,
                               seed=cfg.data.seed + EVAL_TOY_SEED_OFFSET, toy_num_prompts=e.num_prompts or 1,
                               prompt_key=e.prompt_key or cfg.data.prompt_key,
                               answer_key=e.answer_key or cfg.data.answer_key)
    if not e.path:  # toy tasks: candidates with another seed, those the training set holds left out
        trained = {_prompt_key(r) for r in load_prompts(cfg.data)} if not cfg.data.path else set()
        data = dataclasses.replace(data, toy_num_prompts=4 * e.num_prompts + len(trained))
        seen, records = set(trained), []
        for r in load_prompts(data):  # distinct, and not trained on
            if _prompt_key(r) not in seen and len(records) < e.num_prompts:
                seen.add(_prompt_key(r))
                records.append(r)
        if len(records) < e.num_prompts:
            raise ValueError(f"eval.num_prompts ({e.num_prompts}): data.toy_task={cfg.data.toy_task!r} has only "
                             f"{len(records)} distinct prompts outside the {len(trained)} it trains on; ask for fewer or "
                             "give eval.path")
        return tokenize_prompts(records, tokenizer, cfg.data.max_prompt_tokens)
    try:
        records = load_prompts(data)
    except ValueError as err:
        raise ValueError(str(err).replace("data.path", "eval.path")) from None
    if e.num_prompts:
        records = records[:e.num_prompts]
    return tokenize_prompts(records, tokenizer, cfg.data.max_prompt_tokens)


def _prompt_key(record) -> str:
    return json.dumps(record.messages, sort_keys=True)


def eval_metrics(groups: List[Dict[str, Any]], error_frac: Dict[str, float],
                 sources: Optional[List[Optional[str]]] = None) -> Dict[str, float]:
    """``eval/*`` of scored groups (``Scorer.score``: one dict per prompt with its ``samples``,
    ``rewards`` [n] and ``named`` rewards); ``error_frac`` from ``Scorer.error_metrics``;
    ``sources``: each prompt's ``data_source`` (or None), for the per-source means."""
    rewards_PN = torch.stack([g["rewards"].to(torch.float64) for g in groups])
    samples = [s for g in groups for s in g["samples"]]
    out = {"eval/reward_mean": float(rewards_PN.mean()), "eval/num_prompts": float(len(groups)),
           "eval/response_len_mean": sum(len(s.response_ids) for s in samples) / len(samples),
           "eval/truncated_frac": sum(s.finish_reason == FinishReason.LENGTH for s in samples) / len(samples)}
    if rewards_PN.shape[1] > 1:
        out["eval/reward_best_mean"] = float(rewards_PN.max(dim=1).values.mean())
    for name in groups[0]["named"]:
        out[f"eval/reward_mean/{name}"] = float(torch.cat([g["named"][name].to(torch.float64) for g in groups]).mean())
    out.update({k.replace("rollout/", "eval/", 1): v for k, v in error_frac.items()})
    for src in dict.fromkeys(x for x in (sources or []) if x is not None):
        rows = [p for p, x in enumerate(sources) if x == src]
        sub = rewards_PN[rows]
        out[f"eval/by_source/{src}/reward_mean"] = float(sub.mean())
        out[f"eval/by_source/{src}/num_prompts"] = float(len(rows))
        if sub.shape[1] > 1:
            out[f"eval/by_source/{src}/reward_best_mean"] = float(sub.max(dim=1).values.mean())
    return out


class Evaluation:
    """The held-out prompts of a run and the schedule of its evaluations."""

    def __init__(self, cfg: RunConfig, prompts: List[TokenizedPrompt]) -> None:
        self.cfg, self.prompts = cfg, prompts

    def due(self, version: int, *, final: bool = False) -> bool:
        """Whether policy ``version`` is evaluated: every ``eval.interval``-th, and the ``final`` one."""
        n = self.cfg.eval.interval
        return n > 0 and (final or version % n == 0)

    def run(self, rollout, scorer, version: int) -> Dict[str, float]:
        """Generate, score and measure with the engines' current weights (collective: every rank
        calls it; every rank returns the same metrics)."""
        t0 = time.perf_counter()
        reqs = eval_requests(self.cfg, version, self.prompts)
        samples = rollout.run_requests(reqs, f"eval {version}", keep_routes=False)
        groups = scorer.score(self.prompts, samples, 0, group_size=self.cfg.eval.n_samples)
        sources = [p.record.metadata.get("data_source") for p in self.prompts]
        out = eval_metrics(groups, scorer.error_metrics(groups)[0],
                           [None if x is None else str(x) for x in sources])
        out["timing/eval_s"] = time.perf_counter() - t0
        return out
