"""Qwen3-MoE: GQA attention with per-head q/k RMSNorm, softmax top-k routing.

``norm_topk_prob=True`` (Qwen3-30B-A3B, 235B-A22B): softmax over all experts, top-k,
renormalise = Megatron's default top-k-then-softmax. ``False``: Megatron's pre-softmax.
Dense layers (``mlp_only_layers``, ``decoder_sparse_step``) become ``moe_layer_freq``.
"""

from __future__ import annotations

from moe_rl.models.family import Family


class Qwen3Moe(Family):
    name = "qwen3_moe"
    model_types = ("qwen3_moe",)

    def moe_layers(self, hf):
        step = getattr(hf, "decoder_sparse_step", 1) or 1
        dense = set(getattr(hf, "mlp_only_layers", []) or [])
        return [(l not in dense) and hf.num_experts > 0 and (l + 1) % step == 0
                for l in range(hf.num_hidden_layers)]

    def num_experts(self, hf):
        return hf.num_experts

    def moe_ffn_hidden_size(self, hf):
        return hf.moe_intermediate_size

    def qk_layernorm(self, hf):
        return True

    def check_routing(self, hf):
        if hf.norm_topk_prob:
            self.refuse_renormalised_top1(self.name, hf)

    def moe_kwargs(self, hf):
        return dict(moe_router_topk=hf.num_experts_per_tok,
                    moe_router_pre_softmax=not hf.norm_topk_prob,
                    moe_router_score_function="softmax")

    def mlp_entries(self, hf, l):
        if not self.moe_layers(hf)[l]:
            return super().mlp_entries(hf, l)
        p, m = f"model.layers.{l}.", f"decoder.layers.{l}."
        from moe_rl.models.param_map import Entry

        return ([Entry(m + "mlp.router.weight", (p + "mlp.gate.weight",))]
                + self.expert_entries(m, p + "mlp.experts.", hf.num_experts))
