"""A small byte-level BPE tokenizer built offline, matching the tiny test models.

``moe_rl.models.tiny`` models have vocab 512 with pad=0, bos=1, eos=2; this trains a
byte-level BPE (``tokenizers``) on generated toy-task text so the special tokens take
exactly those ids, wraps it as ``transformers.PreTrainedTokenizerFast`` with a chat
template and saves it with ``save_pretrained``. Byte-level means any text round-trips,
whatever the corpus was. Training is deterministic for a given corpus and vocab size.

Chat template (ChatML-like; a turn ends with EOS so a sampled EOS ends the response):
``<s><|im_start|>user\\n{content}</s>\\n<|im_start|>assistant\\n``
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IM_START)  # ids 0, 1, 2, 3
NUM_BYTES = 256  # the byte-level alphabet every BPE vocab starts with

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 512, texts: Optional[Iterable[str]] = None,
                    *, model_max_length: int = 512):
    """A ``PreTrainedTokenizerFast`` with ``vocab_size`` tokens (pad=0, bos=1, eos=2).

    ``texts``: training corpus; default ``toy_tasks.tokenizer_corpus()``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = NUM_BYTES + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"tokenizer vocab_size ({vocab_size}) must be >= {minimum} "
                         f"({NUM_BYTES} bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if texts is None:
        from .toy_tasks import tokenizer_corpus

        texts = tokenizer_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(list(texts), trainer=trainer)
    for want, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        assert got == want, (token, got, want)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        additional_special_tokens=[IM_START], model_max_length=model_max_length,
        padding_side="left", clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    if len(hf) > vocab_size:
        raise ValueError(f"trained tokenizer has {len(hf)} tokens, more than vocab_size ({vocab_size})")
    return hf


def save_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 512, texts: Optional[Iterable[str]] = None):
    """Build a tokenizer and ``save_pretrained`` it into ``out_dir``; returns the tokenizer."""
    tok = build_tokenizer(vocab_size, texts)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(os.fspath(out_dir))
    return tok


# A character-level template: the last message's content, then "=" (the answer follows).
CHAR_CHAT_TEMPLATE = "{{ bos_token }}{{ messages[-1]['content'] }}="


def build_char_tokenizer(alphabet: str, *, model_max_length: int = 512):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``alphabet`` + "=".

    Ids: pad=0, bos=1, eos=2, then the characters in order, so a model needs only
    ``len(alphabet) + 4`` vocabulary rows (:func:`char_vocab_size`). Used by the toy tasks
    whose answers are single characters (``max_digit``): an untrained policy then puts
    roughly ``1/vocab`` on the right answer, so RL has a signal from the first step. The chat
    template renders only the last message (a system prompt has no characters here).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet + "="))
    vocab = {PAD: 0, BOS: 1, EOS: 2, **{c: 3 + i for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=None,
                                 model_max_length=model_max_length, padding_side="left",
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHAR_CHAT_TEMPLATE
    return hf


def char_vocab_size(alphabet: str) -> int:
    """Vocabulary rows a model needs for :func:`build_char_tokenizer` ``(alphabet)``."""
    return len(dict.fromkeys(alphabet + "=")) + 3
