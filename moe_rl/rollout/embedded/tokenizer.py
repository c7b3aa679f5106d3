"""The checkpoint's tokenizer, as the embedded engine uses it: loaded the way SGLang 0.5.23's
``get_tokenizer`` loads it, shared by the HTTP server (response text, stop strings) and the
in-process rollout (stop strings). Kept apart from ``server.py`` so the trainer can load it
without FastAPI/uvicorn."""

from __future__ import annotations

import os

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # either one means the directory has a tokenizer


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
