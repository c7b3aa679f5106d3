"""The embedded engine: HF model class in-process, continuous batching, SGLang's HTTP protocol."""

from moe_rl.rollout.embedded.engine import EmbeddedEngine

__all__ = ["EmbeddedEngine"]
