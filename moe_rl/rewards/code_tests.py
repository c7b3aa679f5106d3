"""Code reward: run the response's Python program against the prompt's tests in the sandbox.

The program is the last fenced code block of the answer (```python ... ``` or ``` ... ```,
after ``</think>``), else the whole answer. ``sample.label`` holds the tests, either
stdin/stdout pairs ``{"tests": [{"input": "...", "output": "..."}]}`` (outputs compared
after stripping trailing whitespace per line) or assertions ``{"test_code": "assert f(1) == 2"}``
appended to the program. Each stdin/stdout test is its own sandboxed run.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Optional

from .answer_span import after_reasoning
from .config import SandboxConfig
from .sandbox import run_python
from .types import RewardInput

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_program(response: str) -> str:
    text = after_reasoning(response)
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def _normalize(out: str) -> str:
    return "\n".join(line.rstrip() for line in out.strip().splitlines())


def code_reward(sample: RewardInput, *, partial: bool = False, sandbox: Optional[SandboxConfig] = None) -> float:
    """Fraction of tests passed (``partial``) or 1.0 only when all pass."""
    label: Any = sample.label
    if not isinstance(label, dict) or not ({"tests", "test_code"} & set(label)):
        raise ValueError(f"code reward needs label {{'tests': [...]}} or {{'test_code': str}}, got {label!r:.200}")
    program = extract_program(sample.response)
    if "test_code" in label:
        result = run_python(program + "\n\n" + str(label["test_code"]) + "\n", limits=sandbox)
        return 1.0 if result.ok else 0.0
    tests = list(label["tests"])
    if not tests:
        raise ValueError("code reward: label['tests'] is empty")
    passed = 0
    for t in tests:
        t: Dict[str, Any]
        result = run_python(program, stdin=str(t.get("input", "")), limits=sandbox)
        ok = result.ok and _normalize(result.stdout) == _normalize(str(t["output"]))
        passed += ok
        if not ok and not partial:
            return 0.0
    return passed / len(tests)
