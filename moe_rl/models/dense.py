"""Dense Qwen3 (q/k RMSNorm per head) and Llama (optional attention bias)."""

from __future__ import annotations

from moe_rl.models.family import Family


class Qwen3(Family):
    name = "qwen3"
    model_types = ("qwen3",)

    def qk_layernorm(self, hf):
        return True


class Llama(Family):
    """Llama 2/3 dense. Besides plain RoPE and YaRN, Llama 3.1-3.3 RoPE scaling ("llama3") maps onto Megatron's
    ``rope_scaling``, whose low/high frequency factors (1, 4) and original context (8192) are
    fixed in code (``RotaryEmbedding._apply_scaling``): a checkpoint with other values is
    refused rather than run with the wrong frequencies."""

    name = "llama"
    model_types = ("llama",)
    # what Megatron's RotaryEmbedding._apply_scaling hard-codes
    MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}

    def rope_scaling(self, hf) -> float | None:
        """The llama3 RoPE scaling factor, None for any other RoPE; ValueError for llama3
        parameters Megatron does not compute."""
        if self.rope_kind(hf) != "llama3":
            return None
        rp = hf.rope_parameters
        for key, want in self.MEGATRON_LLAMA3_ROPE.items():
            if float(rp.get(key, float("nan"))) != want:
                raise ValueError(f"llama3 rope scaling with {key}={rp.get(key)!r} is not supported: "
                                 f"Megatron-Core fixes it at {want:g} "
                                 f"(rope_parameters: {dict(rp)})")
        return float(rp["factor"])

    def check_rope(self, hf) -> None:
        """Plain RoPE, YaRN (:meth:`Family.check_rope`) or llama3 scaling."""
        if self.rope_kind(hf) == "llama3":
            self.rope_scaling(hf)
        else:
            super().check_rope(hf)

    def gpt_kwargs(self, hf) -> dict:
        kw = super().gpt_kwargs(hf)
        factor = self.rope_scaling(hf)
        if factor is not None:
            kw.update(rope_scaling=True, rope_scaling_factor=factor)
        return kw
