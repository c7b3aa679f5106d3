"""The checkpoint's tokenizer, as the embedded engine uses it: loaded the way SGLang 0.5.23's
``get_tokenizer`` loads it, shared by the HTTP server (response text, stop strings) and the
in-process rollout (stop strings), and giving the engine the stop token ids SGLang takes from
a tokenizer (:func:`tokenizer_stop_ids`). Kept apart from ``server.py`` so the trainer can load
it without FastAPI/uvicorn."""

from __future__ import annotations

import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # either one means the directory has a tokenizer
# Added-vocabulary tokens SGLang stops on besides the tokenizer's EOS (its
# ``attach_additional_stop_token_ids``): Llama 3's end of message, and two vendors' end tokens.
ADDITIONAL_STOP_TOKEN_TEXTS = ("<|eom_id|>", "<|content_model_end_sampling|>", "<|ifm|im_end|>")


def has_tokenizer(path: str) -> bool:
    """Whether the checkpoint directory ``path`` holds a tokenizer."""
    return bool(path) and any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, loaded as SGLang's ``get_tokenizer`` loads it (no clean-up of
    spaces when decoding); None when the directory has none (then replies carry no ``text``,
    as SGLang's with ``--skip-tokenizer-init``)."""
    if not has_tokenizer(path):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, clean_up_tokenization_spaces=False, trust_remote_code=trust_remote_code)


def tokenizer_stop_ids(tokenizer) -> set[int]:
    """The token ids a sample stops on because of the tokenizer, as SGLang's scheduler takes
    them (``Req._check_token_based_finish``): the tokenizer's ``eos_token_id``, and the ids of
    :data:`ADDITIONAL_STOP_TOKEN_TEXTS` that are in its added vocabulary. Empty for None."""
    if tokenizer is None:
        return set()
    ids = set()
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    added = tokenizer.get_added_vocab()
    ids.update(added[t] for t in ADDITIONAL_STOP_TOKEN_TEXTS if t in added)
    return ids
