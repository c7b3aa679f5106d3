"""Verifiable rewards: math (math-verify), format, countdown, code in a sandbox, user callables."""

from .config import RewardConfig, RewardSpec, SandboxConfig
from .evaluator import RewardEvaluator, evaluate_rewards
from .registry import BUILTIN, resolve_reward
from .types import RewardBatch, RewardInput

__all__ = ["BUILTIN", "RewardBatch", "RewardConfig", "RewardEvaluator", "RewardInput", "RewardSpec",
           "SandboxConfig", "evaluate_rewards", "resolve_reward"]
