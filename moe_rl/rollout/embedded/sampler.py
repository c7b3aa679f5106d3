"""Pick the next token of every row and its log-prob, exactly as the trainer scores it.

Legend: B rows, V vocab.

The log-prob of a sampled token is ``log_softmax(logits / temperature)`` in fp32, over the
full vocabulary: top-k/top-p/min-p only restrict *which* tokens can be drawn, they do not
renormalise the reported log-prob (the trainer has no truncation, so renormalising would
make the rollout and training log-probs disagree). A temperature below :data:`SAMPLING_EPS`
(0 included) means greedy, scored with temperature 1: SGLang turns any ``0 <= temperature <
1e-6`` into temperature 1 with top-k 1 (``sampling_params.py``), so dividing by a tiny
temperature (which overflows to inf, then NaN) never happens there either. A row with
SGLang's penalties or ``logit_bias`` arrives here with its logits already processed
(``penalties.py``), so its draw and log-prob come from those, as in SGLang.

A scaled logit that overflows fp32 (a ``logit_bias`` near the float32 limit, divided by a
temperature below 1) is held at the largest finite float32: ``log_softmax`` of a row holding
``+inf`` is NaN, which could only be drawn as a garbage token. ``-inf`` (a masked token) stays.
"""

from __future__ import annotations

import dataclasses

import torch

from moe_rl.rollout.types import FP32_MAX, TOP_K_ALL

# SGLang's _SAMPLING_EPS: a temperature below it is greedy.
SAMPLING_EPS = 1e-6


@dataclasses.dataclass
class RowParams:
    """Sampling parameters of the rows of one step, as tensors."""

    temperature_B: torch.Tensor  # fp32
    top_p_B: torch.Tensor  # fp32
    top_k_B: torch.Tensor  # int64
    min_p_B: torch.Tensor  # fp32
    generators: list[torch.Generator | None]  # per-row RNG (None = engine RNG)


def sample_tokens(logits_BV: torch.Tensor, p: RowParams, engine_gen: torch.Generator):
    """Returns ``(token_B int64, logprob_B fp32)``."""
    tok_B, lp_B, _ = sample_tokens_with_logprobs(logits_BV, p, engine_gen)
    return tok_B, lp_B


def sample_tokens_with_logprobs(logits_BV: torch.Tensor, p: RowParams, engine_gen: torch.Generator):
    """Returns ``(token_B int64, logprob_B fp32, logprobs_BV fp32)``: the full rows the sampled
    log-probs were read from (for top-k / chosen-id log-probs, at no extra softmax)."""
    logits_BV = logits_BV.float()
    greedy_B = p.temperature_B < SAMPLING_EPS
    temp_B = torch.where(greedy_B, torch.ones_like(p.temperature_B), p.temperature_B)
    logprobs_BV = torch.log_softmax((logits_BV / temp_B[:, None]).clamp_(max=FP32_MAX), dim=-1)

    if bool(greedy_B.all()):
        tok_B = logits_BV.argmax(-1)
    else:
        masked_BV = logprobs_BV
        V = logits_BV.shape[-1]
        need_sort = bool(((p.top_k_B < V) & (p.top_k_B < TOP_K_ALL)).any() or (p.top_p_B < 1).any())
        if need_sort:
            sorted_lp, order = logprobs_BV.sort(dim=-1, descending=True)
            rank_V = torch.arange(V)
            drop = rank_V[None, :] >= p.top_k_B[:, None]
            cum = sorted_lp.exp().cumsum(-1)
            # drop a token when the mass before it already reaches top_p (keeps >= 1 token)
            drop |= (cum - sorted_lp.exp()) >= p.top_p_B[:, None]
            drop_sorted = drop
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            masked_BV = logprobs_BV.masked_fill(drop, float("-inf"))
        if bool((p.min_p_B > 0).any()):
            thresh_B = logprobs_BV.max(-1).values + torch.log(p.min_p_B.clamp_min(1e-30))
            masked_BV = masked_BV.masked_fill((logprobs_BV < thresh_B[:, None]) & (p.min_p_B[:, None] > 0),
                                              float("-inf"))
        # Gumbel-max: argmax(logp + G) is a draw from softmax(logp); per-row seeds stay reproducible.
        u_BV = torch.rand(logits_BV.shape, generator=engine_gen)
        for b, g in enumerate(p.generators):
            if g is not None:
                u_BV[b] = torch.rand(V, generator=g)
        gumbel_BV = -torch.log(-torch.log(u_BV.clamp(1e-20, 1.0 - 1e-7)))
        tok_B = torch.where(greedy_B, logits_BV.argmax(-1), (masked_BV + gumbel_BV).argmax(-1))
    lp_B = logprobs_BV.gather(-1, tok_B[:, None])[:, 0]
    return tok_B, lp_B, logprobs_BV

