"""Launch helpers for tests that need several processes (torchrun on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def start_torchrun(script: str | Path, nproc: int, *args: str) -> subprocess.Popen:
    """Start ``script`` under torchrun on 127.0.0.1 with ``nproc`` ranks (pipes for stdout and
    stderr); :func:`finish` waits for it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1",
               MOE_RL_DIST_TIMEOUT_S="300")
    # --standalone: a private c10d rendezvous on a free local port (port 0 with the static
    # rendezvous is not propagated to the workers and hangs).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", str(script), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def torchrun(script: str | Path, nproc: int, *args: str, timeout: float = 600,
             check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``script`` under torchrun on 127.0.0.1 with ``nproc`` ranks; with ``check``, a
    non-zero exit fails the test with the launch's output."""
    return finish(start_torchrun(script, nproc, *args), timeout=timeout, check=check)


def finish(proc: subprocess.Popen, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Wait for a :func:`start_torchrun` launch (killing it and its ranks past ``timeout``)."""
    cmd = proc.args
    script, args = cmd[6], cmd[7:]  # after python -m torch.distributed.run and its 3 options
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate()
        progress = [line for line in err.splitlines() if line.startswith("[worker]")]
        raise AssertionError(f"torchrun {script} {' '.join(args)} ran past {timeout:.0f} s; "
                             f"last progress: {progress[-1] if progress else 'none'}\n"
                             f"{err[-4000:]}") from None
    except BaseException:  # interrupted: take the ranks down with us
        _kill_tree(proc)
        raise
    proc = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed (rc={proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def _kill_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Stop torchrun and its ranks. The ranks run in sessions of their own (torchrun starts
    them so), so neither killing the launcher nor its process group reaches them, and a rank
    left behind holds our pipes open and slows every later test: find them by parent pid."""
    ranks = _children(proc.pid)
    proc.terminate()  # torchrun forwards SIGTERM to its ranks
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *ranks]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        frontier += kids
    return found


def run_layouts(tmp_path: Path, nproc: int, families: dict, layouts: list, checks: list) -> list:
    spec = tmp_path / f"spec{nproc}.json"
    out = tmp_path / f"out{nproc}.json"
    spec.write_text(json.dumps({"families": {k: str(v) for k, v in families.items()},
                                "layouts": layouts, "checks": checks}))
    torchrun(ROOT / "tests/distributed/layouts_worker.py", nproc, str(out), str(spec))
    return json.loads(out.read_text())
