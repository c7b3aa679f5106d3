"""Render chat messages into the prompt text the policy sees.

With a tokenizer that has a chat template, that template is applied with
``add_generation_prompt=True``. Without one, the plain template is::

    {bos}System: {content}\\n\\nUser: {content}\\n\\nAssistant:

(one ``Role: content`` paragraph per message, the role capitalised; ``{bos}`` only when
the tokenizer has a BOS token). Rendered text is tokenized without adding special tokens
again, since both templates already place BOS.
"""

from __future__ import annotations

from typing import Any, Dict, List

from .types import PromptRecord, TokenizedPrompt


def plain_template(messages: List[Dict[str, str]], bos_token: str | None = None) -> str:
    body = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return f"{bos_token or ''}{body}\n\nAssistant:"


def render_prompt(tokenizer: Any, messages: List[Dict[str, str]]) -> str:
    """The prompt text of ``messages`` under ``tokenizer``'s chat template (or the plain one)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return plain_template(messages, getattr(tokenizer, "bos_token", None))


def tokenize_prompt(tokenizer: Any, record: PromptRecord) -> TokenizedPrompt:
    text = render_prompt(tokenizer, record.messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"prompt (dataset row {record.index}) tokenizes to no tokens: {text!r:.120} "
                         f"({type(tokenizer).__name__} of {len(tokenizer)} tokens); is it the model's tokenizer?")
    return TokenizedPrompt(record=record, text=text, input_ids=list(ids))
