"""What every model family provides, and the parts they share.

A family maps a HuggingFace config to a Megatron ``TransformerConfig`` (plus the GPTModel
arguments) and owns the HF <-> Megatron parameter map. Families are looked up by the HF
``model_type`` (an explicit table, not string-order-dependent dispatch).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from moe_rl.models.param_map import Entry, ParamMap
from moe_rl.parallel.dims import ModelShape, ParallelDims


class Family:
    name: str = ""
    model_types: tuple[str, ...] = ()

    # ------------------------------------------------------------------ per family
    def moe_layers(self, hf) -> list[bool]:
        """Which layers (global index) are MoE layers: the project's one definition, used by
        the trainer's layer specs, the engine's router capture and the routed-experts wire format."""
        return [False] * hf.num_hidden_layers

    def moe_layer_ids(self, hf) -> list[int]:
        """Global indices of the MoE layers (those :meth:`moe_layers` marks)."""
        return [l for l, is_moe in enumerate(self.moe_layers(hf)) if is_moe]

    def num_experts(self, hf) -> int:
        return 0

    def moe_ffn_hidden_size(self, hf) -> int:
        return 0

    def moe_kwargs(self, hf) -> dict[str, Any]:
        """TransformerConfig fields for the MoE layers (router, experts)."""
        return {}

    @staticmethod
    def refuse_renormalised_top1(name: str, hf) -> None:
        """Top-1 routing whose one weight HF renormalises to 1: Megatron takes top-1 only with
        its pre-softmax (or unnormalised sigmoid) score, the expert's probability, not 1."""
        if hf.num_experts_per_tok == 1:
            raise ValueError(f"{name}: num_experts_per_tok=1 with a renormalised top-k weight (HF gives the "
                             "one expert weight 1) is not supported: Megatron weights a top-1 expert by "
                             "its routing probability")

    def attention_kwargs(self, hf) -> dict[str, Any]:
        return dict(
            num_query_groups=hf.num_key_value_heads,
            kv_channels=self.head_dim(hf),
            add_qkv_bias=bool(getattr(hf, "attention_bias", False)),
        )

    def attention_out_bias(self, hf) -> bool:
        """Whether ``o_proj`` has a bias (Llama/Qwen3 ``attention_bias``). Megatron gives
        ``linear_proj`` a bias only with ``add_bias_linear``, which would add MLP biases too;
        the layer spec gives it one instead (``spec.decoder_block_spec(out_bias=...)``)."""
        return bool(getattr(hf, "attention_bias", False))

    def head_dim(self, hf) -> int:
        return getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads

    def qk_layernorm(self, hf) -> bool:
        return False

    def config_class(self):
        from megatron.core.transformer.transformer_config import TransformerConfig

        return TransformerConfig

    def layer_entries(self, hf, l: int) -> list[Entry]:
        """Parameter map entries of global layer ``l``."""
        return self.attention_entries(hf, l) + self.mlp_entries(hf, l)

    def mlp_entries(self, hf, l: int) -> list[Entry]:
        p, m = f"model.layers.{l}.", f"decoder.layers.{l}."
        return [
            Entry(m + "mlp.linear_fc1.weight", (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), "glu"),
            Entry(m + "mlp.linear_fc2.weight", (p + "mlp.down_proj.weight",)),
        ]

    @staticmethod
    def rope_kind(hf) -> str:
        """The checkpoint's ``rope_parameters.rope_type`` ("default" when unset)."""
        return (getattr(hf, "rope_parameters", None) or {}).get("rope_type") or "default"

    def check_rope(self, hf) -> None:
        """ValueError unless the checkpoint's RoPE is one this family maps: plain RoPE or YaRN
        (:meth:`yarn_attrs`) here."""
        kind = self.rope_kind(hf)
        if kind == "yarn":
            self.yarn_attrs(hf)
        elif kind != "default":
            raise ValueError(f"{self.name}: rope_parameters.rope_type {kind!r} is not supported (plain RoPE "
                             "or 'yarn'); Megatron would run plain RoPE and every position after the first "
                             "would differ from the checkpoint's model")

    def yarn_attrs(self, hf) -> dict[str, Any]:
        """The ``yarn_*`` attributes Megatron's GPTModel and attention read from the config for
        ``position_embedding_type="yarn"`` (they are not TransformerConfig fields, so
        :meth:`transformer_config` sets them on the instance), computed as ``transformers``
        does: an unset ``factor`` is ``max_position_embeddings / original_max_position_embeddings``,
        unset betas are 32 and 1, ``truncate`` rounds the correction range (Megatron's
        ``correction_range_round_to_int``), and the attention factor that scales cos and sin is
        ``attention_factor`` when given, else ``mscale``/``mscale_all_dim``'s ratio when both
        are non-zero, else ``0.1 ln(factor) + 1``. Megatron computes that last one from
        ``yarn_mscale=None``; an explicit ``attention_factor`` is passed as the ratio it equals
        (``mscale`` over ``mscale_all_dim=0``)."""
        import math

        rp = dict(getattr(hf, "rope_parameters", None) or {})
        where = f"{self.name}: yarn rope_parameters {rp}"
        orig = rp.get("original_max_position_embeddings")
        if not orig:
            raise ValueError(f"{where}: original_max_position_embeddings is required for YaRN")
        factor = rp.get("factor") or hf.max_position_embeddings / orig
        if getattr(hf, "partial_rotary_factor", None) not in (None, 1.0) or \
                rp.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where}: partial_rotary_factor is not supported with YaRN")
        mscale, mscale_all, attn = rp.get("mscale"), rp.get("mscale_all_dim"), rp.get("attention_factor")
        if attn is not None:
            if factor <= 1:
                if float(attn) != 1.0:
                    raise ValueError(f"{where}: attention_factor={attn} with factor={factor} <= 1 is not "
                                     "supported (Megatron's YaRN scale is 1 there)")
                mscale, mscale_all = None, None
            else:  # 0.1 * m * ln(factor) + 1 == attention_factor, over 0.1 * 0 * ln(factor) + 1
                mscale, mscale_all = (float(attn) - 1.0) / (0.1 * math.log(factor)), 0.0
        elif not (mscale and mscale_all):
            mscale, mscale_all = None, None
        return dict(
            yarn_rotary_scaling_factor=float(factor),
            yarn_original_max_position_embeddings=int(orig),
            yarn_beta_fast=float(rp.get("beta_fast") or 32),
            yarn_beta_slow=float(rp.get("beta_slow") or 1),
            yarn_mscale=None if mscale is None else float(mscale),
            yarn_mscale_all_dim=None if mscale_all is None else float(mscale_all),
            yarn_correction_range_round_to_int=bool(rp.get("truncate", True)),
        )

    def check_routing(self, hf) -> None:
        """ValueError for routing Megatron computes differently (see the MoE families)."""

    def check_supported(self, hf) -> None:
        """ValueError naming the config field when ``hf`` asks for something the Megatron model
        would silently compute differently (so conversion and training refuse it, rather than
        produce a model that disagrees with ``transformers`` on long inputs or every token)."""
        act = getattr(hf, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{self.name}: hidden_act {act!r} is not supported (only 'silu', the SwiGLU "
                             "every supported family uses)")
        if getattr(hf, "mlp_bias", False):
            raise ValueError(f"{self.name}: mlp_bias=true is not supported (MLP biases are not mapped)")
        window = getattr(hf, "sliding_window", None)
        types = getattr(hf, "layer_types", None)
        sliding = ("sliding_attention" in types) if types is not None else window is not None
        if sliding and window is not None and window < hf.max_position_embeddings:
            raise ValueError(f"{self.name}: sliding-window attention (sliding_window={window} < "
                             f"max_position_embeddings={hf.max_position_embeddings}"
                             + (", use_sliding_window=true" if getattr(hf, "use_sliding_window", False) else "")
                             + ") is not supported: Megatron would attend to the whole context")
        self.check_rope(hf)
        if any(self.moe_layers(hf)):
            self.check_routing(hf)

    # ------------------------------------------------------------------ shared
    def rope_theta(self, hf) -> float:
        rp = getattr(hf, "rope_parameters", None) or {}
        return float(rp.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))

    def shape(self, hf) -> ModelShape:
        return ModelShape(
            num_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            num_query_groups=getattr(hf, "num_key_value_heads", hf.num_attention_heads),
            num_experts=self.num_experts(hf),
            moe_ffn_hidden_size=self.moe_ffn_hidden_size(hf),
            ffn_hidden_size=hf.intermediate_size,
        )

    def padded_vocab_size(self, hf, dims: ParallelDims) -> int:
        v, tp = hf.vocab_size, dims.tp
        return -(-v // tp) * tp

    def transformer_config(self, hf, dims: ParallelDims, *, params_dtype=torch.float32,
                           moe_aux_loss_coeff: float = 0.0, on_cpu: bool | None = None, **overrides):
        """Megatron ``TransformerConfig`` equivalent to ``hf`` at layout ``dims``.

        ``moe_aux_loss_coeff`` is the trainer's choice (``TrainConfig.moe_aux_loss_coeff``),
        never the checkpoint's ``router_aux_loss_coef``: that is a pre-training value."""
        self.check_supported(hf)
        if on_cpu is None:
            on_cpu = not torch.cuda.is_available()
        moe = any(self.moe_layers(hf))
        kw: dict[str, Any] = dict(
            num_layers=hf.num_hidden_layers,
            hidden_size=hf.hidden_size,
            num_attention_heads=hf.num_attention_heads,
            ffn_hidden_size=hf.intermediate_size,
            normalization="RMSNorm",
            layernorm_epsilon=hf.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            qk_layernorm=self.qk_layernorm(hf),
            hidden_dropout=0.0,
            attention_dropout=0.0,
            attention_softmax_in_fp32=True,
            apply_query_key_layer_scaling=False,
            params_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            pipeline_dtype=params_dtype,
            tensor_model_parallel_size=dims.tp,
            pipeline_model_parallel_size=dims.pp,
            # Every split, even or not, reaches Megatron as its own per-stage layout.
            pipeline_model_parallel_layout=dims.megatron_layout(hf.num_hidden_layers) if dims.pp > 1 else None,
            virtual_pipeline_model_parallel_size=dims.vpp if dims.vpp > 1 else None,
            context_parallel_size=dims.cp,
            # TE's attention exchanges K/V in a ring (GPU); the local spec uses ours.
            cp_comm_type="p2p" if dims.cp > 1 else None,
            expert_model_parallel_size=dims.ep,
            expert_tensor_parallel_size=dims.etp,
            sequence_parallel=dims.sp,
            # Fused kernels are CUDA/Triton only; the unfused paths are Megatron's own.
            bias_dropout_fusion=not on_cpu,
            apply_rope_fusion=False,
            masked_softmax_fusion=not on_cpu,
            gradient_accumulation_fusion=False,
            persist_layer_norm=False,
            use_cpu_initialization=on_cpu,
            perform_initialization=True,
            init_method_std=getattr(hf, "initializer_range", 0.02),
            variable_seq_lengths=True,
            # Megatron checks the dispatcher against variable_seq_lengths even for dense models.
            moe_token_dispatcher_type="alltoall",
        )
        if dims.vpp > 1 and dims.pp == 2:
            # Interleaved schedule at PP=2: the next and the previous stage are the same rank,
            # and Megatron's batched p2p (data and, with variable_seq_lengths, the shape
            # exchange) pairs a send with the peer's receive by posting order, which swaps the
            # forward activation and the backward gradient (measured: step-0 loss 6.66 vs 6.48,
            # grad norm 5e5). Its unbatched path orders even/odd ranks for 2-rank groups;
            # shapes are then fixed per step (moe_rl.train.schedule enforces equal shapes).
            kw.update(batch_p2p_comm=False, variable_seq_lengths=False)
        kw.update(self.attention_kwargs(hf))
        if moe:
            kw.update(
                num_moe_experts=self.num_experts(hf),
                moe_ffn_hidden_size=self.moe_ffn_hidden_size(hf),
                moe_router_dtype="fp32",
                moe_grouped_gemm=False,
                moe_permute_fusion=False,
                moe_layer_freq=[1 if x else 0 for x in self.moe_layers(hf)],
            )
            kw.update(moe_router_load_balancing_type="aux_loss" if moe_aux_loss_coeff > 0 else "none",
                      moe_aux_loss_coeff=float(moe_aux_loss_coeff))
            kw.update(self.moe_kwargs(hf))
        kw.update(overrides)
        cfg = self.config_class()(**kw)
        if self.gpt_kwargs(hf)["position_embedding_type"] == "yarn":
            for k, v in self.yarn_attrs(hf).items():
                setattr(cfg, k, v)
        return cfg

    def gpt_kwargs(self, hf) -> dict[str, Any]:
        """Arguments of ``GPTModel`` beyond config and spec (ValueError for a RoPE it cannot run)."""
        self.check_rope(hf)
        return dict(
            max_sequence_length=hf.max_position_embeddings,
            share_embeddings_and_output_weights=bool(getattr(hf, "tie_word_embeddings", False)),
            position_embedding_type="yarn" if self.rope_kind(hf) == "yarn" else "rope",
            rotary_percent=1.0,
            rotary_base=self.rope_theta(hf),
        )

    def param_map(self, hf) -> ParamMap:
        entries = [Entry("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab=True),
                   Entry("decoder.final_layernorm.weight", ("model.norm.weight",))]
        tied = bool(getattr(hf, "tie_word_embeddings", False))
        entries.append(Entry("output_layer.weight",
                             ("model.embed_tokens.weight",) if tied else ("lm_head.weight",), vocab=True))
        for l in range(hf.num_hidden_layers):
            entries += self.layer_entries(hf, l)
        return ParamMap(entries, hf.vocab_size)

    def attention_entries(self, hf, l: int) -> list[Entry]:
        p, m = f"model.layers.{l}.", f"decoder.layers.{l}."
        a = p + "self_attn."
        qkv = (hf.num_attention_heads, hf.num_key_value_heads, self.head_dim(hf))
        out = [
            Entry(m + "input_layernorm.weight", (p + "input_layernorm.weight",)),
            Entry(m + "pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",)),
            Entry(m + "self_attention.linear_qkv.weight",
                  (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"), "qkv", qkv),
            Entry(m + "self_attention.linear_proj.weight", (a + "o_proj.weight",)),
        ]
        if getattr(hf, "attention_bias", False):
            out.append(Entry(m + "self_attention.linear_qkv.bias",
                             (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"), "qkv", qkv))
        if self.attention_out_bias(hf):
            out.append(Entry(m + "self_attention.linear_proj.bias", (a + "o_proj.bias",)))
        if self.qk_layernorm(hf):
            out += [Entry(m + "self_attention.q_layernorm.weight", (a + "q_norm.weight",)),
                    Entry(m + "self_attention.k_layernorm.weight", (a + "k_norm.weight",))]
        return out

    def expert_entries(self, m: str, experts_prefix: str, n: int, names=("gate_proj", "up_proj", "down_proj")) -> list[Entry]:
        g, u, d = names
        out = []
        for e in range(n):
            x = f"{experts_prefix}{e}."
            out += [Entry(f"{m}mlp.experts.local_experts.{e}.linear_fc1.weight",
                          (x + f"{g}.weight", x + f"{u}.weight"), "glu"),
                    Entry(f"{m}mlp.experts.local_experts.{e}.linear_fc2.weight", (x + f"{d}.weight",))]
        return out
