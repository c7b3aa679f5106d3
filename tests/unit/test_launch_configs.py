"""The GPU example configs under launch/configs/ checked without a GPU: each loads, its
parallel degrees divide its world and its model (``ParallelDims``, the check ``moe_rl.launch``
runs before anything else), its SGLang servers fit an 8-GPU node without overlapping, and a
per-GPU memory estimate (printed) fits the GPU its comments name.

The models are the published architectures (the values of each model's config.json); their
parameters are counted by transformers itself, on the meta device (no memory, no weights).
The memory estimate is the static part only: bf16 weights (2 bytes), fp32 gradients (4) and
Adam's fp32 master copy + two moments (12, sharded over the data-parallel ranks by the
distributed optimizer); activations must fit in what is left (at least 20% of the GPU here).
Colocated, SGLang's share (mem_fraction_static) sits next to it during rollouts.
"""

from __future__ import annotations

import os

import pytest

from moe_rl.config import load_config
from moe_rl.config.run import RunConfig
from moe_rl.models import family_for
from moe_rl.parallel import ParallelDims
from moe_rl.rollout.sglang_backend import launch_commands, server_gpus

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "launch", "configs")
GPUS_PER_NODE = 8
GB = 1e9


def _qwen3_30b_a3b():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False)


def _mixtral_8x7b():
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2)


def _deepseek_v3():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                            num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
                            n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8, first_k_dense_replace=3,
                            q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                            v_head_dim=128)


# file -> model, training ranks (train nodes x 8), GPU memory (GB), colocated, nodes per server,
# and the published total parameter count (billions) the meta-device count must reproduce
EXAMPLES = {
    "qwen3_30b_a3b_1node.yaml": dict(hf=_qwen3_30b_a3b, world=8, gpu_gb=141, colocated=True, server_nodes=1,
                                     billions=30.5),
    "qwen3_30b_a3b_4node.yaml": dict(hf=_qwen3_30b_a3b, world=24, gpu_gb=80, colocated=False, server_nodes=1,
                                     billions=30.5),
    "mixtral_8x7b.yaml": dict(hf=_mixtral_8x7b, world=32, gpu_gb=80, colocated=False, server_nodes=1,
                              billions=46.7),
    "deepseek_v3.yaml": dict(hf=_deepseek_v3, world=256, gpu_gb=141, colocated=False, server_nodes=2,
                             billions=671.0),
}


def _param_counts(hf) -> tuple[int, int]:
    """(all parameters, routed-expert parameters) of the HF model, built on the meta device."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf)
    total = routed = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".mlp.experts." in name:  # routed experts (shared experts are dense: not expert-parallel)
            routed += p.numel()
    return total, routed


def test_every_example_config_is_listed():
    files = {f for f in os.listdir(CONFIGS) if f.endswith(".yaml")} - {"quickstart.yaml"}
    assert files == set(EXAMPLES), "add the new config to EXAMPLES (with its hardware) or remove it"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_fits_its_hardware(name, capsys):
    ex = EXAMPLES[name]
    cfg = load_config(RunConfig, os.path.join(CONFIGS, name))
    hf = ex["hf"]()
    dims = ParallelDims.build(cfg.parallel, ex["world"], family_for(hf).shape(hf))  # degrees divide
    assert cfg.train.global_batch % dims.dp == 0, (cfg.train.global_batch, dims.dp)
    assert cfg.loop.rollout_batch_size % cfg.rollout.n_samples_per_prompt == 0
    assert cfg.model.params_dtype == "bfloat16"

    total, routed = _param_counts(hf)
    assert total / 1e9 == pytest.approx(ex["billions"], rel=0.01)  # the architecture is the published one
    dense = total - routed
    dense_per_gpu = dense / (dims.tp * dims.pp)
    experts_per_gpu = routed / (dims.ep * dims.etp * dims.pp)
    opt = 12 if cfg.optim.use_distributed_optimizer else 12 * dims.dp
    train_gb = (dense_per_gpu * (6 + opt / dims.dp) + experts_per_gpu * (6 + 12 / dims.edp)) / GB

    s = cfg.rollout.sglang
    assert cfg.rollout.backend == "sglang" and s.nnodes == ex["server_nodes"]
    specs = launch_commands(dataclass_with_model(s))
    used = [g for i in range(s.num_servers) for g in server_gpus(s, i)]
    assert len(used) == len(set(used)) and max(used) < GPUS_PER_NODE, f"servers overlap or overflow a node: {used}"
    sglang_weights_gb = total * 2 / s.tp_size / GB  # bf16, split over the server's tp ranks (all its nodes)
    sglang_budget_gb = s.mem_fraction_static * ex["gpu_gb"]

    with capsys.disabled():
        print(f"\n[{name}] {total / 1e9:.1f}B params ({routed / 1e9:.1f}B routed experts); training "
              f"{dims.describe()}: ~{train_gb:.0f} GB static per GPU"
              f"{f' + SGLang {sglang_budget_gb:.0f} GB colocated' if ex['colocated'] else ''} of {ex['gpu_gb']} GB; "
              f"SGLang {s.num_servers} server(s) x tp {s.tp_size} per {s.nnodes} node(s): weights "
              f"{sglang_weights_gb:.0f} GB per GPU of its {sglang_budget_gb:.0f} GB; {len(specs)} launch line(s)")
    # training (a colocated SGLang has released its memory): activations need >= 20% of the GPU
    assert train_gb <= 0.8 * ex["gpu_gb"], f"{train_gb:.0f} GB leaves < 20% of {ex['gpu_gb']} GB for activations"
    if ex["colocated"]:  # rollouts: the trainer's static memory stays, SGLang takes its fraction
        assert train_gb + sglang_budget_gb <= 0.95 * ex["gpu_gb"], (train_gb, sglang_budget_gb)
    assert sglang_weights_gb <= 0.8 * sglang_budget_gb, "the weights leave SGLang < 20% of its memory for KV cache"


def dataclass_with_model(s):
    import dataclasses

    return dataclasses.replace(s, model_path=s.model_path or "/models/example")
