"""A pool of reward worker processes in which a task past its deadline is killed, not waited for.

``concurrent.futures.ProcessPoolExecutor`` cannot stop one task: a reward stuck in C code that
holds the GIL (sympy expanding ``9^{9^{9^{9}}}``) or in ``while True: pass`` keeps its worker
forever. Here each worker runs one task at a time; the parent sends it, waits on every busy
worker's pipe at once until the earliest deadline, and a worker still busy at its task's
deadline is killed with everything it started (SIGSTOP, then SIGKILL of its descendants'
process groups and of itself: a code reward's sandbox runs in a session of its own) and
replaced. Its task fails with ``TimeoutError``; the other tasks in flight are neither lost nor
failed. A worker that dies on its own (a segfault, ``os._exit`` in a reward) fails its task
with ``TaskFailed`` and is replaced too.

Workers are fresh interpreters started like multiprocessing's "spawn" (fork+exec of
``sys.executable``, never a bare fork of the trainer and its torch threads), without spawn's
re-import of the parent's ``__main__`` module (which would import the trainer in every
worker). They get the parent's ``sys.path`` through PYTHONPATH, import the given modules,
then say "ready"; a task's deadline starts when it is sent to a ready worker, so start-up
time is never charged to a reward. Inside a worker the task runs on the main thread, so
``signal.alarm``-based timeouts (math-verify's) work there too.

Limits: ``target`` and the task arguments cross by pickle; functions defined in the parent's
``__main__`` cannot be resolved in a worker. Idle workers exit when the parent dies (their pipe
closes), but one busy with a runaway task when the parent is SIGKILLed runs on until killed.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import subprocess
import sys
import time
import weakref
from collections import deque
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any, Callable, Deque, Iterator, List, Optional, Sequence, Tuple

START_TIMEOUT_S = 300.0  # a worker not ready by then is reported as broken (imports hang or crash)


class TaskFailed(Exception):
    """A task raised in its worker (``kind`` is the exception's class name there) or its worker died."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass
class _Worker:
    proc: subprocess.Popen
    conn: Connection
    ready: bool = False
    task: Optional[int] = None  # index of the task it is running
    deadline: float = 0.0  # monotonic time its task must be done by
    started: float = 0.0  # monotonic time the process started


def _children(pid: int) -> List[int]:
    """Direct children of ``pid``, started by any of its threads (from /proc; empty without it)."""
    try:
        out = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        return out
    except (OSError, ValueError):
        pass
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants, with the process groups they lead.

    Everything is stopped first (SIGSTOP), so nothing forks or reparents while the tree is read."""
    stopped, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            continue
        stopped.append(p)
        frontier.extend(_children(p))
    own_group = os.getpgrp()
    for p in stopped:
        try:
            if os.getpgid(p) == p and p != own_group:
                os.killpg(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _shutdown(workers: List[_Worker]) -> None:
    for w in workers:
        if w.proc.poll() is None:
            kill_tree(w.proc.pid)
        w.proc.wait()
        w.conn.close()
    workers.clear()


class WorkerPool:
    """``num_workers`` processes that call ``target`` ("module:function") on tasks, one each.

    Parallel semantics: one pool per process that uses it; ``run`` is not re-entrant."""

    def __init__(self, target: str, num_workers: int, *, preload: Sequence[str] = ()):
        if num_workers < 1:
            raise ValueError(f"num_workers ({num_workers}) must be >= 1")
        self.target, self.num_workers, self.preload = target, num_workers, tuple(preload)
        self._workers: List[_Worker] = []
        self._timeout_s = 0.0  # of the run in progress, for its error messages
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def _start_worker(self) -> _Worker:
        parent, child = Pipe(duplex=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p or os.getcwd() for p in sys.path])
        cmd = [sys.executable, "-c", "from moe_rl.rewards.worker_pool import worker_main; worker_main()",
               str(child.fileno()), self.target, *self.preload]
        try:
            proc = subprocess.Popen(cmd, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            child.close()
        w = _Worker(proc=proc, conn=parent, started=time.monotonic())
        self._workers.append(w)
        return w

    def _discard(self, w: _Worker) -> None:
        kill_tree(w.proc.pid)
        w.proc.wait()
        w.conn.close()
        self._workers.remove(w)

    def start(self) -> None:
        """Start the missing workers now (``run`` does it too), so they warm up in the background."""
        while len(self._workers) < self.num_workers:
            self._start_worker()

    def run(self, tasks: Sequence[Tuple[Any, ...]], *, timeout_s: float,
            skip: Optional[Callable[[int], bool]] = None) -> Iterator[Tuple[int, Any]]:
        """Yield ``(index, result)`` for every task as it finishes, ``result`` being ``target(*task)``
        or the exception that ended it (``TimeoutError`` after ``timeout_s`` seconds, the worker
        killed; ``TaskFailed``). Tasks are sent in index order; one for which ``skip(index)`` is
        true when its turn comes is dropped, never sent nor yielded (the evaluator stops sending
        work once a failure decides the batch). Closing the iterator early kills the workers still
        busy; idle ones are kept, and the next ``run`` replaces what was killed."""
        pending: Deque[int] = deque(range(len(tasks)))
        self._timeout_s = timeout_s
        try:
            while pending or any(w.task is not None for w in self._workers):
                self.start()
                for w in list(self._workers):
                    if w.ready and w.task is None and w.proc.poll() is not None:
                        self._discard(w)  # died while idle (the OOM killer): replace it, fail nothing
                    elif w.ready and w.task is None and pending:
                        while skip is not None and pending and skip(pending[0]):
                            pending.popleft()
                        if not pending:
                            continue
                        i = pending.popleft()
                        try:
                            w.conn.send((i, tasks[i]))
                        except (pickle.PicklingError, TypeError, AttributeError) as e:
                            yield i, TaskFailed(type(e).__name__, f"task arguments cannot be sent to a worker: {e}")
                            continue
                        except OSError:  # the worker died while idle; replace it and retry the task
                            pending.appendleft(i)
                            self._discard(w)
                            break
                        w.task, w.deadline = i, time.monotonic() + timeout_s
                self.start()  # replace what was discarded above before waiting
                yield from self._collect()
        finally:
            for w in [w for w in self._workers if w.task is not None]:
                self._discard(w)

    def _collect(self) -> Iterator[Tuple[int, Any]]:
        """Wait for the first answer, death, start-up or deadline; yield what finished."""
        now = time.monotonic()
        busy = [w for w in self._workers if w.task is not None]
        starting = [w for w in self._workers if not w.ready]
        wake = [w.deadline for w in busy] + [w.started + START_TIMEOUT_S for w in starting]
        if not wake:
            return
        ready = set(wait([w.conn for w in busy + starting], timeout=max(0.0, min(wake) - now)))
        now = time.monotonic()
        for w in list(self._workers):
            if w.conn in ready:
                try:
                    msg = w.conn.recv()
                except (EOFError, OSError):
                    msg = None
                if msg is None:  # the process died
                    rc = w.proc.wait()
                    task = w.task
                    self._discard(w)
                    if task is None:
                        raise RuntimeError(f"reward worker (pid {w.proc.pid}) exited with code {rc} before it was "
                                           f"ready; its output above says why (target {self.target!r}, "
                                           f"preload {list(self.preload)})")
                    yield task, TaskFailed("WorkerDied", f"reward worker (pid {w.proc.pid}) exited with code {rc} "
                                                         f"while scoring")
                elif msg == "ready":
                    w.ready = True
                else:
                    i, ok, value = msg
                    assert i == w.task, f"worker answered task {i}, was given {w.task}"
                    w.task = None
                    yield i, value if ok else TaskFailed(*value)
            elif w.task is not None and now >= w.deadline:
                task = w.task
                self._discard(w)
                yield task, TimeoutError(f"no result within {self._timeout_s}s; the worker was killed")
            elif not w.ready and now >= w.started + START_TIMEOUT_S:
                self._discard(w)
                raise RuntimeError(f"reward worker (pid {w.proc.pid}) was not ready within {START_TIMEOUT_S:.0f}s")

    def close(self) -> None:
        """Kill every worker (and what it started); a later ``run`` starts new ones."""
        _shutdown(self._workers)


def worker_main() -> None:
    """A worker's loop: import, say ready, then ``(i, args) -> (i, ok, result)`` until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    conn = Connection(int(sys.argv[1]))
    target, preload = sys.argv[2], sys.argv[3:]
    import importlib

    for name in preload:
        importlib.import_module(name)
    module_name, _, attr = target.partition(":")
    fn = getattr(importlib.import_module(module_name), attr)
    conn.send("ready")
    while True:
        try:
            i, args = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        try:
            answer: Tuple[int, bool, Any] = (i, True, fn(*args))
        except (Exception, SystemExit) as e:  # noqa: BLE001 - reported to the parent, per task
            answer = (i, False, (type(e).__name__, str(e)))
        try:
            conn.send(answer)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            conn.send((i, False, (type(e).__name__, f"the result cannot be sent back: {e}")))


if __name__ == "__main__":
    worker_main()
