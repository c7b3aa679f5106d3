"""Stages 5 and 6 of the loop on the Megatron policy: the rollout batch as micro-batches,
log-prob scoring (:meth:`Trainer.score`: old-policy and reference log-probs, forward only)
and the actor's optimizer step (:meth:`Trainer.step`), with non-finite steps skipped.

Micro-batching follows the layout: sequences are padded to a multiple of what the layout
splits them by (2 x CP chunks; TP with sequence parallelism), and under virtual pipeline
stages the interleaved schedule needs a multiple of PP micro-batches of ONE shape (Megatron
exchanges no shapes there), so each mini-batch becomes ``train.global_batch / (DP x
train.micro_batch)`` micro-batches of exactly ``train.micro_batch`` rows, all padded to the
step's longest sequence (:func:`check_microbatching` refuses the numbers that cannot work).
Padding sits after every real token (causal attention), so it changes no log-prob.
"""

from __future__ import annotations

import contextlib
import math
from typing import Dict, List

import torch
import torch.distributed as dist

from moe_rl.algorithms.entropy_select import entropy_threshold, high_entropy_mask
from moe_rl.algorithms.kl import kl_estimate
from moe_rl.config.run import RunConfig
from moe_rl.data import train_batch as tb
from moe_rl.parallel.collectives import all_gather_values, all_reduce, broadcast


def check_microbatching(cfg: RunConfig, dims) -> None:
    """The trainer's micro-batching at this layout (``ParallelDims``), refused with the numbers
    when impossible: data-parallel ranks share each mini-batch evenly and, with virtual
    pipeline stages, every rank runs a multiple of PP micro-batches of ``train.micro_batch`` rows."""
    t, alg = cfg.train, cfg.algorithm
    if t.global_batch % dims.dp:
        raise ValueError(f"train.global_batch ({t.global_batch}) must be divisible by the data-parallel degree ({dims.dp})")
    if dims.vpp == 1:
        return
    per = t.global_batch // dims.dp
    if per % t.micro_batch or (per // t.micro_batch) % dims.pp:
        raise ValueError(
            f"virtual_pipeline ({dims.vpp}) runs Megatron's interleaved schedule, which needs a multiple of "
            f"pipeline_parallel ({dims.pp}) micro-batches of one shape per rank: train.global_batch "
            f"({t.global_batch}) / data-parallel ({dims.dp}) = {per} responses per rank must be a multiple of "
            f"train.micro_batch ({t.micro_batch}) x pipeline_parallel ({dims.pp}) = {t.micro_batch * dims.pp}")
    if alg.kl_beta > 0 and alg.kl_placement == "reward" and cfg.trained_per_step % dims.pp:
        raise ValueError(
            f"KL in the reward scores the {cfg.trained_per_step} responses of a step one per micro-batch; with "
            f"virtual_pipeline ({dims.vpp}) that count must be a multiple of pipeline_parallel ({dims.pp})")


class RunStopped(RuntimeError):
    """The run stopped on purpose (too many skipped steps); the message says why."""


class Trainer:
    """Stages 5 and 6 on the Megatron policy: micro-batches, log-prob scoring, actor steps."""

    def __init__(self, cfg: RunConfig, built, state, groups, reference=None) -> None:
        self.cfg, self.built, self.state, self.groups, self.reference = cfg, built, state, groups, reference
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        check_microbatching(cfg, groups.dims)

    @property
    def pad_multiple(self) -> int:
        """Sequence lengths the layout can split: 2 x CP chunks, each a multiple of TP under
        sequence parallelism."""
        d = self.groups.dims
        return math.lcm(2 * d.cp if d.cp > 1 else 1, d.cp * d.tp if d.sp else 1)

    def _fixed_shape(self, mbs: List[dict]) -> List[dict]:
        """With virtual pipeline stages: every micro-batch padded to the longest sequence among
        them (all hold as many rows), so the interleaved schedule sees one shape."""
        if self.groups.dims.vpp == 1 or not mbs:
            return mbs
        S = max(mb["tokens"].shape[1] for mb in mbs)
        for mb in mbs:
            extra = S - mb["tokens"].shape[1]
            if extra:
                for k, v in mb.items():
                    if v.dim() == 2:
                        mb[k] = torch.nn.functional.pad(v, (0, extra))
        return mbs

    def microbatches(self, batch: tb.TrainBatch, global_batch: int) -> List[List[dict]]:
        """Mini-batches of ``global_batch`` responses (in batch order), this rank's DP shard of
        each, packed into micro-batches of at most ``train.micro_batch`` rows and
        ``train.micro_batch x train.seq_len`` padded tokens; the same count on every rank.
        With virtual pipeline stages: ``per-rank rows / train.micro_batch`` micro-batches of
        ``train.micro_batch`` rows each, one shape over the whole step."""
        g, t = self.groups, self.cfg.train
        per = global_batch // g.dims.dp
        lens = batch.seq_lengths
        shards = []
        for start in range(0, batch.size, global_batch):
            rows = list(range(start + g.dp_rank * per, start + (g.dp_rank + 1) * per))
            shards.append(rows)
        if g.dims.vpp > 1:
            counts = torch.tensor([per // t.micro_batch])  # check_microbatching: a multiple of PP
        else:
            counts = torch.tensor([max(len(tb.plan_microbatches([lens[i] for i in rows],
                                                                token_budget=t.micro_batch * t.seq_len,
                                                                max_rows=t.micro_batch)) for rows in shards)])
            counts = all_reduce(counts, op=dist.ReduceOp.MAX)  # every rank runs as many forwards (EP exchanges tokens)
        out = []
        for rows in shards:
            if g.dims.vpp > 1:  # equal row counts, in batch order
                split = [list(range(k, k + t.micro_batch)) for k in range(0, per, t.micro_batch)]
            else:
                split = tb.split_rows([lens[i] for i in rows], int(counts))
            out.append([tb.to_microbatch(batch, [rows[j] for j in part], pad_multiple=self.pad_multiple,
                                         device=self.device) for part in split])
        self._fixed_shape([mb for mbs in out for mb in mbs])
        return out

    @torch.no_grad()
    def score(self, microbatches: List[dict], built, key: str, entropy_key: str = "") -> None:
        """``mb[key]`` = log pi(targets) [B, S] of ``built`` for every micro-batch (forward only),
        and with ``entropy_key`` ``mb[entropy_key]`` = the entropy [B, S] at each position.
        Only the last pipeline stage computes them; the others hold zeros (they never read them)."""
        from moe_rl.train.policy_head import emit_hidden_states, sequence_logprobs
        from moe_rl.train.schedule import forward_backward

        vocab = built.hf_config.vocab_size

        def loss_fn(hidden, mb):
            logp, ent = sequence_logprobs(hidden, built.head, mb["targets"], self.groups, vocab_size=vocab,
                                          temperature=self.cfg.temperature)
            mb[key] = logp.detach()
            if entropy_key:
                mb[entropy_key] = ent.detach()
            return logp.sum() * 0.0, {}

        for mb in microbatches:
            for k in (key, entropy_key) if entropy_key else (key,):
                mb[k] = torch.zeros(mb["tokens"].shape, dtype=torch.float32, device=self.device)
        with emit_hidden_states(built.head):
            forward_backward(built.chunks, microbatches, loss_fn, self.groups, forward_only=True)

    def select_high_entropy(self, microbatches: List[dict], quantile: float) -> None:
        """``mb["entropy_keep"]`` for the micro-batches of one optimizer step: the valid tokens whose
        old-policy entropy (``mb["old_entropy"]``, from :meth:`score`) is in the top ``quantile``
        of the step's valid tokens over every data-parallel rank (``algorithms.entropy_select``).
        Collective over the DP group; on stages before the last the entropies are zeros, unread."""
        vals = torch.cat([mb["old_entropy"][mb["mask"].bool()] for mb in microbatches])
        vals = all_gather_values(vals, group=self.groups.dp_group)  # (also at DP 1: one code path on every layout)
        threshold = entropy_threshold(vals, quantile)
        for mb in microbatches:
            mb["entropy_keep"] = high_entropy_mask(mb["old_entropy"], mb["mask"], threshold)

    def score_batch(self, batch: tb.TrainBatch, built) -> torch.Tensor:
        """Response-space log-probs [B, T] of the whole batch under ``built`` (every rank gets all)."""
        mbs = self._fixed_shape([tb.to_microbatch(batch, [i], pad_multiple=self.pad_multiple, device=self.device)
                                 for i in range(batch.size)])
        self.score(mbs, built, "logp")
        out = torch.cat([tb.response_values(batch, mb, mb["logp"]) for mb in mbs])
        if self.groups.dims.pp > 1:
            from moe_rl.parallel.groups import pipeline_first_last_ranks

            # host rows (response_values): through the GPU on NCCL
            out = broadcast(out, src=pipeline_first_last_ranks(self.groups)[1], group=self.groups.pp_group)
        return out

    def reward_kl(self, batch: tb.TrainBatch) -> torch.Tensor:
        """``k1(policy, reference)`` per response token [B, T], zero on padding, for KL placed in
        the reward (every rank gets all of it)."""
        ref = self.score_batch(batch, self.reference)
        old = self.score_batch(batch, self.built)
        return kl_estimate(old, ref, "k1").detach() * batch.mask_BT

    def step(self, mbs: List[dict]) -> Dict[str, float]:
        """One optimizer step of the actor on this rank's micro-batches (collective: every
        rank calls it with as many micro-batches); its metrics, ``train/skipped`` 1.0 when
        the gradient was non-finite and nothing was applied."""
        from moe_rl.train.actor_step import actor_step

        alg = self.cfg.algorithm
        if alg.needs_response_advantage:
            for mb in mbs:  # one advantage per response: its first valid token's
                first = mb["mask"].float().argmax(-1)
                mb["adv"] = mb["adv"].gather(1, first[:, None])[:, 0]
        with skip_non_finite(self.state.optimizer):
            m = actor_step(self.state, self.built, mbs, alg, self.groups, temperature=self.cfg.temperature)
        m["actor/grad_norm"] = m.pop("train/grad_norm")
        m["actor/lr"] = m.pop("train/lr")
        m["train/optimizer_step"] = self.state.step - 1
        return m


@contextlib.contextmanager
def skip_non_finite(optimizer):
    """Megatron skips an update only when an fp16 loss scaler finds an overflow; with fp32 or
    bf16 a NaN or inf gradient would be clipped and applied, ruining every weight. Scoped to
    this optimizer instance: the gradient norm is computed first (the same collective the step
    makes) and a non-finite one reports the step as skipped (``update_successful`` False),
    which ``optimizer_step`` counts and which advances neither weights nor LR schedule."""
    original = optimizer.step

    def step():
        if optimizer.prepare_grads():
            return False, None, None
        norm = optimizer.get_grad_norm()
        if norm is not None and not math.isfinite(norm):
            return False, norm, None
        return original()  # prepares again (an idempotent copy for fp32/bf16) and steps

    optimizer.step = step
    try:
        yield
    finally:
        del optimizer.step


class SkipCounter:
    """Counts skipped optimizer steps (``train/skipped_steps``); ``limit`` skips in a row stop
    the run with :class:`RunStopped`, naming where the last good checkpoint is."""

    def __init__(self, total: int, run: int, *, limit: int, checkpoints: str) -> None:
        self.total, self.run, self.limit, self.checkpoints = total, run, limit, checkpoints

    def count(self, m: Dict[str, float]) -> Dict[str, float]:
        if m["train/skipped"]:
            self.total += 1
            self.run += 1
            if self.run >= self.limit:
                raise RunStopped(
                    f"{self.run} optimizer steps in a row had a non-finite loss or gradient "
                    f"(loop.max_consecutive_skipped={self.limit}); stopping. "
                    f"The newest complete checkpoint under {self.checkpoints} is intact.")
        else:
            self.run = 0
        m["train/skipped_steps"] = float(self.total)
        return m
