"""Model families: HF config -> Megatron TransformerConfig + layer spec, and the HF <->
Megatron parameter map shared by conversion and weight sync."""

from __future__ import annotations

from moe_rl.models.deepseek_v3 import DeepseekV3
from moe_rl.models.dense import Llama, Qwen3
from moe_rl.models.family import Family
from moe_rl.models.mixtral import Mixtral
from moe_rl.models.qwen3_moe import Qwen3Moe

FAMILIES: dict[str, Family] = {f.name: f for f in (Qwen3Moe(), Mixtral(), DeepseekV3(), Qwen3(), Llama())}
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


def family_for(hf_config) -> Family:
    """The family of an HF config, by its ``model_type``."""
    mt = getattr(hf_config, "model_type", None)
    if mt not in _BY_MODEL_TYPE:
        raise ValueError(f"model_type {mt!r} is not supported; supported: {sorted(_BY_MODEL_TYPE)}")
    return _BY_MODEL_TYPE[mt]


__all__ = ["FAMILIES", "Family", "family_for"]
