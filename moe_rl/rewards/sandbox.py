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
  socket connect/bind/send/DNS, on the ways into the harness's memory (``sandbox_child.py``;
  ctypes fails to import, as an ImportError) and, unless ``allow_subprocess``, on
  fork/exec/spawn/kill;
- a fresh temporary working directory, deleted afterwards; a minimal environment;
- a proof of completion: a random token, sent through a pipe the child drains before any user
  code runs, comes back on another pipe only when the harness saw the program, and the tests
  when given (``test_code``), run to their end (``sandbox_child.py`` says how and what it
  cannot stop). With tests, exit status 0 without the token is status "incomplete", never "ok":
  ``sys.exit(0)``, ``os._exit(0)`` or a crash before the tests finished cannot pass. Without
  tests (stdin/stdout) the exit status decides, as for any program: printing the right output
  is the task there, and a crash, a nonzero exit or a limit still fails.

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
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional

from .config import SandboxConfig
from .sandbox_child import EXIT_MEMORY, EXIT_NETWORK, EXIT_PROCESS_LIMIT, EXIT_REJECTED, EXIT_SUBPROCESS

_CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
STATUSES = ("ok", "error", "timeout", "cpu_time", "memory", "network", "subprocess",
            "process_limit", "output_limit", "killed", "rejected", "incomplete")
_PROOF_READ_LIMIT = 1 << 16  # bytes of the proof pipe read back (the token is 65)


@dataclasses.dataclass
class SandboxResult:
    """What one sandboxed run did."""

    status: str  # one of STATUSES: ok, or why the run failed / was stopped
    returncode: int  # the child's exit code as seen by the parent (negative: signal)
    stdout: str  # first max_output_bytes of standard output
    stderr: str  # first max_output_bytes of standard error
    wall_s: float  # seconds from start until the process group was gone
    isolation: str  # "netns+pidns" when unshare was used, else "audit-hook"
    completed: bool = False  # the harness proved the program (and the tests, if any) ran to the end

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
            EXIT_PROCESS_LIMIT: "process_limit", EXIT_REJECTED: "rejected"}.get(rc, "error")


def _read(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _feed(fd: int, data: bytes) -> None:
    """Write ``data`` into the pipe and close it (a thread: it may exceed the pipe's buffer)."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:  # the child died before reading everything; its status says why
        pass
    finally:
        os.close(fd)


def _drain(fd: int) -> bytes:
    """What is buffered in the pipe now, without waiting for writers that may never close it."""
    os.set_blocking(fd, False)
    chunks, n = [], 0
    while n < _PROOF_READ_LIMIT:
        try:
            b = os.read(fd, _PROOF_READ_LIMIT - n)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
        n += len(b)
    return b"".join(chunks)


def run_python(code: str, *, stdin: str = "", test_code: Optional[str] = None, guard_values: bool = True,
               limits: SandboxConfig | None = None) -> SandboxResult:
    """Run ``code`` as a Python script under ``limits``, feeding it ``stdin``; then, when
    ``test_code`` is given, run it in the program's globals (``guard_values``: reject values
    whose comparisons the program defined, see ``sandbox_child.py``). With ``test_code``,
    status "ok" needs the harness's proof that the tests ran to their end."""
    limits = limits or SandboxConfig()
    prefix: List[str] = list(_unshare_prefix()) if limits.isolate_network else []
    python = limits.python or sys.executable
    child_limits = json.dumps({k: getattr(limits, k) for k in
                               ("cpu_time_s", "memory_mb", "max_output_bytes", "max_processes", "allow_subprocess")})
    token = secrets.token_hex(32)
    message = json.dumps({"token": token, "test_code": test_code, "guard_values": guard_values}).encode()
    workdir = tempfile.mkdtemp(prefix="moe_rl_sandbox_")
    channel_w = proof_r = -1
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
            channel_r, channel_w = os.pipe()
            proof_r, proof_w = os.pipe()
            try:
                cmd = [*prefix, python, "-I", _CHILD, child_limits, user_file, str(channel_r), str(proof_w)]
                proc = subprocess.Popen(cmd, cwd=workdir, stdin=fin, stdout=fout, stderr=ferr, env=env,
                                        start_new_session=True, pass_fds=(channel_r, proof_w))
            finally:
                os.close(channel_r)
                os.close(proof_w)
            feeder = threading.Thread(target=_feed, args=(channel_w, message), name="sandbox-feed", daemon=True)
            channel_w = -1  # owned by the feeder now
            feeder.start()
            timed_out = False
            try:
                rc = proc.wait(timeout=limits.wall_timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                rc = proc.wait()
            _kill_group(proc.pid)  # background children of a finished run
            feeder.join(timeout=5.0)  # the readers are dead, so a blocked write has failed by now
        wall = time.monotonic() - t0
        completed = (token + "\n").encode() in _drain(proof_r)
        status = _classify(rc, timed_out)
        if status == "ok" and test_code is not None and not completed:
            status = "incomplete"  # exit 0, but the tests did not run to their end
        return SandboxResult(status=status, returncode=rc,
                             stdout=_read(paths["stdout"], limits.max_output_bytes),
                             stderr=_read(paths["stderr"], limits.max_output_bytes),
                             wall_s=wall, isolation="netns+pidns" if prefix else "audit-hook", completed=completed)
    finally:
        for fd in (channel_w, proof_r):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
