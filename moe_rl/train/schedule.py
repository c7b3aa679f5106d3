"""Micro-batches forward and backward through Megatron's own pipeline schedules.

``forward_backward`` runs ``get_forward_backward_func()`` (no-pipelining at PP=1, 1F1B at
PP>1, interleaved 1F1B over the model chunks with virtual pipeline stages) with a pluggable loss: ``loss_fn(logits_BSV, microbatch) -> (loss, metrics)`` where
``logits_BSV`` is this TP rank's vocabulary shard (B sequences, S tokens, V/TP vocab).

The loss contract: ``loss_fn`` returns its micro-batch's share of the GLOBAL loss, already
divided by the global denominator of the optimizer step (see
``moe_rl.train.global_counts``), so that the sum over all micro-batches and DP ranks is
the loss. Megatron divides each micro-batch loss by the number of micro-batches and
averages gradients over DP; we multiply by both to cancel that exactly (under CP, Megatron
averages over DP x CP and multiplies each loss by CP itself, ``schedules.py:268``).

Context parallelism: the model runs on this CP rank's tokens (``moe_rl.parallel.context_parallel``),
so ``logits_BSV`` holds S / CP positions while the micro-batch keeps whole sequences; a loss
gathers its per-token values into whole sequences (``gather_sequence``, as
``cross_entropy`` and ``policy_head`` do), so every CP rank returns the same whole loss.

Parallel semantics: every rank calls it with the same micro-batches (all stages of a
pipeline need the batch shapes; only the first reads tokens, only the last runs the loss).
The returned metrics list is filled on the last pipeline stage only.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from moe_rl.parallel.context_parallel import slice_sequence
from moe_rl.parallel.groups import Groups

LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    """Megatron's boolean mask convention: True = masked (future positions)."""
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), 1)[None, None]


def forward_backward(
    model,
    microbatches: Sequence[dict[str, Any]],
    loss_fn: LossFn,
    groups: Groups,
    *,
    forward_only: bool = False,
) -> list[dict]:
    """Run all ``microbatches`` of one step; returns the per-micro-batch metrics (last stage).

    ``model``: this rank's model, or its list of chunks (one per virtual pipeline stage).

    Each micro-batch dict holds ``tokens`` [B, S] (int64) and optionally ``position_ids``;
    everything else is passed to ``loss_fn`` untouched. Micro-batches may differ in B and S
    (the models are built with Megatron's ``variable_seq_lengths``, so pipeline stages send
    each activation's shape along with it).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("forward_backward needs at least one micro-batch")
    cp = groups.dims.cp
    for i, mb in enumerate(microbatches):
        S_i = mb["tokens"].shape[1]
        if cp > 1 and S_i % (2 * cp):
            raise ValueError(f"micro-batch {i}: sequence length {S_i} must be divisible by 2 x context_parallel "
                             f"({cp}) = {2 * cp}")
        if groups.dims.sp and (S_i // cp) % groups.dims.tp:
            raise ValueError(f"micro-batch {i}: sequence length {S_i}" + (f" / context_parallel ({cp})" if cp > 1 else "")
                             + f" must be divisible by tensor_parallel ({groups.dims.tp}) with sequence parallelism")
    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    n = len(microbatches)
    pp = groups.dims.pp
    if len(chunks) > 1 and (n < pp or n % pp):
        raise ValueError(f"the interleaved schedule (virtual_pipeline {len(chunks)}) needs a multiple of "
                         f"pipeline_parallel ({pp}) micro-batches, at least {pp}; got {n}")
    if len(chunks) > 1 and pp == 2 and len({tuple(mb["tokens"].shape) for mb in microbatches}) > 1:
        raise ValueError("the interleaved schedule at pipeline_parallel 2 needs micro-batches of one shape "
                         f"(Megatron exchanges no shapes there); got {sorted({tuple(mb['tokens'].shape) for mb in microbatches})}")
    B = max(mb["tokens"].shape[0] for mb in microbatches)
    S = max(mb["tokens"].shape[1] for mb in microbatches)
    scale = float(n * groups.dims.dp)
    masks: dict[int, torch.Tensor] = {}

    def loss_wrapper(mb, output):
        loss, metrics = loss_fn(output, mb)
        return loss * scale, metrics

    def step(data_iterator, chunk):
        mb = next(data_iterator)
        tokens = mb["tokens"]
        B_mb, S_mb = tokens.shape
        pos = mb.get("position_ids")
        if pos is None:
            pos = torch.arange(S_mb, device=tokens.device)[None].expand(B_mb, S_mb)
        if cp > 1:
            # (under CP the attention masks by global position; this mask is not read)
            tokens, pos = (slice_sequence(x, cp, groups.cp_rank) for x in (tokens, pos))
        s = tokens.shape[1]
        if s not in masks:
            masks[s] = causal_mask(s, tokens.device)
        out = chunk(tokens, pos, masks[s])
        return out, lambda output, _mb=mb: loss_wrapper(_mb, output)

    fwd_bwd = get_forward_backward_func()
    # Each chunk reads the micro-batches in order from its own iterator (all chunks need the
    # shapes; only the first stage's reads the tokens).
    data = [iter(microbatches) for _ in chunks] if len(chunks) > 1 else iter(microbatches)
    return fwd_bwd(
        forward_step_func=step,
        data_iterator=data,
        model=chunks,
        num_microbatches=n,
        seq_length=S,
        micro_batch_size=B,
        forward_only=forward_only,
    )


def gather_vocab(logits_BSV: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Full-vocabulary logits from this TP rank's shard (all TP ranks must call)."""
    if groups.dims.tp == 1:
        return logits_BSV
    parts = [torch.empty_like(logits_BSV) for _ in range(groups.dims.tp)]
    torch.distributed.all_gather(parts, logits_BSV.contiguous(), group=groups.tp_group)
    return torch.cat(parts, dim=-1)
