"""Math answers checked with HuggingFace math-verify (``parse`` + ``verify``).

The gold answer is parsed as LaTeX or a plain expression; the response is parsed with
``\\boxed{}`` given the highest priority and, failing that, the last LaTeX/plain
expression (math-verify's ``LatexExtractionConfig``/``ExprExtractionConfig``). Only the
text after ``</think>`` is parsed, so numbers in the reasoning do not count as the answer.

math-verify bounds its parsing and comparison time with ``signal.alarm``, which works only
in a process's main thread, and only between Python bytecodes: sympy evaluating
``9^{9^{9^{9}}}`` sits in one C-level power that no alarm interrupts, holding the GIL. So the
real bound is the evaluator's default ``process`` executor, which kills the worker past
``rewards.timeout_s``; there the reward runs on the worker's main thread and math-verify's own
timeouts apply too. Only off the main thread (the ``thread`` executor, which cannot stop a
runaway answer anyway) are they turned off, as math-verify requires.
"""

from __future__ import annotations

import threading
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from .answer_span import after_reasoning
from .types import RewardInput

_GOLD_CONFIG = (LatexExtractionConfig(), ExprExtractionConfig())
# boxed_match_priority=0: a \boxed{} answer wins over any other expression in the text.
_PRED_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _timeout_s(requested: int) -> int | None:
    """math-verify's timeout here: ``requested`` on the main thread, None (off) elsewhere."""
    return requested if threading.current_thread() is threading.main_thread() else None


def _as_latex(gold: Any) -> str:
    text = str(gold).strip()
    # A bare answer such as "\frac{1}{2}" has no math delimiters; math-verify's LaTeX
    # extraction looks for them (or \boxed), so wrap it.
    if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text:
        return text
    return f"${text}$"


def answers_match(gold: Any, prediction: str, *, timeout_s: int = 5) -> bool:
    """True when ``prediction`` (free text) states an answer math-verify deems equal to ``gold``."""
    t = _timeout_s(timeout_s)
    gold_parsed = parse(_as_latex(gold), extraction_config=_GOLD_CONFIG, parsing_timeout=t)
    if not gold_parsed:
        raise ValueError(f"math reward: gold answer {gold!r} could not be parsed by math-verify")
    pred_parsed = parse(prediction, extraction_config=_PRED_CONFIG, parsing_timeout=t)
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=t))


def math_reward(sample: RewardInput, *, timeout_s: int = 5, answer_after_think: bool = True) -> float:
    """1.0 when the response's final answer equals ``sample.label``, else 0.0."""
    if sample.label is None:
        raise ValueError("math reward needs the gold answer in the sample label (answer_key of the dataset)")
    text = after_reasoning(sample.response) if answer_after_think else sample.response
    return 1.0 if answers_match(sample.label, text, timeout_s=timeout_s) else 0.0
