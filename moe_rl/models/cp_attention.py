"""Core attention with context parallelism for the local (pure PyTorch) layer spec.

Megatron-Core's ``DotProductAttention`` refuses CP (only Transformer Engine's attention does
it). This one does what TE does, in plain tensor ops, so CP layouts run on CPU/gloo:

* a rank holds the load-balanced chunks r and 2 x CP - 1 - r of each sequence
  (``moe_rl.parallel.context_parallel``);
* keys and values are all-gathered over the CP group, so each local query sees every key;
* the causal mask compares GLOBAL positions (query position >= key position);
* the backward of the gather sums every rank's gradient for a key/value and hands each rank
  its own (all-reduce, then slice), so the gradients are exact.

TE exchanges K/V in a ring, overlapped with compute, and never holds the whole sequence's
keys; here all keys are gathered at once: the same numbers, more memory — meant for tests
and small runs, not for 64k-token sequences on CPU. No dropout (RL uses none), no packed
sequences, no attention bias, vanilla softmax.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moe_rl.parallel.context_parallel import cp_positions

# s local tokens (queries), t gathered tokens (keys), b batch, h heads, g query groups, d head dim


class _GatherKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_sbgd, cp_group):
        cp = dist.get_world_size(cp_group)
        parts = [torch.empty_like(x_sbgd) for _ in range(cp)]
        dist.all_gather(parts, x_sbgd.contiguous(), group=cp_group)
        ctx.cp_group, ctx.rank, ctx.s = cp_group, dist.get_rank(cp_group), x_sbgd.shape[0]
        return torch.cat(parts, dim=0)  # rank-major: rank j's [chunk j; chunk 2CP-1-j]

    @staticmethod
    def backward(ctx, g_tbgd):
        g = g_tbgd.contiguous()
        dist.all_reduce(g, group=ctx.cp_group)
        return g[ctx.rank * ctx.s:(ctx.rank + 1) * ctx.s], None


_CLASS = None


def context_parallel_attention_class():
    """The module class (built once, lazily: Megatron is imported on first use)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _build_class()
    return _CLASS


def _build_class():
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.module import MegatronModule

    class ContextParallelDotProductAttention(MegatronModule):
        """Drop-in for ``DotProductAttention`` (same constructor and forward) under CP.
        ``k_channels``/``v_channels``: multi-latent attention's key and value head sizes."""

        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None, k_channels=None,
                     v_channels=None):
            super().__init__(config=config)
            if pg_collection is None:
                pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
            self.cp_group = pg_collection.cp
            tp = pg_collection.tp.size()
            dropout = config.attention_dropout if attention_dropout is None else attention_dropout
            if dropout:
                raise ValueError(f"context-parallel attention (local spec) has no dropout; attention_dropout is {dropout}")
            if config.apply_query_key_layer_scaling or getattr(config, "softmax_type", "vanilla") != "vanilla":
                raise ValueError("context-parallel attention (local spec) supports the vanilla softmax only")
            self.heads = config.num_attention_heads // tp
            self.groups = config.num_query_groups // tp
            k = k_channels or config.kv_channels
            v = v_channels or config.kv_channels
            self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(k)
            self.hidden_size_per_partition = v * self.heads
            self.fp32_softmax = bool(config.attention_softmax_in_fp32)

        def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            """query [s, b, h, d], key [s, b, g, d], value [s, b, g, dv] (this rank's tokens)
            -> [s, b, h * dv]. ``attention_mask`` is ignored: the mask is causal by global position."""
            if packed_seq_params is not None or attention_bias is not None:
                raise ValueError("context-parallel attention (local spec): no packed sequences, no attention bias")
            cp, rank = dist.get_world_size(self.cp_group), dist.get_rank(self.cp_group)
            s = query.shape[0]
            k_tbgd = _GatherKV.apply(key, self.cp_group)
            v_tbgd = _GatherKV.apply(value, self.cp_group)
            rep = self.heads // self.groups
            if rep > 1:
                k_tbgd = k_tbgd.repeat_interleave(rep, dim=2)
                v_tbgd = v_tbgd.repeat_interleave(rep, dim=2)
            S = s * cp
            q_pos = cp_positions(S, cp, rank, device=query.device)
            k_pos = torch.cat([cp_positions(S, cp, r, device=query.device) for r in range(cp)])
            masked_st = k_pos[None, :] > q_pos[:, None]
            scores_bhst = torch.einsum("sbhd,tbhd->bhst", query, k_tbgd) * self.softmax_scale
            if self.fp32_softmax:
                scores_bhst = scores_bhst.float()
            probs = torch.softmax(scores_bhst.masked_fill(masked_st, float("-inf")), dim=-1).to(value.dtype)
            ctx_sbhd = torch.einsum("bhst,tbhd->sbhd", probs, v_tbgd)
            return ctx_sbhd.reshape(s, query.shape[1], self.hidden_size_per_partition)

    return ContextParallelDotProductAttention
