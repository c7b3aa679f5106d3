"""Where the final answer sits in a response: after the reasoning, inside a tag or ``\\boxed{}``.

Shared by the rewards that need the answer *text* (countdown); the math reward hands the
span to math-verify, which does its own extraction.
"""

from __future__ import annotations

import re
from typing import Optional

THINK_CLOSE = "</think>"
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def after_reasoning(response: str) -> str:
    """The text after the last ``</think>`` (the whole response when there is none)."""
    i = response.rfind(THINK_CLOSE)
    return response if i < 0 else response[i + len(THINK_CLOSE):]


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def final_answer_text(response: str) -> Optional[str]:
    """The answer string: last ``<answer>`` tag, else last ``\\boxed{}``, else the last
    non-empty line, all taken after the reasoning. None when nothing is left."""
    text = after_reasoning(response)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else None
