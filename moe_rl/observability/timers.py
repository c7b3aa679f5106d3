"""Named stage timers: ``with timer("rollout"): ...`` adds the wall time to ``timing/rollout_s``.

One :class:`StageTimer` per loop pass (``reset()`` between passes). A stage entered twice in
a pass (DAPO's extra generation rounds) accumulates. On GPUs the timer synchronises the
device at both ends so that asynchronous kernels are charged to the stage that queued them.
"""

from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterator

import torch


class StageTimer:
    def __init__(self) -> None:
        self.seconds: Dict[str, float] = {}
        self._t0 = time.perf_counter()

    def reset(self) -> None:
        self.seconds = {}
        self._t0 = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        _sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        """Seconds since the last reset."""
        return time.perf_counter() - self._t0

    def metrics(self) -> Dict[str, float]:
        """``timing/<stage>_s`` for every stage and ``timing/step_s`` (the whole pass so far)."""
        out = {f"timing/{k}_s": v for k, v in self.seconds.items()}
        out["timing/step_s"] = self.elapsed()
        return out


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
