"""The code reward cannot be gamed: escapes a policy would find score 0, legitimate programs 1.

Each escape below scores 1.0 under a harness that appends the tests to the program and trusts
exit status 0 (checked by hand against that harness: plain ``python solution.py``); each
legitimate program is one an honest policy writes.
"""

import os
import textwrap
import time

import pytest

from moe_rl.rewards.code_tests import code_reward
from moe_rl.rewards.config import SandboxConfig
from moe_rl.rewards.sandbox import run_python
from moe_rl.rewards.types import RewardInput

LIMITS = SandboxConfig(wall_timeout_s=20.0, cpu_time_s=1, memory_mb=512)  # wall >> cpu, as in test_rewards_sandbox
SLACK_S = 10.0  # interpreter start + kill on a loaded 2-core machine
SQ_TESTS = "assert sq(3) == 9\nassert sq(-2) == 4\n"


def _score(program: str, tests: str, **kwargs) -> float:
    response = "<think>...</think>\n```python\n" + textwrap.dedent(program).strip() + "\n```"
    return code_reward(RewardInput(response=response, label={"test_code": textwrap.dedent(tests)}),
                       sandbox=LIMITS, **kwargs)


# (name, program, tests): every one must score 0.0.
ESCAPES = [
    ("sys_exit", "def sq(x):\n    return 0\nimport sys\nsys.exit(0)", SQ_TESTS),
    ("raise_system_exit", "def sq(x):\n    return 0\nraise SystemExit", SQ_TESTS),
    ("os_exit", "import os\ndef sq(x):\n    return 0\nos._exit(0)", SQ_TESTS),
    ("os_exit_inside_the_call", "import os\ndef sq(x):\n    os._exit(0)", SQ_TESTS),
    ("system_exit_inside_the_call", "def sq(x):\n    raise SystemExit(0)", SQ_TESTS),
    ("excepthook_exits_0", """
        import os, sys
        sys.excepthook = lambda *a: os._exit(0)
        def sq(x):
            return 0
     """, SQ_TESTS),
    ("atexit_prints_fake_tokens", """
        import atexit, os, sys
        def fake():
            for fd in range(1, 64):
                try:
                    os.write(fd, b"0" * 64 + b"\\n")
                except OSError:
                    pass
        atexit.register(fake)
        def sq(x):
            return 0
        sys.exit(0)
     """, SQ_TESTS),
    ("token_lookalike_then_exit", """
        import os
        def sq(x):
            return 0
        for fd in range(1, 64):
            try:
                os.write(fd, os.urandom(32).hex().encode() + b"\\n")
            except OSError:
                pass
        os._exit(0)
     """, SQ_TESTS),
    ("expected_stdout_then_exit", "print(9)\nprint(4)\nimport sys\nsys.exit(0)", SQ_TESTS),
    ("os_exit_and_sys_exit_patched", """
        import os, sys
        os._exit = lambda code: None
        sys.exit = lambda code=0: None
        def sq(x):
            return 0
     """, SQ_TESTS),
    ("assertion_error_patched", """
        import builtins
        builtins.AssertionError = lambda *args: SystemExit(0)
        def sq(x):
            return 0
     """, "if sq(3) != 9:\n    raise AssertionError('wrong')\n"),
    ("always_equal", """
        class Any:
            def __eq__(self, other):
                return True
        def sq(x):
            return Any()
     """, SQ_TESTS),
    ("always_equal_inside_a_list", """
        class Any:
            def __eq__(self, other):
                return True
        def pair(x):
            return [Any(), Any()]
     """, "assert pair(1) == [1, 2]\n"),
    ("always_in_range", """
        class Middle:
            def __le__(self, other):
                return True
            __ge__ = __lt__ = __gt__ = __le__
        def count(xs):
            return Middle()
     """, "assert 3 <= count([1, 2, 3, 4]) < 5\n"),
    ("int_subclass_with_ne_as_eq", """
        class Liar(int):
            __eq__ = int.__ne__
            __hash__ = int.__hash__
        def sq(x):
            return Liar(0)
     """, SQ_TESTS),
    ("sub_returns_zero", """
        class Zero:
            def __sub__(self, other):
                return 0
            __rsub__ = __sub__
        def area(r):
            return Zero()
     """, "assert abs(area(1) - 3.14159) < 1e-4\n"),
    ("always_equal_through_unittest", """
        class Any:
            def __eq__(self, other):
                return True
        def sq(x):
            return Any()
     """, "import unittest\nunittest.TestCase().assertEqual(sq(3), 9)\n"),
    ("always_equal_built_by_exec", """
        exec("class Any:\\n    def __eq__(self, other):\\n        return True", globals())
        def sq(x):
            return Any()
     """, SQ_TESTS),
    ("always_equal_compiled_as_a_library_file", """
        import fractions
        exec(compile("class Any:\\n    def __eq__(self, other):\\n        return True", fractions.__file__, "exec"))
        def sq(x):
            return Any()
     """, SQ_TESTS),
    ("library_class_patched", """
        import fractions
        fractions.Fraction.__eq__ = lambda self, other: True
        def sq(x):
            return fractions.Fraction(0)
     """, SQ_TESTS),
    ("library_function_patched", """
        import math
        math.isclose = lambda *a, **k: True
        def area(r):
            return 0.0
     """, "import math\nassert math.isclose(area(1), 3.14159)\n"),
    ("library_function_patched_by_a_thread", """
        import math, threading, time
        def keep_patching():
            while True:
                math.isclose = lambda *a, **k: True
                time.sleep(0.001)
        threading.Thread(target=keep_patching, daemon=True).start()
        def area(r):
            time.sleep(0.05)
            return 0.0
     """, "import math\nassert math.isclose(area(1), 3.14159)\n"),
    ("builtin_shadowed", """
        def sorted(xs):
            return [1, 2, 3]
        def f():
            return [3, 3, 3]
     """, "assert sorted(f()) == [1, 2, 3]\n"),
    ("builtin_patched", """
        import builtins
        builtins.sorted = lambda xs: [1, 2, 3]
        def f():
            return [3, 3, 3]
     """, "assert sorted(f()) == [1, 2, 3]\n"),
    ("expected_value_read_from_the_callers_frame", """
        import sys
        def sq(x):
            consts = sys._getframe(1).f_code.co_consts
            return max(c for c in consts if type(c) is int)
     """, "assert sq(3) == 9\n"),
    ("expected_value_read_through_a_traceback", """
        def sq(x):
            try:
                raise Exception
            except Exception as e:
                caller = e.__traceback__.tb_frame.f_back
            return max(c for c in caller.f_code.co_consts if type(c) is int)
     """, "assert sq(3) == 9\n"),
    ("settrace_skips_the_asserts", """
        import linecache, sys
        def sq(x):
            return 0
        def skip(frame, event, arg):
            if event == "line" and frame.f_code.co_name == "<module>":
                n = frame.f_lineno
                while linecache.getline(frame.f_code.co_filename, n).startswith("assert"):
                    n += 1
                if n != frame.f_lineno:
                    frame.f_lineno = n
            return skip
        sys._getframe().f_trace = skip
        sys.settrace(skip)
     """, "\n\n" + SQ_TESTS + "pass\n"),
    ("stdout_redirected_and_closed", """
        import os, sys
        sys.stdout = open(os.devnull, "w")
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        def sq(x):
            return 0
        os._exit(0)
     """, SQ_TESTS),
    ("token_thief", """
        import gc, os, re, sys
        def sq(x):
            return 0
        hexes = re.compile(r"[0-9a-f]{64}")
        found = set()
        def scan(obj):
            try:
                found.update(hexes.findall(repr(obj)))
            except Exception:
                pass
        f = sys._getframe()
        while f is not None:
            scan(f.f_locals)
            scan(f.f_globals)
            f = f.f_back
        for m in list(sys.modules.values()):
            scan(getattr(m, "__dict__", None))
        for steal in (gc.get_objects, lambda: [fr.f_locals for fr in sys._current_frames().values()],
                      lambda: [open("/proc/self/mem", "rb")]):
            try:
                scan(steal())
            except Exception:
                pass
        for fd in range(3, 64):
            try:
                scan(os.read(fd, 1 << 16))
            except OSError:
                pass
        for fd in range(1, 64):
            for token in found:
                try:
                    os.write(fd, token.encode() + b"\\n")
                except OSError:
                    pass
        os._exit(0)
     """, SQ_TESTS),
]


@pytest.mark.parametrize("name,program,tests", ESCAPES, ids=[e[0] for e in ESCAPES])
def test_escape_scores_zero(name, program, tests):
    assert _score(program, tests) == 0.0


def test_escapes_name_what_stopped_them():
    r = run_python("def sq(x):\n    return 0\nimport sys\nsys.exit(0)", test_code=SQ_TESTS, limits=LIMITS)
    assert r.status == "error" and "exited before the tests ran" in r.stderr and not r.completed
    r = run_python("import os\ndef sq(x):\n    os._exit(0)", test_code=SQ_TESTS, limits=LIMITS)
    assert (r.status, r.returncode, r.completed) == ("incomplete", 0, False)  # exit 0 is not enough
    r = run_python("class A:\n    def __eq__(s, o):\n        return True\ndef sq(x):\n    return A()",
                   test_code=SQ_TESTS, limits=LIMITS)
    assert r.status == "rejected" and "A.__eq__ is defined by the program" in r.stderr


@pytest.mark.parametrize("program", ["while True:\n    pass", "def sq(x):\n    while True:\n        pass"])
def test_infinite_loop_scores_zero_within_the_cpu_limit(program):
    t0 = time.monotonic()
    r = run_python(program, test_code=SQ_TESTS, limits=LIMITS)
    assert r.status == "cpu_time" and not r.completed
    assert time.monotonic() - t0 < LIMITS.cpu_time_s + SLACK_S


def test_killing_the_parent_is_refused():
    program = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef sq(x):\n    return x * x"
    r = run_python(program, test_code=SQ_TESTS, limits=LIMITS)
    assert r.status == "subprocess" and "os.kill" in r.stderr
    os.kill(os.getpid(), 0)  # still here


# (name, program, tests): every one must score 1.0.
LEGIT = [
    ("function", "def sq(x):\n    return x * x", SQ_TESTS),
    ("humaneval_check", "def sq(x):\n    return x * x",
     "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\ncheck(sq)\n"),
    ("solution_class", """
        class Solution:
            def twoSum(self, nums, target):
                seen = {}
                for i, n in enumerate(nums):
                    if target - n in seen:
                        return [seen[target - n], i]
                    seen[n] = i
     """, "assert Solution().twoSum([2, 7, 11, 15], 9) == [0, 1]\n"),
    ("library_values", """
        from collections import Counter, OrderedDict, deque, namedtuple
        from fractions import Fraction
        def third():
            return Fraction(1, 3)
        def counts(s):
            return Counter(s)
        def window(xs):
            return deque(xs[-2:])
        def point(x, y):
            Point = namedtuple("Point", "x y")  # looks up its caller's frame while the tests run
            return Point(x, y)
        def nested():
            return {"a": [1, (2, 3)], "b": {4, 5}, "c": OrderedDict(z=1)}
     """, """
        from collections import Counter, deque
        from fractions import Fraction
        import math
        assert third() == Fraction(1, 3) and third() + third() == Fraction(2, 3)
        assert counts("aab") == Counter({"a": 2, "b": 1})
        assert window([1, 2, 3]) == deque([2, 3])
        assert point(1, 2) == (1, 2) and point(1, 2).y == 2
        assert nested() == {"a": [1, (2, 3)], "b": {5, 4}, "c": {"z": 1}}
        assert math.isclose(float(third()), 0.3333333333)
     """),
    ("node_class_ordered_for_heapq", """
        import heapq
        class ListNode:
            def __init__(self, val, next=None):
                self.val, self.next = val, next
            def __lt__(self, other):
                return self.val < other.val
        def merge(lists):
            heap = [node for node in lists if node]
            heapq.heapify(heap)
            head = tail = ListNode(0)
            while heap:
                node = heapq.heappop(heap)
                tail.next = tail = node
                if node.next:
                    heapq.heappush(heap, node.next)
            return head.next
        def build(xs):
            head = None
            for x in reversed(xs):
                head = ListNode(x, head)
            return head
        def to_list(node):
            out = []
            while node:
                out.append(node.val)
                node = node.next
            return out
     """, "assert to_list(merge([build([1, 4]), build([2, 3])])) == [1, 2, 3, 4]\nassert merge([]) is None\n"),
    ("test_defined_class_with_eq", "def make(v):\n    return {'val': v}", """
        class Node:
            def __init__(self, val):
                self.val = val
            def __eq__(self, other):
                return isinstance(other, Node) and self.val == other.val
        assert Node(make(3)["val"]) == Node(3)
     """),
    ("imports_in_the_tests", "def f():\n    return [3, 1, 2]", """
        import collections.abc
        import os.path
        from itertools import permutations
        from math import isclose
        assert isinstance(f(), collections.abc.Sequence)
        assert os.path.join("a", "b") == "a/b" and isclose(sum(f()) / 3, 2.0)
        assert sorted(f()) in [list(p) for p in permutations([1, 2, 3])]
     """),
    ("deep_recursion", """
        import sys
        sys.setrecursionlimit(100000)
        def depth(n):
            return 0 if n == 0 else 1 + depth(n - 1)
     """, "assert depth(20000) == 20000\n"),
    ("threads_and_main_guard", """
        import threading
        def sq(x):
            out = []
            t = threading.Thread(target=lambda: out.append(x * x))
            t.start()
            t.join()
            return out[0]
        if __name__ == "__main__":
            print("self-check", sq(2))
     """, SQ_TESTS),
    ("stdout_closed_but_correct", """
        import os, sys
        sys.stdout = open(os.devnull, "w")
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        def sq(x):
            return x * x
     """, SQ_TESTS),
    ("exit_functions_patched_but_correct", """
        import os, sys
        os._exit = lambda code: None
        sys.exit = lambda code=0: None
        def sq(x):
            return x * x
     """, SQ_TESTS),
]


@pytest.mark.parametrize("name,program,tests", LEGIT, ids=[e[0] for e in LEGIT])
def test_legitimate_program_scores_one(name, program, tests):
    assert _score(program, tests) == 1.0


def test_guard_values_off_is_the_documented_opt_out():
    # A class the task asks for, compared by the tests: rejected by default (the guard cannot
    # tell it from an always-equal object), accepted with guard_values=False ...
    vector = """
        class Vector:
            def __init__(self, x, y):
                self.x, self.y = x, y
            def __add__(self, other):
                return Vector(self.x + other.x, self.y + other.y)
            def __eq__(self, other):
                return (self.x, self.y) == (other.x, other.y)
     """
    tests = "assert Vector(1, 2) + Vector(3, 4) == Vector(4, 6)\n"
    assert _score(vector, tests) == 0.0
    assert _score(vector, tests, guard_values=False) == 1.0
    # ... where an always-equal object passes again: the limit sandbox_child.py states.
    always = "class Any:\n    def __eq__(self, other):\n        return True\ndef sq(x):\n    return Any()"
    assert _score(always, SQ_TESTS, guard_values=False) == 1.0


STDIN_TESTS = {"tests": [{"input": "2 3\n", "output": "5"}]}


@pytest.mark.parametrize("tail,expected", [
    ("", 1.0),
    ("import sys\nsys.exit(0)", 1.0),           # a normal way to end a program
    ("import os, sys\nsys.stdout.flush()\nos._exit(0)", 1.0),  # exit status 0 decides without tests
    ("raise ValueError('after the answer')", 0.0),
    ("import sys\nsys.exit(1)", 0.0),
    ("import sys\nsys.exit(256)", 0.0),          # CPython would report 256 as status 0
    ("while True:\n    pass", 0.0),
])
def test_stdin_stdout_mode_judges_output_and_exit(tail, expected):
    program = "a, b = map(int, input().split())\nprint(a + b)\n" + tail
    response = "```python\n" + program + "\n```"
    assert code_reward(RewardInput(response=response, label=STDIN_TESTS), sandbox=LIMITS) == expected


def test_numpy_results_are_checked_too():
    # numpy imports (ctypes is refused as an ImportError, which numpy handles) and its arrays
    # compare; an object array holding an always-equal object is searched and rejected.
    program = """
        import numpy as np
        class Any:
            def __eq__(self, other):
                return True
        def honest(n):
            return np.arange(n)
        def sneaky(n):
            return np.array([Any()] * n, dtype=object)
     """
    assert _score(program, "import numpy as np\nassert (honest(3) == np.array([0, 1, 2])).all()\n") == 1.0
    assert _score(program, "import numpy as np\nassert (sneaky(3) == np.array([0, 1, 2])).all()\n") == 0.0
