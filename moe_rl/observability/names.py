"""The metric names every optimizer step logs, and the namespaces that measure the machine.

Names are a contract (tensorboard and JSONL alike); the loss, clip, KL and mismatch names
come from ``moe_rl.algorithms`` and are listed here so a test can check them all at once.
``timing/*``, ``perf/*`` and ``gpu/*`` describe how fast this machine ran the step, so they
differ between two otherwise identical runs; every other metric is a function of the seed.
"""

from __future__ import annotations

REQUIRED_STEP_METRICS: tuple[str, ...] = (
    "step",
    "actor/pg_loss", "actor/entropy", "actor/grad_norm", "actor/lr", "actor/ppo_kl",
    "actor/ratio_mean", "actor/ratio_min", "actor/ratio_max",
    "actor/clipfrac", "actor/clipfrac_low", "actor/clipfrac_high", "actor/dualclip_frac",
    "mismatch/k1", "mismatch/k3", "mismatch/is_weight_mean", "mismatch/is_weight_max",
    "mismatch/masked_frac", "mismatch/extreme_frac",
    "rollout/reward_mean", "rollout/response_len_mean", "rollout/response_len_max",
    "rollout/truncated_frac", "rollout/zero_std_group_frac", "rollout/tokens_per_s",
    "rollout/staleness_mean", "rollout/weight_version_min",
    "train/skipped_steps", "train/optimizer_step",
)

VOLATILE_PREFIXES: tuple[str, ...] = ("timing/", "perf/", "gpu/", "rollout/tokens_per_s", "weights/sync_s",
                                     "weights/probe_s")


def is_volatile(name: str) -> bool:
    """True for metrics that measure wall time or the device (not reproducible bit for bit)."""
    return name.startswith(VOLATILE_PREFIXES)
