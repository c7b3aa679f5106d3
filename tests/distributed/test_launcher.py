"""The test launcher's own contract: a launch that runs past its time limit fails with what
the ranks were doing last, and leaves no rank behind (a leftover rank would slow every later
test on a 2-core CI machine, and never exit)."""

from __future__ import annotations

import os
import time

import pytest

from launcher import torchrun

pytestmark = pytest.mark.distributed

HANGING_RANK = """
import os, sys, time
open(sys.argv[1] + "." + os.environ["RANK"], "w").write(str(os.getpid()))
print("[worker] family-x layout-y check-z", file=sys.stderr, flush=True)
time.sleep(60)  # a launcher that leaves ranks behind waits for this, and fails the timing check
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is dead for our purpose
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_timeout_kills_every_rank_and_says_where(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(HANGING_RANK)
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(AssertionError) as err:
        torchrun(script, 2, str(pid_file), timeout=8)
    assert time.monotonic() - t0 < 30
    assert "ran past 8 s" in str(err.value)
    assert "last progress: [worker] family-x layout-y check-z" in str(err.value)
    pids = [int((tmp_path / f"pid.{r}").read_text()) for r in (0, 1)]
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), pids
