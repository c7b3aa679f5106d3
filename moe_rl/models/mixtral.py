"""Mixtral: GQA attention without q/k norm, softmax top-2 routing over 8 experts.

HF's router takes the softmax over all experts, keeps the top-k and renormalises, which is
Megatron's top-k-then-softmax. Expert weights are w1 (gate), w3 (up), w2 (down).
``router_jitter_noise`` (training-time noise in HF) is not reproduced.
"""

from __future__ import annotations

from moe_rl.models.family import Family
from moe_rl.models.param_map import Entry


class Mixtral(Family):
    name = "mixtral"
    model_types = ("mixtral",)

    def moe_layers(self, hf):
        return [True] * hf.num_hidden_layers

    def num_experts(self, hf):
        return hf.num_local_experts

    def moe_ffn_hidden_size(self, hf):
        return hf.intermediate_size

    def check_routing(self, hf):
        self.refuse_renormalised_top1(self.name, hf)  # Mixtral always renormalises

    def moe_kwargs(self, hf):
        return dict(moe_router_topk=hf.num_experts_per_tok, moe_router_pre_softmax=False,
                    moe_router_score_function="softmax")

    def mlp_entries(self, hf, l):
        p, m = f"model.layers.{l}.block_sparse_moe.", f"decoder.layers.{l}."
        return ([Entry(m + "mlp.router.weight", (p + "gate.weight",))]
                + self.expert_entries(m, p + "experts.", hf.num_local_experts, ("w1", "w3", "w2")))
