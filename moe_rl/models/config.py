"""Typed configuration of the policy model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DTYPES = ("float32", "bfloat16")


@dataclass
class ModelConfig:
    hf_dir: Optional[str] = None  # HF checkpoint directory (config.json + safetensors); None = tiny random
    tiny_family: str = "qwen3_moe"  # family of the tiny random checkpoint built when hf_dir is None
    params_dtype: str = "float32"  # parameter dtype of the Megatron model: float32 | bfloat16

    def __post_init__(self):
        from moe_rl.models.tiny import TINY_FAMILIES

        if self.params_dtype not in DTYPES:
            raise ValueError(f"model.params_dtype {self.params_dtype!r} not in {DTYPES}")
        if self.hf_dir is None and self.tiny_family not in TINY_FAMILIES:
            raise ValueError(f"model.tiny_family {self.tiny_family!r} not in {TINY_FAMILIES}")
