"""Score a batch of responses with every configured reward, concurrently, with a progress bar.

One task per (response, reward) pair runs on one of three executors:

- ``process`` (default): our own pool of worker processes (``worker_pool.py``). Each worker
  resolves the ``module:function`` strings itself, so nothing unpicklable crosses over, and
  runs the reward on its main thread, where math-verify's signal-based timeouts work. A task
  still running ``timeout_s`` after it was sent has its worker killed (with the sandboxes it
  started) and replaced; the other tasks in flight carry on. This is the only executor that
  bounds a reward's time: a reward stuck in C code holding the GIL (sympy on
  ``9^{9^{9^{9}}}``) or in ``while True: pass`` is stopped.
- ``thread``: daemon threads in this process, one per task, at most ``num_workers`` counted
  as running; math-verify runs with its timeouts off (they need the main thread). A task past
  ``timeout_s`` is reported and its thread abandoned: it cannot be stopped, so it runs on in
  the background (one that holds the GIL slows the trainer), no longer counted against
  ``num_workers``. Being a daemon thread, it never keeps the process from exiting (a
  ``ThreadPoolExecutor`` thread would: the interpreter joins those at exit).
- ``serial``: in the caller, one after another; nothing is bounded.

``async def`` reward functions are run to completion inside their worker. A reward that raises,
returns a non-finite value or runs past ``timeout_s`` either raises (``on_error=raise``) or
scores 0.0 and is listed in ``RewardBatch.errors`` (``on_error=zero``).

``on_error=raise`` fails fast: once a task has failed, no task after it (in input order) is
started, and ``RewardError`` is raised as soon as every task before it is done, naming the
first failing (sample, reward) in input order whatever finished first. Those earlier tasks
were started before it, so the wait is at most one ``timeout_s``; process workers still busy
are then killed (the pool replaces them on the next call), threads are abandoned.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import queue
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

from .config import RewardConfig, SandboxConfig
from .registry import resolve_reward
from .types import RewardBatch, RewardInput
from .worker_pool import TaskFailed, WorkerPool

_SCORE_ONE = "moe_rl.rewards.evaluator:score_one"


class RewardError(RuntimeError):
    """A reward function failed on a sample (with ``on_error=raise``)."""


class CallTimeout(TimeoutError):
    """A ``run_in_daemon_threads`` call ran past its time (unlike a ``TimeoutError`` it raised)."""


def _takes_sandbox(fn: Any) -> bool:
    try:
        return "sandbox" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def score_one(fn_spec: str, kwargs: Dict[str, Any], sample: RewardInput,
              sandbox: Optional[SandboxConfig] = None) -> float:
    """Run one reward function on one sample (in whichever worker) and check its value."""
    fn = resolve_reward(fn_spec)
    if sandbox is not None and "sandbox" not in kwargs and _takes_sandbox(fn):
        kwargs = dict(kwargs, sandbox=sandbox)
    out = fn(sample, **kwargs)
    if inspect.isawaitable(out):
        out = asyncio.run(_await(out))
    value = float(out)
    if not math.isfinite(value):
        raise ValueError(f"reward {fn_spec!r} returned {value}")
    return value


async def _await(aw: Any) -> Any:
    return await aw


def run_in_daemon_threads(calls: Sequence[Callable[[], Any]], num_workers: int, timeout_s: float, *,
                          skip: Optional[Callable[[int], bool]] = None) -> Iterator[Tuple[int, Any]]:
    """Yield ``(index, result)`` for every call as it finishes, ``result`` being ``calls[index]()``
    or the exception that ended it; at most ``num_workers`` run at once, each in a daemon thread.

    A call still running ``timeout_s`` after it started yields ``TimeoutError`` and its thread is
    abandoned (it frees its slot; what it returns later is dropped). Calls start in index order;
    one for which ``skip(index)`` is true when its turn comes is dropped, never started nor yielded.
    Daemon threads are not joined at interpreter exit, so a call that never returns cannot keep
    the process alive."""
    finished: "queue.SimpleQueue[Tuple[int, Any]]" = queue.SimpleQueue()  # per run: no stale results
    pending: Deque[int] = deque(range(len(calls)))
    running: Dict[int, float] = {}  # index -> monotonic deadline

    def body(k: int) -> None:
        try:
            res: Any = calls[k]()
        except (Exception, SystemExit) as e:  # noqa: BLE001 - reported to the caller, per call
            res = e
        finished.put((k, res))

    while pending or running:
        while pending and len(running) < num_workers:
            k = pending.popleft()
            if skip is not None and skip(k):
                continue
            running[k] = time.monotonic() + timeout_s
            threading.Thread(target=body, args=(k,), name=f"reward-{k}", daemon=True).start()
        if not running:
            break
        try:
            k, res = finished.get(timeout=max(0.0, min(running.values()) - time.monotonic()))
        except queue.Empty:
            now = time.monotonic()
            for k in [k for k, deadline in running.items() if deadline <= now]:
                del running[k]
                yield k, CallTimeout(f"no result within {timeout_s}s; its thread runs on in the background")
            continue
        if running.pop(k, None) is not None:  # else already reported as timed out
            yield k, res


def _run_serial(calls: Sequence[Callable[[], Any]], *,
                skip: Optional[Callable[[int], bool]] = None) -> Iterator[Tuple[int, Any]]:
    """``run_in_daemon_threads`` in the caller: one call after another, nothing bounded."""
    for k, call in enumerate(calls):
        if skip is not None and skip(k):
            continue
        try:
            res: Any = call()
        except Exception as e:  # noqa: BLE001 - reported per on_error
            res = e
        yield k, res


class RewardEvaluator:
    """Evaluates ``config.rewards`` on batches; resolves every function up front."""

    def __init__(self, config: RewardConfig):
        self.config = config
        # A bad 'module:function' fails here, before any rollout; process workers import these modules.
        modules = {getattr(resolve_reward(spec.fn), "__module__", None) for spec in config.rewards}
        self._modules = sorted(m for m in modules if m)
        self._pool: Optional[WorkerPool] = None

    def _worker_pool(self) -> WorkerPool:
        if self._pool is None:
            self._pool = WorkerPool(_SCORE_ONE, self.config.num_workers, preload=self._modules)
        return self._pool

    def start(self) -> None:
        """Start the process workers now, so they import while the rollout runs (``evaluate`` would)."""
        if self.config.executor == "process":
            self._worker_pool().start()

    def close(self) -> None:
        """Kill the process workers; threads of the ``thread`` executor need nothing (daemons)."""
        if self._pool is not None:
            self._pool.close()
        self._pool = None

    def __enter__(self) -> "RewardEvaluator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def evaluate(self, samples: Sequence[RewardInput], *, desc: str = "rewards") -> RewardBatch:
        """Every named reward of every sample, in input order (see the module doc for failures)."""
        cfg = self.config
        values: List[Dict[str, float]] = [{} for _ in samples]
        errors: List[Dict[str, str]] = [{} for _ in samples]
        tasks = [(i, spec) for i in range(len(samples)) for spec in cfg.rewards]
        fail_fast = cfg.on_error == "raise"
        first_failed: Optional[int] = None  # lowest failed task index so far (fail_fast only)

        def skip(k: int) -> bool:
            return first_failed is not None and k > first_failed

        if cfg.executor == "process":
            args = [(spec.fn, dict(spec.kwargs), samples[i], cfg.sandbox) for i, spec in tasks]
            results = self._worker_pool().run(args, timeout_s=cfg.timeout_s, skip=skip if fail_fast else None)
            stopped = "its worker was killed"
        else:
            calls = [_bind(spec.fn, dict(spec.kwargs), samples[i], cfg.sandbox) for i, spec in tasks]
            if cfg.executor == "thread":
                results = run_in_daemon_threads(calls, cfg.num_workers, cfg.timeout_s,
                                                skip=skip if fail_fast else None)
                stopped = "its thread runs on in the background (only rewards.executor=process stops it)"
            else:
                results = _run_serial(calls, skip=skip if fail_fast else None)
                stopped = ""
        done: Dict[int, Any] = {}
        prefix = 0  # tasks 0 .. prefix-1 are all done
        bar = _progress(len(tasks), desc, cfg.progress)
        try:
            for k, res in results:  # in completion order
                if isinstance(res, CallTimeout) or (cfg.executor == "process" and isinstance(res, TimeoutError)):
                    res = TimeoutError(f"no result within rewards.timeout_s={cfg.timeout_s}s; {stopped}")
                done[k] = res
                bar.update(1)
                if fail_fast and isinstance(res, BaseException) and (first_failed is None or k < first_failed):
                    first_failed = k
                while prefix in done:
                    prefix += 1
                if first_failed is not None and prefix >= first_failed:
                    break  # the first failure in input order is known: stop now
        finally:
            results.close()  # kills the process workers still busy with this batch
            bar.close()
        # recorded in input order, so on_error=raise names the first failing task whatever finished first
        for k, (i, spec) in enumerate(tasks):
            res = done[k]
            if isinstance(res, BaseException):
                kind = res.kind if isinstance(res, TaskFailed) else type(res).__name__
                if fail_fast:
                    raise RewardError(f"reward {spec.name!r} ({spec.fn}) failed on sample {i}: {kind}: {res}") from res
                values[i][spec.name] = 0.0
                errors[i][spec.name] = f"{kind}: {res}"
            else:
                values[i][spec.name] = res
        return RewardBatch(values=values, weights=cfg.weights, errors=errors)


def _bind(fn: str, kwargs: Dict[str, Any], sample: RewardInput, sandbox: SandboxConfig) -> Callable[[], Any]:
    """``score_one`` of these arguments, to call later in whichever thread."""
    return lambda: score_one(fn, kwargs, sample, sandbox)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def evaluate_rewards(samples: Sequence[RewardInput], config: RewardConfig) -> RewardBatch:
    """One-shot convenience: build an evaluator, score ``samples``, shut the pool down."""
    with RewardEvaluator(config) as ev:
        return ev.evaluate(samples)
