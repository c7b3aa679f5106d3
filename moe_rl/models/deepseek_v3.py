"""DeepSeek-V3: multi-latent attention, shared experts, biased sigmoid group-limited routing.

* MLA with or without the query LoRA (``q_lora_rank``); the q_a/kv_a RMSNorms are Megatron's
  ``q_layernorm``/``kv_layernorm``. HF's interleaved RoPE equals Megatron's MLA RoPE (which
  de-interleaves), so no weight permutation is needed.
* Routing: sigmoid scores, ``e_score_correction_bias`` (Megatron's ``router.expert_bias``
  buffer) only for choosing experts, group-limited top-k (``n_group``/``topk_group``; a
  group's score is the sum of its top ``topk // topk_group`` scores, equal to HF's fixed
  top-2 when ``topk / topk_group == 2`` — validated below), top-k renormalised, then x
  ``routed_scaling_factor``.
* The first ``first_k_dense_replace`` layers are dense. MTP layers are not built (their
  tensors are skipped on load and conversion, as ``transformers`` skips them).
"""

from __future__ import annotations

from moe_rl.models.family import Family
from moe_rl.models.param_map import Entry


class DeepseekV3(Family):
    name = "deepseek_v3"
    model_types = ("deepseek_v3",)

    def moe_layers(self, hf):
        k = hf.first_k_dense_replace
        return [l >= k and hf.n_routed_experts > 0 for l in range(hf.num_hidden_layers)]

    def num_experts(self, hf):
        return hf.n_routed_experts

    def moe_ffn_hidden_size(self, hf):
        return hf.moe_intermediate_size

    def config_class(self):
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig

    def head_dim(self, hf):
        return hf.qk_nope_head_dim + hf.qk_rope_head_dim

    def shape(self, hf):
        s = super().shape(hf)
        # MLA has no key/value head groups to split: every head has its own up-projection.
        return type(s)(**{**s.__dict__, "num_query_groups": hf.num_attention_heads})

    def check_rope(self, hf):
        kind = (getattr(hf, "rope_parameters", None) or {}).get("rope_type") or "default"
        if kind not in ("default", "yarn"):
            raise ValueError(f"deepseek_v3 rope_type {kind!r} is not supported (default or yarn)")
        if not getattr(hf, "rope_interleave", True):
            raise ValueError("deepseek_v3: rope_interleave=false is not supported: Megatron's MLA always "
                             "de-interleaves the rotary dimensions, as HF does with rope_interleave=true")

    def check_routing(self, hf):
        self.refuse_renormalised_top1(self.name, hf)

    def attention_kwargs(self, hf):
        rp = dict(getattr(hf, "rope_parameters", None) or {})
        rope_type = rp.get("rope_type", "default")
        kw = dict(
            q_lora_rank=hf.q_lora_rank,
            kv_lora_rank=hf.kv_lora_rank,
            qk_head_dim=hf.qk_nope_head_dim,
            qk_pos_emb_head_dim=hf.qk_rope_head_dim,
            v_head_dim=hf.v_head_dim,
            rotary_base=self.rope_theta(hf),
            qk_layernorm=True,
        )
        if rope_type == "yarn":
            kw.update(rope_type="yarn",
                      rotary_scaling_factor=rp["factor"],
                      original_max_position_embeddings=rp["original_max_position_embeddings"],
                      beta_fast=rp.get("beta_fast", 32), beta_slow=rp.get("beta_slow", 1),
                      mscale=rp.get("mscale", 1.0), mscale_all_dim=rp.get("mscale_all_dim", 0.0))
        elif rope_type in ("default", None):
            kw.update(rope_type="rope")
        else:
            raise ValueError(f"deepseek_v3 rope_type {rope_type!r} is not supported (default or yarn)")
        return kw

    def qk_layernorm(self, hf):
        return True

    def moe_kwargs(self, hf):
        topk, groups, gtopk = hf.num_experts_per_tok, hf.n_group, hf.topk_group
        if groups > 1 and topk // gtopk != 2:
            raise ValueError(
                f"deepseek_v3: HF scores a group by its top-2 experts; Megatron by its top "
                f"num_experts_per_tok/topk_group = {topk}/{gtopk}. They agree only when that is 2")
        if not hf.norm_topk_prob:
            raise ValueError("deepseek_v3 with norm_topk_prob=false is not supported "
                             "(Megatron renormalises sigmoid top-k scores)")
        return dict(
            moe_router_topk=topk,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            moe_router_bias_update_rate=0.0,
            moe_router_num_groups=groups if groups > 1 else None,
            moe_router_group_topk=gtopk if groups > 1 else None,
            moe_router_topk_scaling_factor=hf.routed_scaling_factor,
            moe_router_pre_softmax=False,
            moe_shared_expert_intermediate_size=(hf.n_shared_experts or 0) * hf.moe_intermediate_size or None,
            moe_shared_expert_overlap=False,
        )

    def gpt_kwargs(self, hf):
        # MLA applies its own RoPE (plain or YaRN, from attention_kwargs); GPTModel builds none.
        return {**super().gpt_kwargs(hf), "position_embedding_type": "rope"}

    def attention_out_bias(self, hf) -> bool:
        return False  # MLA biases are not mapped: a checkpoint with them is refused by name on load

    def attention_entries(self, hf, l):
        p, m = f"model.layers.{l}.", f"decoder.layers.{l}."
        a, s = p + "self_attn.", m + "self_attention."
        out = [
            Entry(m + "input_layernorm.weight", (p + "input_layernorm.weight",)),
            Entry(m + "pre_mlp_layernorm.weight", (p + "post_attention_layernorm.weight",)),
            Entry(s + "linear_kv_down_proj.weight", (a + "kv_a_proj_with_mqa.weight",)),
            Entry(s + "kv_layernorm.weight", (a + "kv_a_layernorm.weight",)),
            Entry(s + "linear_kv_up_proj.weight", (a + "kv_b_proj.weight",)),
            Entry(s + "linear_proj.weight", (a + "o_proj.weight",)),
        ]
        if hf.q_lora_rank:
            out += [Entry(s + "linear_q_down_proj.weight", (a + "q_a_proj.weight",)),
                    Entry(s + "q_layernorm.weight", (a + "q_a_layernorm.weight",)),
                    Entry(s + "linear_q_up_proj.weight", (a + "q_b_proj.weight",))]
        else:
            out.append(Entry(s + "linear_q_proj.weight", (a + "q_proj.weight",)))
        return out

    def mlp_entries(self, hf, l):
        if not self.moe_layers(hf)[l]:
            return super().mlp_entries(hf, l)
        p, m = f"model.layers.{l}.mlp.", f"decoder.layers.{l}."
        out = [Entry(m + "mlp.router.weight", (p + "gate.weight",)),
               Entry(m + "mlp.router.expert_bias", (p + "gate.e_score_correction_bias",), fp32=True)]
        out += self.expert_entries(m, p + "experts.", hf.n_routed_experts)
        if hf.n_shared_experts:
            out += [Entry(m + "mlp.shared_experts.linear_fc1.weight",
                          (p + "shared_experts.gate_proj.weight", p + "shared_experts.up_proj.weight"), "glu"),
                    Entry(m + "mlp.shared_experts.linear_fc2.weight", (p + "shared_experts.down_proj.weight",))]
        return out
