"""One optimizer step of the actor: the GRPO-family loss on the Megatron policy.

Per micro-batch: log-probs and entropy of the response tokens from our vocab-parallel head
(``policy_head``), then ``algorithms.actor_loss`` with the step's GLOBAL denominators, counted
over every micro-batch and data-parallel rank before the first backward. Metrics merge
exactly: over micro-batches by ``Metrics.merge``, over DP ranks by SUM/MIN/MAX all-reduces,
and are then sent from the last pipeline stage to every rank.

Micro-batch contract (all [B, S]; position t scores ``targets[:, t]`` given ``tokens[:, :t+1]``):
``tokens``, ``targets``, ``mask`` (1 on response tokens that count), ``old_logp``, ``adv``
([B, S], or [B]: one advantage per response), and optionally ``ref_logp``, ``rollout_logp``,
``entropy_keep`` (``algorithm.top_entropy_quantile``: ``Trainer.select_high_entropy``).

Parallel semantics: every rank calls :func:`actor_step` with its DP shard of the step's
micro-batches (identical across TP/CP/PP/EP peers); every rank returns the same metrics.
Under context parallelism the log-probs arrive as whole sequences (``policy_head``), so the
loss and its metrics are those of whole sequences on every CP rank and reduce over DP only.
"""

from __future__ import annotations

import torch.distributed as dist

from moe_rl.algorithms.actor_loss import actor_loss
from moe_rl.algorithms.config import AlgorithmConfig
from moe_rl.algorithms.metrics import Metrics
from moe_rl.parallel.collectives import all_reduce
from moe_rl.parallel.groups import Groups, pipeline_first_last_ranks
from moe_rl.train.global_counts import count_global
from moe_rl.train.model import BuiltModel
from moe_rl.train.optimizer import TrainState, optimizer_step
from moe_rl.train.policy_head import emit_hidden_states, sequence_logprobs
from moe_rl.train.schedule import forward_backward


def actor_step(state: TrainState, built: BuiltModel, microbatches: list[dict], cfg: AlgorithmConfig,
               groups: Groups, *, temperature: float = 1.0) -> dict[str, float]:
    counts = count_global([mb["mask"] for mb in microbatches], dp_group=groups.dp_group)
    if counts.num_tokens == 0:
        raise ValueError("actor_step: no response token has mask 1 in this step (all ranks)")
    merged = Metrics()
    vocab = built.hf_config.vocab_size

    def loss_fn(hidden, mb):
        logp, ent = sequence_logprobs(hidden, built.head, mb["targets"], groups, vocab_size=vocab,
                                      temperature=temperature)
        loss, metrics = actor_loss(
            cfg, logp, mb["old_logp"], mb["adv"], mb["mask"], **counts.as_kwargs(),
            ref_logp_BT=mb.get("ref_logp"), rollout_logp_BT=mb.get("rollout_logp"),
            entropy_BT=ent if cfg.entropy_coeff != 0 else ent.detach(), entropy_keep_BT=mb.get("entropy_keep"))
        merged.merge(metrics)
        return loss, {}

    with emit_hidden_states(built.head):
        forward_backward(state.chunks, microbatches, loss_fn, groups)
    out = _reduce(merged, groups)
    out.update(optimizer_step(state))
    return out


def _reduce(merged: Metrics, groups: Groups) -> dict[str, float]:
    values = None
    if groups.is_last_stage:
        packed = merged.pack()
        if groups.dims.dp > 1:
            for key, op in (("sum", dist.ReduceOp.SUM), ("min", dist.ReduceOp.MIN), ("max", dist.ReduceOp.MAX)):
                packed[key] = all_reduce(packed[key], op=op, group=groups.dp_group)
        values = merged.unpack(packed).compute()
    if groups.dims.pp > 1:
        box = [values]
        _, last = pipeline_first_last_ranks(groups)
        dist.broadcast_object_list(box, src=last, group=groups.pp_group)
        values = box[0]
    return values
