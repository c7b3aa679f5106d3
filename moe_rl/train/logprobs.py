"""Per-token log-prob of the sampled token and entropy, vocab-parallel, without full logits.

Input: final hidden states ``hidden_TH`` [T, H] (after the final norm), this rank's shard
of the output layer ``weight_VH`` [V/tp, H] (rows ``rank*V/tp ... (rank+1)*V/tp`` of the
vocab), and the sampled token ids ``target_T`` (global vocab ids). Output: ``logp_T`` and
``entropy_T`` in float32 (float64 for float64 inputs), identical on every rank of ``tp_group``.

How: tokens are processed in chunks of ``chunk_size``; a chunk's logits [n, V/tp] are
computed in fp32, divided by the temperature (as the inference engine samples from
softmax(logits / temperature)), and reduced to three numbers per token: the max over the
vocab (all-reduce MAX over TP), then sum exp(z - max), sum exp(z - max) * z and the
target's logit (one all-reduce SUM over TP; a rank holds the target's logit only if the
id falls in its shard). logZ = max + log(sum), logp = z_target - logZ,
entropy = logZ - E_p[z]. Only logZ and E_p[z] per token are saved; backward recomputes
each chunk's logits (custom ``autograd.Function``), so peak memory is one chunk's logits
plus the fp32 gradient of the weight shard, never [T, V] fp32.

Gradients, with p = softmax(z): d logp / dz = onehot(target) - p and
d entropy / dz = -p * (z - E_p[z]); both are divided by the temperature for the logits.
The hidden-state gradient is the sum over TP of every shard's contribution: it is
all-reduced over ``tp_group`` here, so ``hidden_TH`` must be the replicated input of the
output layer (do not also wrap it in Megatron's ``copy_to_tensor_model_parallel_region``).
The weight gradient is local to the shard.

``vocab_size``: the true vocabulary size when the weight rows are padded (Megatron pads
the vocab to a multiple of its divisor); padded rows are left out of the softmax, as the
inference engine never samples them, and get a zero gradient.

Parallel semantics: every rank of ``tp_group`` must call with the same ``hidden_TH``,
``target_T``, ``temperature`` and ``chunk_size`` and its own weight shard; ``tp_group=None``
means the weight is the whole vocabulary.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

# T tokens, H hidden, V vocab rows of this rank's shard, n tokens in a chunk

DEFAULT_CHUNK_ELEMS = 1 << 23  # fp32 logits per chunk (32 MiB)


def _shard_range(num_rows: int, tp_group, vocab_size: Optional[int]) -> Tuple[int, int]:
    """(first global id of this shard, number of its rows that are real vocab)."""
    rank = dist.get_rank(tp_group) if tp_group is not None else 0
    start = rank * num_rows
    n_valid = num_rows if vocab_size is None else max(0, min(num_rows, vocab_size - start))
    return start, n_valid


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (gradcheck)


def _chunk_logits(h_nH: Tensor, w_VH: Tensor, temperature: float) -> Tensor:
    z = (h_nH @ w_VH.t()).to(_acc_dtype(h_nH))
    if temperature != 1.0:
        z.div_(temperature)
    return z


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, target_T, temperature, tp_group, vocab_size, chunk_size):
        start, n_valid = _shard_range(weight_VH.shape[0], tp_group, vocab_size)
        w_VH = weight_VH[:n_valid]
        T = hidden_TH.shape[0]
        logz_T = torch.empty(T, dtype=_acc_dtype(hidden_TH), device=hidden_TH.device)
        ez_T = torch.empty_like(logz_T)
        logp_T = torch.empty_like(logz_T)
        local_tgt_T = target_T.long() - start
        in_shard_T = (local_tgt_T >= 0) & (local_tgt_T < n_valid)
        for s in range(0, T, chunk_size):
            e = min(T, s + chunk_size)
            z_nV = _chunk_logits(hidden_TH[s:e], w_VH, temperature)
            if n_valid:
                mx_n = z_nV.max(-1).values
            else:
                mx_n = torch.full((e - s,), -torch.inf, dtype=z_nV.dtype, device=z_nV.device)
            if tp_group is not None:
                dist.all_reduce(mx_n, op=dist.ReduceOp.MAX, group=tp_group)
            inn = in_shard_T[s:e]
            idx = local_tgt_T[s:e].clamp(0, max(n_valid - 1, 0))
            tz_n = z_nV.gather(1, idx[:, None]).squeeze(1) if n_valid else mx_n.new_zeros(e - s)
            tz_n = torch.where(inn, tz_n, torch.zeros_like(tz_n))
            p_nV = (z_nV - mx_n[:, None]).exp_()  # unnormalized
            se_n = p_nV.sum(-1)
            sz_n = torch.bmm(p_nV[:, None, :], z_nV[:, :, None]).reshape(-1)
            del p_nV, z_nV
            red = torch.stack([se_n, sz_n, tz_n])
            if tp_group is not None:
                dist.all_reduce(red, op=dist.ReduceOp.SUM, group=tp_group)
            se_n, sz_n, tz_n = red
            logz_T[s:e] = mx_n + se_n.log()
            ez_T[s:e] = sz_n / se_n
            logp_T[s:e] = tz_n - logz_T[s:e]
        ent_T = logz_T - ez_T
        ctx.save_for_backward(hidden_TH, weight_VH, target_T, logz_T, ez_T)
        ctx.cfg = (temperature, tp_group, vocab_size, chunk_size)
        return logp_T, ent_T

    @staticmethod
    def backward(ctx, g_logp_T, g_ent_T):
        hidden_TH, weight_VH, target_T, logz_T, ez_T = ctx.saved_tensors
        temperature, tp_group, vocab_size, chunk_size = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        start, n_valid = _shard_range(weight_VH.shape[0], tp_group, vocab_size)
        w_VH = weight_VH[:n_valid]
        T = hidden_TH.shape[0]
        if g_logp_T is None:
            g_logp_T = torch.zeros_like(logz_T)
        if g_ent_T is None:
            g_ent_T = torch.zeros_like(logz_T)
        g_logp_T, g_ent_T = g_logp_T.to(logz_T.dtype), g_ent_T.to(logz_T.dtype)
        local_tgt_T = target_T.long() - start
        in_shard_T = (local_tgt_T >= 0) & (local_tgt_T < n_valid)
        grad_h = torch.zeros_like(hidden_TH) if need_h else None
        grad_w32 = (
            torch.zeros(weight_VH.shape, dtype=_acc_dtype(weight_VH), device=weight_VH.device)
            if need_w else None
        )
        for s in range(0, T, chunk_size):
            e = min(T, s + chunk_size)
            if not n_valid:
                break
            h_nH = hidden_TH[s:e]
            z_nV = _chunk_logits(h_nH, w_VH, temperature)
            p_nV = (z_nV - logz_T[s:e, None]).exp_()
            # grad_z = g_logp * (onehot - p) - g_ent * p * (z - E[z]), built in place in z_nV
            gz_nV = z_nV.sub_(ez_T[s:e, None]).mul_(-g_ent_T[s:e, None]).sub_(g_logp_T[s:e, None]).mul_(p_nV)
            del p_nV
            rows = in_shard_T[s:e].nonzero().squeeze(1)
            gz_nV[rows, local_tgt_T[s:e][rows]] += g_logp_T[s:e][rows]
            if temperature != 1.0:
                gz_nV.div_(temperature)
            if need_h:
                grad_h[s:e] = (gz_nV.to(w_VH.dtype) @ w_VH).to(grad_h.dtype)
            if need_w:
                grad_w32[:n_valid].addmm_(gz_nV.t(), h_nH.to(grad_w32.dtype))
        if need_h and tp_group is not None:
            dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=tp_group)
        grad_w = grad_w32.to(weight_VH.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None, None


def token_logprobs_and_entropy(
    hidden_TH: Tensor,
    weight_VH: Tensor,
    target_T: Tensor,
    *,
    temperature: float = 1.0,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> Tuple[Tensor, Tensor]:
    """(log pi(target_t), entropy_t), both [T] float32; see the module docstring."""
    if hidden_TH.dim() != 2 or weight_VH.dim() != 2 or hidden_TH.shape[1] != weight_VH.shape[1]:
        raise ValueError(
            f"hidden [T, H] and weight [V, H] must share H; got {tuple(hidden_TH.shape)} and {tuple(weight_VH.shape)}"
        )
    if target_T.shape != hidden_TH.shape[:1]:
        raise ValueError(f"target must be [T]={hidden_TH.shape[0]}, got {tuple(target_T.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature ({temperature}) must be > 0")
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMS // max(1, weight_VH.shape[0]))
    return _VocabParallelLogprobEntropy.apply(
        hidden_TH, weight_VH, target_T, float(temperature), tp_group, vocab_size, int(chunk_size)
    )
