"""Log-probs beyond the sampled token's, as SGLang 0.5.23 computes and reports them
(``return_logprob`` with ``logprob_start_len``, ``top_logprobs_num``, ``token_ids_logprob``).

Legend: N rows, V vocab, K top entries.

Prompt log-probs come from the one prefill forward of a group (its logits at positions
``start .. P-1``), as ``log_softmax(logits)`` in fp32 **without temperature**: SGLang's input
log-prob path normalises the raw logits (the request's temperature only shapes sampling).
Their positions are SGLang's (``logprob_result_processor.py``): entries for prompt tokens
``start .. P-1``, entry ``k`` being the log-prob of token ``start + k`` after the tokens before
it. The first entry's log-prob is always ``null``, also when ``start > 0`` (SGLang prepends
``None`` and drops the last row, which scored the first output token). ``input_top_logprobs``
and ``input_token_ids_logprobs`` follow the same layout, ``null`` first.

Output top-k / chosen-id log-probs are read off the same row as the sampled token's log-prob
(``log_softmax(logits / temperature)``, temperature 1 for greedy; ``sampler.py``), so they
cost no extra softmax; rows that ask for none pay nothing.

JSON (``tokenizer_manager.py`` ``detokenize_logprob_tokens`` / ``..._top_logprobs_tokens``):
an entry is ``[logprob, token_id, text]``, ``text`` null unless ``return_text_in_logprobs``
(each id decoded on its own); a top / chosen-id position is a list of entries, or ``null``
where SGLang has none (the first prompt position, or an empty id list). Prompt token ids at
or above ``vocab_size - 1`` are reported as 0 in ``input_token_logprobs``, as SGLang's
scheduler clips them (meant for multimodal hash ids, it also hits the real last id).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

# Rows of prompt logits turned into fp32 log-probs at once (bounds the extra memory).
PROMPT_CHUNK_ROWS = 256

TopEntry = tuple[list[float], list[int]]  # (log-probs, ids) of one position, best first


@dataclasses.dataclass(frozen=True)
class LogprobSpec:
    """What one group asks beyond the sampled tokens' log-probs.

    ``input_start``: prompt log-probs from this position (``0 <= start < P``), or None for
    none. ``top_k``: top log-probs per position (0: none). ``token_ids``: log-probs of these
    ids per position (None: not asked; an empty tuple is asked and gives ``null`` entries)."""

    input_start: int | None = None
    top_k: int = 0
    token_ids: tuple[int, ...] | None = None

    @property
    def per_token(self) -> bool:
        """Output tokens need more than their own log-prob."""
        return self.top_k > 0 or self.token_ids is not None


@dataclasses.dataclass
class PromptLogprobs:
    """A group's prompt log-probs, positions ``start .. P-1`` (first entry None)."""

    start: int
    token_logprobs: list[float | None]
    top: list[TopEntry | None] | None  # with top_k
    token_ids: list[list[float] | None] | None  # with token_ids, in the spec's id order


def prompt_logprobs(logits_NV: torch.Tensor, prompt_ids: list[int], spec: LogprobSpec) -> PromptLogprobs:
    """``logits_NV``: the prefill's logits at positions ``start .. P-2`` (each scoring the next
    prompt token; the last position's row, which samples, is not included)."""
    start = spec.input_start
    assert start is not None and logits_NV.shape[0] == len(prompt_ids) - 1 - start
    targets_N = torch.tensor(prompt_ids[start + 1:], dtype=torch.long)
    lps: list[float | None] = [None]
    top: list[TopEntry | None] | None = [None] if spec.top_k > 0 else None
    chosen: list[list[float] | None] | None = [None] if spec.token_ids is not None else None
    ids_t = torch.tensor(spec.token_ids or [], dtype=torch.long)
    for lo in range(0, logits_NV.shape[0], PROMPT_CHUNK_ROWS):
        lp_nV = torch.log_softmax(logits_NV[lo: lo + PROMPT_CHUNK_ROWS].float(), dim=-1)
        lps.extend(lp_nV.gather(-1, targets_N[lo: lo + lp_nV.shape[0], None])[:, 0].tolist())
        if top is not None:
            v_nK, i_nK = lp_nV.topk(spec.top_k, dim=-1)
            top.extend(zip(v_nK.tolist(), i_nK.tolist()))
        if chosen is not None:
            chosen.extend(lp_nV[:, ids_t].tolist())
    return PromptLogprobs(start=start, token_logprobs=lps, top=top, token_ids=chosen)


def row_extras(logprobs_BV: torch.Tensor, specs: list[LogprobSpec | None]
               ) -> tuple[list[TopEntry | None], list[list[float] | None]]:
    """Per row, its top entries and chosen-id log-probs (None where its spec asks none)."""
    B = logprobs_BV.shape[0]
    tops: list[TopEntry | None] = [None] * B
    chosen: list[list[float] | None] = [None] * B
    want_top = [b for b, s in enumerate(specs) if s is not None and s.top_k > 0]
    if want_top:
        k = max(specs[b].top_k for b in want_top)  # type: ignore[union-attr]
        v_bK, i_bK = logprobs_BV[want_top].topk(k, dim=-1)
        for b, v, i in zip(want_top, v_bK.tolist(), i_bK.tolist()):
            kb = specs[b].top_k  # type: ignore[union-attr]
            tops[b] = (v[:kb], i[:kb])
    for b, s in enumerate(specs):
        if s is not None and s.token_ids is not None:
            chosen[b] = logprobs_BV[b, list(s.token_ids)].tolist()
    return tops, chosen


class TokenTexts:
    """Each id's own text (``batch_decode([[id], ...])``), memoised; None without a tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._memo: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        new = [t for t in dict.fromkeys(ids) if t not in self._memo]
        if new:
            self._memo.update(zip(new, self.tokenizer.batch_decode([[t] for t in new])))
        return [self._memo[t] for t in ids]


def _entries(lps: list, ids: list[int], texts: Callable[[list[int]], list[str]] | None) -> list[list]:
    strs = texts(ids) if texts is not None else [None] * len(ids)
    return [[lp, t, s] for lp, t, s in zip(lps, ids, strs)]


def _positions(rows: list, texts, asked: list[int] | None = None) -> list[list[list] | None]:
    """Top positions (``(values, ids)`` rows) or chosen-id positions (value rows for the ids
    ``asked``) -> JSON: a list of entries, or None for a missing or empty position."""
    out: list[list[list] | None] = []
    for row in rows:
        vals, ids = (row, asked) if asked is not None else (row or (None, None))
        out.append(_entries(vals, ids, texts) if vals else None)
    return out


def logprob_meta(spec: LogprobSpec | None, *, vocab_size: int, prompt_ids: list[int],
                 prompt: PromptLogprobs | None, output_ids: list[int], output_logprobs: list[float],
                 output_top: list[TopEntry | None] | None, output_token_ids: list[list[float] | None] | None,
                 texts: Callable[[list[int]], list[str]] | None) -> dict[str, Any]:
    """The log-prob keys of one item's ``meta_info``, in SGLang's order and shapes."""
    meta: dict[str, Any] = {}
    if prompt is not None:
        # the scheduler's clip of input ids (x < vocab_size - 1 else 0)
        ids = [t if t < vocab_size - 1 else 0 for t in prompt_ids[prompt.start:]]
        meta["input_token_logprobs"] = _entries(prompt.token_logprobs, ids, texts)
    else:
        meta["input_token_logprobs"] = []
    meta["output_token_logprobs"] = _entries(output_logprobs, output_ids, texts)
    meta["output_token_logprobs_length"] = len(output_ids)
    if spec is None:
        return meta
    prompt_top = prompt.top if prompt is not None and prompt.top is not None else []
    prompt_chosen = prompt.token_ids if prompt is not None and prompt.token_ids is not None else []
    if spec.top_k > 0:
        meta["input_top_logprobs"] = _positions(prompt_top, texts)
        meta["output_top_logprobs"] = _positions(output_top or [], texts)
    if spec.token_ids is not None:
        asked = list(spec.token_ids)
        meta["input_token_ids_logprobs"] = _positions(prompt_chosen, texts, asked)
        meta["output_token_ids_logprobs"] = _positions(output_token_ids or [], texts, asked)
    return meta
