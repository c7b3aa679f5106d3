"""The ``text`` of a ``/generate`` item and the token texts of its log-probs, as SGLang 0.5.23
builds them from the output ids (only when the server has a tokenizer; without one SGLang's
``--skip-tokenizer-init`` replies carry no ``text`` key).

Response text (``detokenizer_manager.py``, ``trim_matched_stop`` and the incremental decode):

1. A finish that matched a stop *token* (``"matched": <int>``, from ``stop_token_ids`` or EOS)
   drops that last token before decoding, unless ``no_stop_trim``.
2. The ids are decoded behind the prompt's last :data:`SURROUNDING_PROMPT_TOKENS` tokens and
   the prompt part's text is cut off: ``decode(tail + out)[len(decode(tail)):]``, with the
   request's ``skip_special_tokens`` / ``spaces_between_special_tokens``. So the first token
   keeps the leading space a SentencePiece decoder would strip, and bytes of a character
   split between prompt and output are left out, exactly as SGLang's surrogate decode does
   (its incremental pieces of a non-streamed reply add up to this text). Ids outside the
   tokenizer's vocabulary decode as id 0, as SGLang's ``_clamp_decode_ids`` maps them.
3. A finish that matched a stop *string* cuts the text before the string's first occurrence
   (after it with ``no_stop_trim``); when the text does not contain it (it was inside a
   special token's text and those were skipped), the text stays whole.

Token texts (``return_text_in_logprobs``, ``tokenizer_manager.py`` ``detokenize_logprob_tokens``):
each id decoded on its own with ``decode``'s defaults (special tokens shown).
"""

from __future__ import annotations

from typing import Any

SURROUNDING_PROMPT_TOKENS = 5  # schedule_batch.py INIT_INCREMENTAL_DETOKENIZATION_OFFSET


def _clamp(ids: list[int], vocab: int) -> list[int]:
    return [t if 0 <= t < vocab else 0 for t in ids]


def response_text(tokenizer: Any, prompt_ids: list[int], output_ids: list[int], finish: dict, *,
                  skip_special_tokens: bool = True, spaces_between_special_tokens: bool = True,
                  no_stop_trim: bool = False) -> str:
    """SGLang's ``text`` for ``output_ids`` generated after ``prompt_ids`` that ended with ``finish``."""
    matched = finish.get("matched") if finish else None
    ids = list(output_ids)
    if isinstance(matched, int) and not isinstance(matched, bool) and ids and not no_stop_trim:
        ids = ids[:-1]  # the matched stop token is always the last one
    vocab = len(tokenizer)
    tail = _clamp(prompt_ids[-SURROUNDING_PROMPT_TOKENS:], vocab)
    kw = dict(skip_special_tokens=skip_special_tokens, spaces_between_special_tokens=spaces_between_special_tokens)
    text = tokenizer.decode(tail + _clamp(ids, vocab), **kw)[len(tokenizer.decode(tail, **kw)):]
    if isinstance(matched, str):
        pos = text.find(matched)
        if pos != -1:
            text = text[: pos + len(matched)] if no_stop_trim else text[:pos]
    return text


def token_texts(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's own text, for ``[logprob, id, text]`` log-prob entries."""
    return tokenizer.batch_decode([[t] for t in ids]) if ids else []
