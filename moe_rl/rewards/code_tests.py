"""Code reward: run the response's Python program against the prompt's tests in the sandbox.

The program is the last fenced code block of the answer (```python ... ``` or ``` ... ```,
after ``</think>``), else the whole answer. ``sample.label`` holds the tests, either
stdin/stdout pairs ``{"tests": [{"input": "...", "output": "..."}]}`` (outputs compared
after stripping trailing whitespace per line; each pair is its own sandboxed run, passed when
the output matches and the exit status is 0), or assertions ``{"test_code": "assert f(1) == 2"}``.

Test code is not appended to the program: the sandbox's harness runs the program, then the
tests in its globals, and a pass needs the harness's proof that the tests ran to their end,
so exiting early (``sys.exit``, ``os._exit``), crashing or printing the expected output scores
0. Values the tests compare are checked for comparison methods the program defined
(``guard_values``); ``sandbox_child.py`` lists what is and is not caught.
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


def code_reward(sample: RewardInput, *, partial: bool = False, guard_values: bool = True,
                sandbox: Optional[SandboxConfig] = None) -> float:
    """Fraction of tests passed (``partial``) or 1.0 only when all pass; ``test_code`` is one
    test. ``guard_values=False`` lets the tests compare objects of classes the program defines
    (a task that asks for a class with ``__eq__``), and with them objects equal to anything."""
    label: Any = sample.label
    if not isinstance(label, dict) or not ({"tests", "test_code"} & set(label)):
        raise ValueError(f"code reward needs label {{'tests': [...]}} or {{'test_code': str}}, got {label!r:.200}")
    program = extract_program(sample.response)
    if "test_code" in label:
        test_code = str(label["test_code"])
        try:
            compile(test_code, "<tests>", "exec", dont_inherit=True)
        except SyntaxError as e:
            raise ValueError(f"code reward: label['test_code'] does not compile: {e}") from None
        result = run_python(program, test_code=test_code, guard_values=guard_values, limits=sandbox)
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
