"""Format reward: reasoning in one ``<think>...</think>`` block, then a non-empty answer.

A structural check, so a regular expression is the right tool here (unlike answers,
which math-verify parses).
"""

from __future__ import annotations

import re

from .answer_span import last_boxed
from .types import RewardInput

_SHAPE = re.compile(r"^\s*<think>(?P<think>.*?)</think>(?P<answer>.*)$", re.DOTALL)


def think_format_reward(sample: RewardInput, *, require_boxed: bool = False,
                        require_answer_tag: bool = False, prompt_opens_think: bool = False) -> float:
    """1.0 when the response is ``<think>reasoning</think> answer``, else 0.0.

    Exactly one ``<think>`` and one ``</think>``; both parts non-empty. ``prompt_opens_think``:
    the chat template already ended the prompt with ``<think>``, so the response starts
    inside it. ``require_boxed``/``require_answer_tag``: the answer must hold a
    ``\\boxed{}`` / an ``<answer>...</answer>``.
    """
    text = ("<think>" + sample.response) if prompt_opens_think else sample.response
    if text.count("<think>") != 1 or text.count("</think>") != 1:
        return 0.0
    m = _SHAPE.match(text)
    if m is None or not m.group("think").strip():
        return 0.0
    answer = m.group("answer").strip()
    if not answer:
        return 0.0
    if require_boxed and last_boxed(answer) is None:
        return 0.0
    if require_answer_tag and not re.search(r"<answer>.*?\S.*?</answer>", answer, re.DOTALL):
        return 0.0
    return 1.0
