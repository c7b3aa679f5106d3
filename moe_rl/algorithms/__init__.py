"""Policy-optimization math (docs/algorithms.md): pure torch, no torch.distributed, no Megatron.

Axes as composable pieces, named algorithms as presets over them:
``config.AlgorithmConfig`` (the axes), ``presets`` (named points, data only), ``advantages``,
``policy_loss``, ``ratio`` (the one log-ratio clamp), ``kl``, ``aggregation``, ``mismatch``,
``sampling``, ``metrics`` and ``actor_loss`` (one micro-batch's loss under a config).
"""

from moe_rl.algorithms.actor_loss import actor_loss
from moe_rl.algorithms.advantages import compute_advantages
from moe_rl.algorithms.aggregation import aggregate
from moe_rl.algorithms.config import AlgorithmConfig, preset_config
from moe_rl.algorithms.metrics import Metrics
from moe_rl.algorithms.presets import PRESETS

__all__ = [
    "AlgorithmConfig", "Metrics", "PRESETS", "actor_loss", "aggregate", "compute_advantages", "preset_config",
]
