"""What a run shows while it runs: metrics (JSONL + tensorboard, wandb on request), stage
timers, GPU stats and progress bars."""

from moe_rl.observability.config import MetricsConfig
from moe_rl.observability.names import REQUIRED_STEP_METRICS, VOLATILE_PREFIXES, is_volatile
from moe_rl.observability.timers import StageTimer
from moe_rl.observability.writer import MetricWriter

__all__ = ["MetricWriter", "MetricsConfig", "REQUIRED_STEP_METRICS", "StageTimer", "VOLATILE_PREFIXES",
           "is_volatile"]
