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

Streamed text (:class:`IncrementalText`): an unfinished chunk of a stream carries the text
SGLang's detokenizer has released so far. At each chunk it decodes the ids not yet committed
behind a few committed ones; a piece that decodes cleanly is committed and released whole, a
piece ending in an incomplete character (U+FFFD) only up to its last space, newline or CJK
character, and is retried with more tokens at the next chunk. A finished item's text is
:func:`response_text`.
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


# CJK Unified Ideographs blocks (with extensions and compatibility ideographs): text ending in
# one is released at once, as a word boundary.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def releasable_prefix(text: str) -> str:
    """The part of an unfinished piece that a stream may show: all of it after a newline or
    a CJK character, all but the last character after a CJK one, else up to its last space."""
    if text.endswith("\n") or (text and _is_cjk(text[-1])):
        return text
    if len(text) > 1 and _is_cjk(text[-2]):
        return text[:-1]
    return text[: text.rfind(" ") + 1]


class IncrementalText:
    """The text of one streamed sample, released chunk by chunk as SGLang's detokenizer does
    (module docstring). :meth:`advance` takes the ids new since the last chunk."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], *, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._vocab = len(tokenizer)
        self._kw = dict(skip_special_tokens=skip_special_tokens,
                        spaces_between_special_tokens=spaces_between_special_tokens)
        self._ids = _clamp(prompt_ids[-SURROUNDING_PROMPT_TOKENS:], self._vocab)
        self._surr = 0  # ids[surr:read] are decoded as context only
        self._read = len(self._ids)
        self._committed = 0  # length of the committed text
        self._released = 0  # committed text + the released part of an uncommitted piece
        self.text = ""  # everything released so far

    def advance(self, new_ids: list[int]) -> str:
        self._ids.extend(_clamp(new_ids, self._vocab))
        surr = self._tok.decode(self._ids[self._surr: self._read], **self._kw)
        piece = self._tok.decode(self._ids[self._surr:], **self._kw)[len(surr):]
        already = self._released - self._committed  # released earlier from an uncommitted piece
        if piece and not piece.endswith("\ufffd"):
            self._committed += len(piece)
            self._surr, self._read = self._read, len(self._ids)
            self._released = self._committed
            self.text += piece[already:]
        else:
            shown = releasable_prefix(piece)
            self._released = self._committed + len(shown)
            self.text += shown[already:]
        return self.text
