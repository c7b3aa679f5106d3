"""Generated prompts for the quickstart and tests: arithmetic, countdown and max_digit, no
downloads.

Each task is a dict row in the same shape a JSONL dataset has (``prompt``, ``answer``,
``task``), so the quickstart exercises the real dataset path. Generation is a pure
function of the seed. Countdown targets are built from an expression over the numbers,
so every instance is solvable. ``max_digit`` ("the largest of four digits", answered with
one character) is what the quickstart's tiny policy learns by RL in a few dozen steps; it
comes with its character tokenizer (``tokenizer.build_char_tokenizer``) and its reward
(:func:`exact_answer_reward`).
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, List

from moe_rl.checkpoint.atomic import replace_file

TASKS = ("arithmetic", "countdown", "max_digit")
MAX_DIGIT_ALPHABET = "0123456789 "  # every character a max_digit prompt or answer uses
SYSTEM_PROMPT = ("Think step by step inside <think> </think>, then give the final answer "
                 "in \\boxed{}.")


def arithmetic_task(rng: random.Random, max_operand: int = 20) -> Dict[str, Any]:
    a, b, c = (rng.randint(0, max_operand) for _ in range(3))
    op1, op2 = rng.choice("+-*"), rng.choice("+-")
    expr = f"{a} {op1} {b} {op2} {c}"
    value = _eval_small(a, op1, b, op2, c)
    return {"task": "arithmetic", "prompt": f"What is {expr}?", "answer": str(value)}


def _eval_small(a: int, op1: str, b: int, op2: str, c: int) -> int:
    # Independent of Python's eval: apply * first, then left to right.
    if op1 == "*":
        left = a * b
        return left + c if op2 == "+" else left - c
    left = a + b if op1 == "+" else a - b
    return left + c if op2 == "+" else left - c


def countdown_task(rng: random.Random, num_numbers: int = 3, max_number: int = 20) -> Dict[str, Any]:
    numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
    order = numbers[:]
    rng.shuffle(order)
    # Build the target from +, -, * over the numbers in a random order (always integer).
    target = order[0]
    solution = str(order[0])
    for n in order[1:]:
        op = rng.choice("+-*")
        target = target + n if op == "+" else target - n if op == "-" else target * n
        solution = f"({solution} {op} {n})"
    prompt = (f"Using the numbers {numbers}, each exactly once, and + - * /, "
              f"write an expression equal to {target}.")
    return {"task": "countdown", "prompt": prompt,
            "answer": {"numbers": numbers, "target": target}, "solution": solution}


def max_digit_task(rng: random.Random, num_digits: int = 4) -> Dict[str, Any]:
    digits = [rng.randint(0, 9) for _ in range(num_digits)]
    return {"task": "max_digit", "prompt": " ".join(map(str, digits)), "answer": str(max(digits))}


def exact_answer_reward(sample, strip: bool = True) -> float:
    """1.0 when the response is exactly the label (surrounding whitespace ignored), else 0.0."""
    response = sample.response.strip() if strip else sample.response
    return float(response == str(sample.label))


_TASK_FNS = {"arithmetic": arithmetic_task, "countdown": countdown_task, "max_digit": max_digit_task}


def generate_tasks(num: int, *, task: str = "arithmetic", seed: int = 0) -> List[Dict[str, Any]]:
    """``num`` rows of ``task`` (one of ``TASKS``, or "mixed": arithmetic and countdown in turn),
    deterministic in ``seed``."""
    if task not in TASKS + ("mixed",):
        raise ValueError(f"toy task {task!r} is not one of {', '.join(TASKS + ('mixed',))}")
    if num < 0:
        raise ValueError(f"number of toy tasks ({num}) must be >= 0")
    rng = random.Random(seed)
    mixed = ("arithmetic", "countdown")
    return [_TASK_FNS[task if task != "mixed" else mixed[i % len(mixed)]](rng) for i in range(num)]


def write_jsonl(rows: List[Dict[str, Any]], path: str | os.PathLike) -> str:
    """Write ``rows`` as JSONL atomically (temp file, fsync, rename); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_file(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()))
    return path


def tokenizer_corpus(num: int = 2000, seed: int = 0) -> List[str]:
    """Text a toy tokenizer is trained on: prompts and well-formed responses of both tasks."""
    rng = random.Random(seed + 1)
    texts = [SYSTEM_PROMPT]
    for row in generate_tasks(num, task="mixed", seed=seed):
        texts.append(row["prompt"])
        ans = row["solution"] if row["task"] == "countdown" else row["answer"]
        steps = " ".join(str(rng.randint(0, 400)) for _ in range(3))
        texts.append(f"<think>Let me compute step by step: {steps}.</think> The answer is \\boxed{{{ans}}}.")
    return texts
