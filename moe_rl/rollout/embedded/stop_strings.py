"""Stop strings of one request (``sampling_params.stop``), matched as SGLang 0.5.23 matches them.

SGLang (``schedule_batch.py``, ``_check_str_based_finish``) checks after every sampled token:
it decodes the last ``k + 1`` output tokens, ``k`` being the longest stop string's own token
count (``tokenizer.encode(s, add_special_tokens=False)``), with ``decode``'s defaults (special
tokens show as their text), and the first stop string in the request's order that occurs in
that tail finishes the request with ``{"type": "stop", "matched": s}``. The check comes before
the stop-token/EOS check, so a stop string wins when both happen at one token. Every generated
token stays in ``output_ids``; only the response text is cut (``output_text.py``).

One deliberate difference: the tail decoded here is at least the longest stop string's UTF-8
length + 1 tokens. SGLang's ``k + 1`` tokens miss a stop string that the model spelled in more
tokens than that (" Th" is one token of its own encoding, but generated as " ", "T", "h" it
spans three). A token carries at least one byte, so this tail holds every occurrence that ends
in the newest token; wherever SGLang finds a stop string, the same token finishes here, with
the same ``matched``.

Limits are SGLang's (``moe_rl.rollout.types.check_stop_strings``, one rule for the run config
and requests): at most 32 strings. The empty string, which SGLang finds in every tail (ending
every request after one token), is refused at the door instead.
"""

from __future__ import annotations

from typing import Any



class StopStrings:
    """The stop strings of one request and how many trailing tokens to decode to find them.

    Built by the caller (the server's HTTP thread, or ``EmbeddedEngine.generate`` in-process);
    :meth:`match` runs on the engine thread. The tokenizer is shared: decoding and (already
    configured) encoding only read it.
    """

    def __init__(self, strs: list[str], tokenizer: Any) -> None:
        assert strs and all(strs), "stop strings must be non-empty (checked by the protocol parser)"
        self.strs = list(strs)
        self._tokenizer = tokenizer
        utf8_bytes = max(len(s.encode("utf-8")) for s in strs)
        try:
            own_tokens = max(len(tokenizer.encode(s, add_special_tokens=False)) for s in strs)
        except Exception:  # noqa: BLE001 - a vocabulary that cannot spell it (word-level, no unknown token)
            own_tokens = 0  # then it can only appear spelled in output tokens, at most one per byte
        self.window = max(own_tokens, utf8_bytes) + 1  # trailing tokens decoded per check

    def match(self, output_ids: list[int]) -> str | None:
        """The first stop string (request order) in the decoded tail of ``output_ids``, or None."""
        if not output_ids:
            return None
        tail = self._tokenizer.decode(output_ids[-self.window:])
        return next((s for s in self.strs if s in tail), None)

    def holds_prefix(self, output_ids: list[int]) -> bool:
        """Whether the decoded tail ends with the beginning of a stop string (or holds one):
        SGLang then holds a streamed chunk back, so no chunk shows text a stop string may cut."""
        if not output_ids:
            return False
        tail = self._tokenizer.decode(output_ids[-self.window:])
        if not tail:
            return False
        return any(s in tail or any(tail.endswith(s[:i]) for i in range(1, min(len(tail), len(s)) + 1))
                   for s in self.strs)
