"""Parallel degrees (pure), who this process is in the job (pure, from torchrun's or Slurm's
environment), process groups (the one place that touches Megatron's ``parallel_state``)
and the CPU platform layer."""

from moe_rl.parallel.dims import ModelShape, ParallelConfig, ParallelDims

__all__ = ["ModelShape", "ParallelConfig", "ParallelDims"]
