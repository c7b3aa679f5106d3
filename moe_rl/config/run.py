"""The root config of a run: one typed section per component."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_rl.algorithms.config import AlgorithmConfig
from moe_rl.models.config import ModelConfig
from moe_rl.parallel.dims import ParallelConfig
from moe_rl.train.config import OptimConfig


@dataclass
class StepsConfig:
    steps: int = 4
    """Optimizer steps to run."""
    global_batch: int = 8
    """Sequences per optimizer step (over all data-parallel ranks)."""
    micro_batch: int = 2
    """Sequences per micro-batch on one rank."""
    seq_len: int = 64
    """Tokens per sequence (padded)."""
    seed: int = 1234
    """Seed of data sampling and model-parallel RNG."""

    def __post_init__(self):
        for k in ("steps", "global_batch", "micro_batch", "seq_len"):
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k} must be >= 1, got {getattr(self, k)}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout of the trainer."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig.unset)
    """Policy-optimisation algorithm (a preset plus any axis overrides)."""
    train: StepsConfig = field(default_factory=StepsConfig)
    """Step counts and batch shapes."""
    output_dir: str = "runs/quickstart"
    """Where the run writes its files."""
