"""Score a batch of responses with every configured reward, concurrently, with a progress bar.

One task per (response, reward) pair runs on a thread pool (default: reward functions
mostly wait on math-verify's sympy or on sandbox subprocesses), a process pool (each
worker resolves the ``module:function`` strings itself, so nothing unpicklable crosses
over; math-verify keeps its signal-based timeouts there) or serially in the caller.
``async def`` reward functions are run to completion inside their worker.

A reward that raises, returns a non-finite value or runs past ``timeout_s`` either
raises (``on_error=raise``) or scores 0.0 and is listed in ``RewardBatch.errors``
(``on_error=zero``). A timed-out thread cannot be stopped; it finishes in the background.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import inspect
import math
import multiprocessing
from typing import Any, Dict, List, Optional, Sequence

from .config import RewardConfig, SandboxConfig
from .registry import resolve_reward
from .types import RewardBatch, RewardInput


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
        for spec in config.rewards:
            resolve_reward(spec.fn)  # a bad 'module:function' fails here, before any rollout
        self._pool: Optional[cf.Executor] = None

    def _executor(self) -> Optional[cf.Executor]:
        if self.config.executor == "serial":
            return None
        if self._pool is None:
            if self.config.executor == "thread":
                self._pool = cf.ThreadPoolExecutor(self.config.num_workers, thread_name_prefix="reward")
            else:
                # forkserver: a fork of a process holding torch/NCCL threads is unsafe.
                ctx = multiprocessing.get_context("forkserver")
                self._pool = cf.ProcessPoolExecutor(self.config.num_workers, mp_context=ctx)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
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

        def record(i: int, name: str, fn: str, result: Any) -> None:
            if isinstance(result, BaseException):
                if cfg.on_error == "raise":
                    raise RewardError(f"reward {name!r} ({fn}) failed on sample {i}: "
                                      f"{type(result).__name__}: {result}") from result
                values[i][name] = 0.0
                errors[i][name] = f"{type(result).__name__}: {result}"
            else:
                values[i][name] = result
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
