"""The code sandbox stops runaway programs within its limits and says why."""

import dataclasses
import os
import socket
import time

import pytest

from moe_rl.rewards.code_tests import code_reward, extract_program
from moe_rl.rewards.config import SandboxConfig
from moe_rl.rewards.sandbox import run_python
from moe_rl.rewards.types import RewardInput

LIMITS = SandboxConfig(wall_timeout_s=20.0, cpu_time_s=1, memory_mb=256)  # wall >> cpu: a busy CI machine must not turn the CPU-limit case into a timeout
SLACK_S = 10.0  # interpreter start + kill on a loaded 2-core machine (the unlimited cases run 60 s)


def _sandbox_pids():
    pids = set()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if b"sandbox_child.py" in f.read():
                        pids.add(int(p))
            except OSError:
                pass
    return pids


def test_runs_program_with_stdin_in_temp_dir():
    r = run_python("import os\nprint(input()[::-1], os.getcwd())", stdin="abc\n", limits=LIMITS)
    out, cwd = r.stdout.split()
    assert r.status == "ok" and out == "cba"
    assert cwd != os.getcwd() and not os.path.exists(cwd)  # a fresh directory, removed afterwards


def test_infinite_loop_hits_cpu_limit():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass", limits=LIMITS)
    assert r.status == "cpu_time", (r.status, r.stderr)
    assert time.monotonic() - t0 < LIMITS.cpu_time_s + SLACK_S


def test_sleeper_hits_wall_timeout():
    lim = dataclasses.replace(LIMITS, wall_timeout_s=1.0)
    t0 = time.monotonic()
    r = run_python("import time\ntime.sleep(60)", limits=lim)
    assert r.status == "timeout"
    assert lim.wall_timeout_s <= time.monotonic() - t0 < lim.wall_timeout_s + SLACK_S


def test_memory_hog_hits_address_space_limit():
    t0 = time.monotonic()
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))", limits=LIMITS)
    assert r.status == "memory" and "MemoryError" in r.stderr
    assert time.monotonic() - t0 < SLACK_S


def test_fork_bomb_is_blocked():
    t0 = time.monotonic()
    r = run_python("import os\nwhile True:\n    os.fork()", limits=LIMITS)
    assert r.status == "subprocess" and "os.fork" in r.stderr
    assert time.monotonic() - t0 < SLACK_S
    r = run_python("import subprocess\nsubprocess.run(['true'])", limits=LIMITS)
    assert r.status == "subprocess"


def test_allowed_children_die_with_the_run():
    # With subprocesses allowed, children that outlive the program are killed with its group.
    before = _sandbox_pids()
    lim = dataclasses.replace(LIMITS, allow_subprocess=True, wall_timeout_s=1.0)
    code = "import os, time\nfor _ in range(8):\n    if os.fork() == 0:\n        time.sleep(60)\ntime.sleep(60)"
    t0 = time.monotonic()
    r = run_python(code, limits=lim)
    assert r.status == "timeout" and time.monotonic() - t0 < lim.wall_timeout_s + SLACK_S
    deadline = time.monotonic() + 2.0
    while _sandbox_pids() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (_sandbox_pids() - before)


@pytest.mark.parametrize("isolate", [True, False])
def test_network_is_blocked(isolate):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    lim = dataclasses.replace(LIMITS, isolate_network=isolate)
    code = f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))\nprint('connected')"
    t0 = time.monotonic()
    r = run_python(code, limits=lim)
    assert r.status == "network" and "connected" not in r.stdout
    assert time.monotonic() - t0 < SLACK_S
    with pytest.raises(socket.timeout):
        server.accept()  # nothing reached the listener
    server.close()


def test_output_is_bounded():
    lim = dataclasses.replace(LIMITS, max_output_bytes=1000)
    r = run_python("import sys\nfor _ in range(10000):\n    sys.stdout.write('x' * 100 + '\\n')", limits=lim)
    assert r.status != "ok" and len(r.stdout) <= 1000


def test_code_reward_stdin_tests_and_asserts():
    prog = "<think>read two ints</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    tests = {"tests": [{"input": "1 2\n", "output": "3"}, {"input": "5 5\n", "output": "10\n"}]}
    assert extract_program(prog).startswith("a, b")
    assert code_reward(RewardInput(response=prog, label=tests), sandbox=LIMITS) == 1.0
    wrong = prog.replace("a + b", "a * b")  # 1*2 != 3, 5*5 != 10
    assert code_reward(RewardInput(response=wrong, label=tests), sandbox=LIMITS) == 0.0
    half = prog.replace("a + b", "a * b if a == 5 else a + b")
    assert code_reward(RewardInput(response=half, label=tests), partial=True, sandbox=LIMITS) == 0.5
    fn = "```\ndef sq(x):\n    return x * x\n```"
    assert code_reward(RewardInput(response=fn, label={"test_code": "assert sq(3) == 9"}), sandbox=LIMITS) == 1.0
    assert code_reward(RewardInput(response=fn, label={"test_code": "assert sq(3) == 6"}), sandbox=LIMITS) == 0.0
