"""Context parallelism: which tokens of a sequence a CP rank holds, and moving per-token tensors
between the CP ranks' slices and whole sequences.

The sequence (length S, divisible by 2 x CP) is cut into 2 x CP chunks; CP rank r holds chunks
r and 2 x CP - 1 - r, in that order (Megatron's and Transformer Engine's load balancing: under
a causal mask, an early chunk has little to attend to and a late one much, so every rank gets
one of each). The model runs on a rank's S / CP tokens; attention gathers keys and values
over the CP group (``moe_rl.models.cp_attention`` on CPU, Transformer Engine on GPU).

What leaves the model per token (log-probs, entropies, cross-entropies, logits) is gathered
back into whole sequences, so the losses, their global token counts and the metrics see whole
sequences, exactly as without CP. Every CP rank then computes the same loss; the backward of
:func:`gather_sequence` hands each rank the gradient of its own tokens only, and the
data-parallel gradient reduction (over DP x CP) adds the ranks' parts.

Parallel semantics: every rank of ``cp_group`` calls these with tensors of the same shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# B sequences, S tokens (whole sequence), s = S / CP tokens of this rank


def cp_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions [S / CP] of the tokens CP rank ``rank`` holds, in its order."""
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} must be divisible by 2 x context_parallel ({cp}) = {2 * cp}")
    c = seq_len // (2 * cp)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * cp - 1 - rank) * c, (2 * cp - rank) * c, device=device)
    return torch.cat([first, second])


def slice_sequence(x_BS: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's tokens of a whole-sequence tensor (along ``dim``)."""
    if cp == 1:
        return x_BS
    idx = cp_positions(x_BS.shape[dim], cp, rank, device=x_BS.device)
    return x_BS.index_select(dim, idx)


class _GatherSequence(torch.autograd.Function):
    """Forward: every rank's slice, put back in sequence order. Backward: this rank's part
    of the gradient (every CP rank computes the same loss from the gathered tensor)."""

    @staticmethod
    def forward(ctx, x_Bs, cp_group, dim):
        cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
        parts = [torch.empty_like(x_Bs) for _ in range(cp)]
        dist.all_gather(parts, x_Bs.contiguous(), group=cp_group)
        S = x_Bs.shape[dim] * cp
        order = torch.cat([cp_positions(S, cp, r, device=x_Bs.device) for r in range(cp)])
        out = torch.empty((*x_Bs.shape[:dim], S, *x_Bs.shape[dim + 1:]), dtype=x_Bs.dtype, device=x_Bs.device)
        out.index_copy_(dim, order, torch.cat(parts, dim=dim))
        ctx.cp, ctx.rank, ctx.dim = cp, rank, dim
        return out

    @staticmethod
    def backward(ctx, g_BS):
        return slice_sequence(g_BS, ctx.cp, ctx.rank, ctx.dim), None, None


def gather_sequence(x_Bs: torch.Tensor, cp_group, dim: int = 1) -> torch.Tensor:
    """Whole sequences [.., S, ..] from every CP rank's slice [.., S / CP, ..] (``dim``)."""
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return x_Bs
    return _GatherSequence.apply(x_Bs, cp_group, dim)
