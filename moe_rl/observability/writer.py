"""The metric writer: ``<output_dir>/metrics.jsonl`` and tensorboard event files under
``<output_dir>/tb``, plus wandb when asked for and installed.

One record per optimizer step, ``{"step": <optimizer step>, "<namespace>/<name>": value, ...}``;
held-out evaluations (``moe_rl.evaluation``) go to ``<output_dir>/eval.jsonl``, one record each,
and to the same tensorboard and wandb run on the same step axis.
Only the process constructed with ``enabled=True`` (rank 0) writes; elsewhere every method is
a no-op, so callers need no rank checks.

Resume: a run resumed at optimizer step ``k`` first drops every record with ``step >= k``
from the JSONL (those steps run again) by rewriting the file atomically, and opens the
tensorboard writer with ``purge_step=k`` so the event files show each step once. A line torn
by a crash in the middle of a write is dropped too. Every record is flushed and fsynced as
it is written: after a kill the file holds every step that finished.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, List, Mapping, Optional

from moe_rl.checkpoint.atomic import replace_file
from moe_rl.observability.config import MetricsConfig


class MetricWriter:
    def __init__(self, output_dir: str, cfg: MetricsConfig, *, enabled: bool = True, start_step: int = 0,
                 run_config: Optional[Mapping[str, Any]] = None) -> None:
        self.cfg = cfg
        self.enabled = enabled
        self.jsonl_path = os.path.join(output_dir, "metrics.jsonl")
        self.eval_path = os.path.join(output_dir, "eval.jsonl")
        self.tb_dir = os.path.join(output_dir, "tb")
        self._file = None
        self._eval_file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if cfg.jsonl:
            keep_records_before(self.jsonl_path, start_step)
            keep_records_before(self.eval_path, start_step)
            self._file = open(self.jsonl_path, "a")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self.tb_dir, purge_step=start_step)
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                print("[metrics] metrics.wandb=true but the wandb package is not installed; "
                      "writing JSONL and tensorboard only", file=sys.stderr)
            else:
                self._wandb = wandb.init(project=cfg.wandb_project, dir=output_dir, resume="allow",
                                         config=dict(run_config or {}))

    def write(self, record: Mapping[str, Any]) -> None:
        """Write one optimizer step's metrics; ``record["step"]`` is the step (an int)."""
        if not self.enabled:
            return
        if self._file is not None:
            _append(self._file, record)
        self._scalars(record)

    def write_eval(self, record: Mapping[str, Any]) -> None:
        """Write one evaluation's metrics to ``eval.jsonl`` (opened at the first one) and the
        scalar sinks; ``record["step"]`` is the optimizer steps done when it ran."""
        if not self.enabled:
            return
        if self.cfg.jsonl:
            if self._eval_file is None:
                self._eval_file = open(self.eval_path, "a")
            _append(self._eval_file, record)
        self._scalars(record, skip=("policy_version",))  # a scalar would join the training records' curve

    def _scalars(self, record: Mapping[str, Any], skip: tuple = ()) -> None:
        step = int(record["step"])
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, global_step=step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        for name in ("_file", "_eval_file"):
            if getattr(self, name) is not None:
                getattr(self, name).close()
                setattr(self, name, None)
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _append(f, record: Mapping[str, Any]) -> None:
    """One JSON line, flushed and fsynced: after a kill the file holds every record written."""
    f.write(json.dumps(dict(record)) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """Every complete record of a metrics.jsonl (a torn last line is skipped)."""
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # torn by a crash mid-write
            out.append(json.loads(line))
    return out


def keep_records_before(path: str, step: int) -> None:
    """Rewrite ``path`` atomically with only the complete records whose ``step`` < ``step``."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_metrics(path) if int(r["step"]) < step]
    replace_file(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in keep).encode()))


def non_finite(record: Mapping[str, Any]) -> Dict[str, float]:
    """The numeric entries of ``record`` that are not finite (for checks and tests)."""
    return {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
