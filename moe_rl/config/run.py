"""The root config of a run: one typed section per component."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_rl.algorithms.config import AlgorithmConfig
from moe_rl.models.config import ModelConfig
from moe_rl.parallel.dims import ParallelConfig
from moe_rl.train.config import OptimConfig, TrainConfig


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the policy model
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # parallel layout of the trainer
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and LR schedule
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig.unset)  # preset + axis overrides
    train: TrainConfig = field(default_factory=TrainConfig)  # step counts, batch shapes, added loss terms
    output_dir: str = "runs/quickstart"  # where the run writes its files
