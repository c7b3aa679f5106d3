"""Countdown: combine the given numbers with + - * / to reach the target.

The expression is parsed with ``ast`` and evaluated by walking the tree with exact
``Fraction`` arithmetic; only integer literals, the four binary operators and
parentheses are accepted (no names, calls, unary minus, powers), so nothing the model
writes is ever executed. ``numbers_rule="exact"`` (TinyZero's rule) needs every given
number used exactly once; ``"at_most_once"`` allows leaving some out. Either way a number
may appear only as often as it was given.
"""

from __future__ import annotations

import ast
from collections import Counter
from fractions import Fraction
from typing import Any, List, Optional, Tuple

from .answer_span import final_answer_text
from .types import RewardInput

NUMBERS_RULES = ("exact", "at_most_once")
MAX_EXPRESSION_CHARS = 512  # longer answers are rejected before parsing
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
        ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


class InvalidExpression(ValueError):
    """The answer is not an expression countdown accepts (the reason is the message)."""


def evaluate_expression(expr: str) -> Tuple[Fraction, List[int]]:
    """(exact value, integer literals in order) of an arithmetic expression; raises
    :class:`InvalidExpression` for anything but ints, + - * / and parentheses."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise InvalidExpression(f"expression has {len(expr)} characters (max {MAX_EXPRESSION_CHARS})")
    expr = expr.replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise InvalidExpression(f"not an expression: {e.msg}") from None
    literals: List[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise InvalidExpression("division by zero")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        raise InvalidExpression(f"{type(node).__name__} is not allowed (only integers, + - * / and parentheses)")

    return walk(tree), literals


def check_countdown(expr: str, numbers: List[int], target: int, numbers_rule: str = "exact") -> Optional[str]:
    """None when ``expr`` reaches ``target`` under ``numbers_rule``, else why not."""
    if numbers_rule not in NUMBERS_RULES:
        raise ValueError(f"countdown numbers_rule={numbers_rule!r} is not one of {', '.join(NUMBERS_RULES)}")
    try:
        value, used = evaluate_expression(expr)
    except InvalidExpression as e:
        return str(e)
    given, used_c = Counter(int(n) for n in numbers), Counter(used)
    extra = used_c - given
    if extra:
        return f"uses {sorted(extra.elements())} beyond the given numbers {sorted(given.elements())}"
    if numbers_rule == "exact" and used_c != given:
        return f"leaves out {sorted((given - used_c).elements())}"
    if value != target:
        return f"evaluates to {value}, not {target}"
    return None


def _expression_of(answer: str) -> str:
    # "3 * 4 + 2 = 14" -> "3 * 4 + 2": models often restate the target.
    return answer.split("=")[0].strip().rstrip(".").strip("$ ")


def countdown_reward(sample: RewardInput, *, numbers_rule: str = "exact", format_score: float = 0.0) -> float:
    """1.0 when the final answer reaches the target; ``format_score`` when it is a valid
    expression that does not; 0.0 otherwise. ``sample.label = {"numbers": [...], "target": n}``."""
    label: Any = sample.label
    if not isinstance(label, dict) or "numbers" not in label or "target" not in label:
        raise ValueError(f"countdown reward needs label {{'numbers': [...], 'target': n}}, got {label!r}")
    answer = final_answer_text(sample.response)
    if answer is None:
        return 0.0
    expr = _expression_of(answer)
    reason = check_countdown(expr, list(label["numbers"]), int(label["target"]), numbers_rule)
    if reason is None:
        return 1.0
    try:
        evaluate_expression(expr)
    except InvalidExpression:
        return 0.0
    return float(format_score)
