"""Score a batch of responses with every configured reward, concurrently, with a progress bar.

One task per (response, reward) pair runs on one of three executors:

- ``process`` (default): our own pool of worker processes (``worker_pool.py``). Each worker
  resolves the ``module:function`` strings itself, so nothing unpicklable crosses over, and
  runs the reward on its main thread, where math-verify's signal-based timeouts work. A task
  still running ``timeout_s`` after it was sent has its worker killed (with the sandboxes it
  started) and replaced; the other tasks in flight carry on. This is the only executor that
  bounds a reward's time: a reward stuck in C code holding the GIL (sympy on
  ``9^{9^{9^{9}}}``) or in ``while True: pass`` is stopped.
- ``thread``: a thread pool in this process; math-verify runs with its timeouts off (they
  need the main thread). A task past ``timeout_s`` is reported, but its thread cannot be
  stopped: it runs on in the background, and one that holds the GIL freezes the trainer.
- ``serial``: in the caller, one after another; nothing is bounded.

``async def`` reward functions are run to completion inside their worker. A reward that raises,
returns a non-finite value or runs past ``timeout_s`` either raises (``on_error=raise``) or
scores 0.0 and is listed in ``RewardBatch.errors`` (``on_error=zero``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Union

from .config import RewardConfig, SandboxConfig
from .registry import resolve_reward
from .types import RewardBatch, RewardInput
from .worker_pool import TaskFailed, WorkerPool

_SCORE_ONE = "moe_rl.rewards.evaluator:score_one"


class RewardError(RuntimeError):
    """A reward function failed on a sample (with ``on_error=raise``)."""


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


class RewardEvaluator:
    """Evaluates ``config.rewards`` on batches; resolves every function up front."""

    def __init__(self, config: RewardConfig):
        self.config = config
        # A bad 'module:function' fails here, before any rollout; process workers import these modules.
        modules = {getattr(resolve_reward(spec.fn), "__module__", None) for spec in config.rewards}
        self._modules = sorted(m for m in modules if m)
        self._pool: Union[cf.ThreadPoolExecutor, WorkerPool, None] = None

    def _executor(self) -> Union[cf.ThreadPoolExecutor, WorkerPool, None]:
        if self.config.executor == "serial":
            return None
        if self._pool is None:
            if self.config.executor == "thread":
                self._pool = cf.ThreadPoolExecutor(self.config.num_workers, thread_name_prefix="reward")
            else:
                self._pool = WorkerPool(_SCORE_ONE, self.config.num_workers, preload=self._modules)
        return self._pool

    def start(self) -> None:
        """Start the process workers now, so they import while the rollout runs (``evaluate`` would)."""
        pool = self._executor()
        if isinstance(pool, WorkerPool):
            pool.start()

    def close(self) -> None:
        if isinstance(self._pool, WorkerPool):
            self._pool.close()
        elif self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def __enter__(self) -> "RewardEvaluator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def evaluate(self, samples: Sequence[RewardInput], *, desc: str = "rewards") -> RewardBatch:
        """Every named reward of every sample, in input order."""
        cfg = self.config
        values: List[Dict[str, float]] = [{} for _ in samples]
        errors: List[Dict[str, str]] = [{} for _ in samples]
        tasks = [(i, spec) for i in range(len(samples)) for spec in cfg.rewards]
        bar = _progress(len(tasks), desc, cfg.progress)

        def record(i: int, name: str, fn: str, result: Any, counted: bool = False) -> None:
            if isinstance(result, BaseException):
                kind = result.kind if isinstance(result, TaskFailed) else type(result).__name__
                if cfg.on_error == "raise":
                    raise RewardError(f"reward {name!r} ({fn}) failed on sample {i}: {kind}: {result}") from result
                values[i][name] = 0.0
                errors[i][name] = f"{kind}: {result}"
            else:
                values[i][name] = result
            if not counted:
                bar.update(1)

        try:
            pool = self._executor()
            if pool is None:
                for i, spec in tasks:
                    try:
                        res: Any = score_one(spec.fn, spec.kwargs, samples[i], cfg.sandbox)
                    except Exception as e:  # noqa: BLE001 - reported per on_error
                        res = e
                    record(i, spec.name, spec.fn, res)
            elif isinstance(pool, WorkerPool):
                args = [(spec.fn, dict(spec.kwargs), samples[i], cfg.sandbox) for i, spec in tasks]
                results = pool.run(args, timeout_s=cfg.timeout_s)
                done: Dict[int, Any] = {}
                try:
                    for k, res in results:  # in completion order
                        if isinstance(res, TimeoutError):
                            res = TimeoutError(f"no result within rewards.timeout_s={cfg.timeout_s}s; "
                                               f"its worker was killed")
                        done[k] = res
                        bar.update(1)
                finally:
                    results.close()  # on an interrupt, kills the workers still busy with this batch
                # recorded in input order, so on_error=raise names the first failing sample whatever
                # finished first
                for k, (i, spec) in enumerate(tasks):
                    record(i, spec.name, spec.fn, done[k], counted=True)
            else:
                futs = {pool.submit(score_one, spec.fn, dict(spec.kwargs), samples[i], cfg.sandbox): (i, spec)
                        for i, spec in tasks}
                for fut, (i, spec) in futs.items():
                    try:
                        res = fut.result(timeout=cfg.timeout_s)
                    except cf.TimeoutError:
                        fut.cancel()
                        res = TimeoutError(f"no result within rewards.timeout_s={cfg.timeout_s}s")
                    except Exception as e:  # noqa: BLE001
                        res = e
                    record(i, spec.name, spec.fn, res)
        finally:
            bar.close()
        return RewardBatch(values=values, weights=cfg.weights, errors=errors)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def evaluate_rewards(samples: Sequence[RewardInput], config: RewardConfig) -> RewardBatch:
    """One-shot convenience: build an evaluator, score ``samples``, shut the pool down."""
    with RewardEvaluator(config) as ev:
        return ev.evaluate(samples)
