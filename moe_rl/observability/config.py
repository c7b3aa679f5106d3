"""``MetricsConfig``: where and how a run reports its metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MetricsConfig:
    """Metric sinks and progress display (rank 0 writes; the other ranks only compute)."""

    jsonl: bool = True  # <output_dir>/metrics.jsonl, one JSON object per optimizer step
    tensorboard: bool = True  # event files under <output_dir>/tb (torch.utils.tensorboard.SummaryWriter)
    wandb: bool = False  # also log to Weights & Biases (only if the wandb package is installed)
    wandb_project: str = "moe_rl"  # W&B project name when wandb is on
    progress: bool = True  # tqdm bars over rollout samples and training steps on rank 0
    gpu_stats: bool = True  # gpu/* memory and utilisation through nvidia-ml-py (absent without a GPU)
