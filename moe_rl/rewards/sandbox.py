"""Run untrusted Python in a separate, limited process (the code reward's executor).

Layers, outermost first:

- a new process group (``start_new_session``); it is SIGKILLed as a whole on the wall
  timeout and again after every run, so nothing the code started outlives the call;
- when ``unshare`` works here: new network and PID namespaces (``unshare -n -p -f
  --kill-child``, plus ``-r`` for a non-root user). No interface but a down loopback
  exists, and when the namespace's init exits the kernel kills every process inside,
  which also catches children that left the process group with ``setsid``;
- ``resource`` limits inside the child: RLIMIT_CPU (SIGXCPU, then SIGKILL a second
  later), RLIMIT_AS, RLIMIT_FSIZE (stdout/stderr go to files, so output is bounded too),
  RLIMIT_NPROC, no core files;
- an audit hook (``sys.addaudithook``, cannot be removed) that raises PermissionError on
  socket connect/bind/send/DNS and, unless ``allow_subprocess``, on fork/exec/spawn/kill
  and ctypes loading;
- a fresh temporary working directory, deleted afterwards; a minimal environment.

Limits, stated plainly: this is not a security boundary against a determined attacker.
Without ``unshare`` the network block is only the audit hook, which native code (a C
extension) can bypass. RLIMIT_NPROC is not enforced for root (the kernel exempts it); then
a fork bomb with ``allow_subprocess=True`` is stopped by the CPU limit per process and the
wall timeout (and the PID namespace kill), not at fork time. The filesystem is not
hidden: the code runs as the caller's user. Use containers for hostile workloads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import List

from .config import SandboxConfig
from .sandbox_child import EXIT_MEMORY, EXIT_NETWORK, EXIT_PROCESS_LIMIT, EXIT_SUBPROCESS

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
STATUSES = ("ok", "error", "timeout", "cpu_time", "memory", "network", "subprocess",
            "process_limit", "output_limit", "killed")


@dataclasses.dataclass
class SandboxResult:
    """What one sandboxed run did."""

    status: str  # one of STATUSES: ok, or why the run failed / was stopped
    returncode: int  # the child's exit code as seen by the parent (negative: signal)
    stdout: str  # first max_output_bytes of standard output
    stderr: str  # first max_output_bytes of standard error
    wall_s: float  # seconds from start until the process group was gone
    isolation: str  # "netns+pidns" when unshare was used, else "audit-hook"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@functools.lru_cache(maxsize=None)
def _unshare_prefix() -> tuple:
    """The ``unshare`` command line when it works on this machine, else ()."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    prefix = [exe, "--net", "--pid", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        prefix.insert(1, "--map-root-user")
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return tuple(prefix) if ok else ()


def _classify(rc: int, timed_out: bool) -> str:
    if timed_out:
        return "timeout"
    if rc == 0:
        return "ok"
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    if sig == signal.SIGXCPU:
        return "cpu_time"
    if sig == signal.SIGXFSZ:
        return "output_limit"
    if sig == signal.SIGKILL:
        return "killed"  # RLIMIT_CPU's hard limit, or the OOM killer
    return {EXIT_MEMORY: "memory", EXIT_NETWORK: "network", EXIT_SUBPROCESS: "subprocess",
            EXIT_PROCESS_LIMIT: "process_limit"}.get(rc, "error")


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, *, stdin: str = "", limits: SandboxConfig | None = None) -> SandboxResult:
    """Run ``code`` as a Python script under ``limits``, feeding it ``stdin``."""
    limits = limits or SandboxConfig()
    prefix: List[str] = list(_unshare_prefix()) if limits.isolate_network else []
    python = limits.python or sys.executable
    child_limits = json.dumps({k: getattr(limits, k) for k in
                               ("cpu_time_s", "memory_mb", "max_output_bytes", "max_processes", "allow_subprocess")})
    workdir = tempfile.mkdtemp(prefix="moe_rl_sandbox_")
    try:
        user_file = os.path.join(workdir, "solution.py")
        with open(user_file, "w") as f:
            f.write(code)
        paths = {name: os.path.join(workdir, f".{name}") for name in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "w") as f:
            f.write(stdin)
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        t0 = time.monotonic()
        with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, open(paths["stderr"], "wb") as ferr:
            proc = subprocess.Popen([*prefix, python, "-I", _CHILD, child_limits, user_file], cwd=workdir,
                                    stdin=fin, stdout=fout, stderr=ferr, env=env, start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=limits.wall_timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                rc = proc.wait()
            _kill_group(proc.pid)  # background children of a finished run
        wall = time.monotonic() - t0
        return SandboxResult(status=_classify(rc, timed_out), returncode=rc,
                             stdout=_read(paths["stdout"], limits.max_output_bytes),
                             stderr=_read(paths["stderr"], limits.max_output_bytes),
                             wall_s=wall, isolation="netns+pidns" if prefix else "audit-hook")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
