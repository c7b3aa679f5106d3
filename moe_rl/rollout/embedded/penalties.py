"""SGLang 0.5.23's penalizers and ``logit_bias``, applied to the logits of the rows that ask them.

Legend: B rows, R rows with a penalty or bias, V vocab.

What a row's next-token logits become, in SGLang's order (``sampling_batch_info.py``:
``update_penalties`` accumulates the additive penalizers, then the scaling one; ``logit_bias``
is added after the grammar mask), before the sampler divides by the temperature and applies
top-k / top-p / min-p (``sampler.py``):

1. additive, from the counts ``c[v]`` of token ``v`` in the sample's output so far (the prompt
   does not count, for any penalty: SGLang's penalizers only ever see output tokens):
   ``l[v] -= frequency_penalty * c[v] + presence_penalty * (c[v] > 0)``; and while the output
   has fewer than ``min_new_tokens`` tokens, ``l[v] = -inf`` for every stop token ``v`` (the
   request's ``stop_token_ids``, the model's EOS ids, the tokenizer's EOS and additional stop
   ids: ``min_new_tokens.py``, the same set ``_check_token_based_finish`` stops on; masked
   even with ``ignore_eos``; stop *strings* are not held back);
2. scaling (``repetition_penalty.py``), for tokens with ``c[v] > 0``:
   ``l[v] = l[v] * p if l[v] < 0 else l[v] / p``;
3. ``l[v] += logit_bias[v]``.

The sampled token's log-prob, the top / chosen-id log-probs and the draw itself all come from
these processed logits, as SGLang's sampler reads them (greedy: ``log_softmax(l)``; else
``log_softmax(l / temperature)``).

The counts are derived state: built from the output ids when the row is first processed
(``torch.bincount``), then bumped once per token; a retraction drops them (with the KV) and
the next step rebuilds them from the output, so a re-prefilled sequence is penalised as if it
had never paused. (SGLang itself restarts the counts on re-prefill, and with its default
overlap scheduler counts one step late, from the prompt's last token; this is what its
penalizers compute with ``--disable-overlap-schedule`` and no retraction.) A row without any
of these options has no :class:`Penalties` and costs nothing.
"""

from __future__ import annotations

import dataclasses

import torch

from moe_rl.rollout.types import SamplingParams


@dataclasses.dataclass
class Penalties:
    """One sequence's penalizer settings and its output-token counts."""

    frequency: float
    presence: float
    repetition: float
    min_new_tokens: int
    stop_ids: tuple[int, ...]  # masked while the output is shorter than min_new_tokens
    bias_ids: tuple[int, ...]
    bias_values: tuple[float, ...]
    counts_V: torch.Tensor | None = None  # fp32 occurrences of each token in the output; None: not built

    @classmethod
    def of(cls, params: SamplingParams, stop_ids: set[int]) -> Penalties | None:
        """The row state of ``params`` (None when every option is off). ``stop_ids``: the
        engine's stop tokens (EOS ids of the model and tokenizer) besides ``params.stop_token_ids``."""
        if not params.shapes_logits:
            return None
        bias = params.logit_bias or {}
        stops = tuple(sorted(stop_ids | set(params.stop_token_ids))) if params.min_new_tokens > 0 else ()
        return cls(frequency=float(params.frequency_penalty), presence=float(params.presence_penalty),
                   repetition=float(params.repetition_penalty), min_new_tokens=params.min_new_tokens,
                   stop_ids=stops, bias_ids=tuple(bias), bias_values=tuple(float(v) for v in bias.values()))

    @property
    def uses_counts(self) -> bool:
        return self.frequency != 0.0 or self.presence != 0.0 or self.repetition != 1.0

    def counts(self, out_ids: list[int], V: int) -> torch.Tensor:
        """The output counts ``[V]``, built from ``out_ids`` when not held."""
        if self.counts_V is None:
            self.counts_V = torch.bincount(torch.tensor(out_ids, dtype=torch.long), minlength=V).float()
        return self.counts_V

    def observe(self, token: int) -> None:
        """``token`` was appended to the output."""
        if self.counts_V is not None:
            self.counts_V[token] += 1

    def drop_counts(self) -> None:
        """Forget the counts (a retraction); the next :meth:`counts` rebuilds them from the output."""
        self.counts_V = None


def apply_penalties(logits_BV: torch.Tensor, rows: list[tuple[int, Penalties, list[int]]]) -> torch.Tensor:
    """Process the logits of ``rows`` (``(row, penalties, output ids so far)``) as the module
    docstring says; -> fp32 logits ``[B, V]`` (a new tensor: the caller's is left alone; other
    rows unchanged)."""
    out_BV = logits_BV.float().clone()
    V = out_BV.shape[-1]
    counted = [(b, p, ids) for b, p, ids in rows if p.uses_counts]
    if counted:  # 1. additive: frequency and presence
        idx_R = torch.tensor([b for b, _, _ in counted])
        c_RV = torch.stack([p.counts(ids, V) for _, p, ids in counted])
        seen_RV = c_RV > 0
        freq_R = torch.tensor([p.frequency for _, p, _ in counted], dtype=torch.float32)
        pres_R = torch.tensor([p.presence for _, p, _ in counted], dtype=torch.float32)
        out_BV[idx_R] -= freq_R[:, None] * c_RV + pres_R[:, None] * seen_RV
    for b, p, ids in rows:  # 1. additive: min_new_tokens holds the stop tokens back
        if len(ids) < p.min_new_tokens:
            stops = [t for t in p.stop_ids if 0 <= t < V]
            if stops:
                out_BV[b, stops] = float("-inf")
    if counted:  # 2. scaling: repetition, on the tokens already in the output
        rep_RV = torch.where(seen_RV, torch.tensor([p.repetition for _, p, _ in counted])[:, None], 1.0)
        l_RV = out_BV[idx_R]
        out_BV[idx_R] = torch.where(l_RV < 0, l_RV * rep_RV, l_RV / rep_RV)
    for b, p, _ in rows:  # 3. logit_bias
        if p.bias_ids:
            out_BV[b, list(p.bias_ids)] += torch.tensor(p.bias_values, dtype=torch.float32)
    return out_BV
