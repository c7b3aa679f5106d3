"""Dense Qwen3 (q/k RMSNorm per head) and Llama (optional attention bias)."""

from __future__ import annotations

from moe_rl.models.family import Family


class Qwen3(Family):
    name = "qwen3"
    model_types = ("qwen3",)

    def qk_layernorm(self, hf):
        return True


class Llama(Family):
    name = "llama"
    model_types = ("llama",)

    def transformer_config(self, hf, dims, **kw):
        rp = getattr(hf, "rope_parameters", None) or {}
        if rp.get("rope_type", "default") not in ("default", None):
            raise ValueError(f"llama rope_type {rp.get('rope_type')!r} is not supported yet "
                             "(only the default RoPE); see README")
        return super().transformer_config(hf, dims, **kw)
