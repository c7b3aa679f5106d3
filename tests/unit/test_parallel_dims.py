"""ParallelDims: every invalid combination gets a clear error naming the numbers."""

import itertools

import pytest

from moe_rl.parallel import ModelShape, ParallelConfig, ParallelDims
from moe_rl.parallel.dims import balanced_split

MOE = ModelShape(num_layers=4, num_attention_heads=4, num_query_groups=2, num_experts=6,
                 moe_ffn_hidden_size=64, ffn_hidden_size=128)
DENSE = ModelShape(num_layers=4, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128)


def P(**kw):
    names = dict(tp="tensor_parallel", pp="pipeline_parallel", ep="expert_parallel",
                 etp="expert_tensor_parallel", sp="sequence_parallel", vpp="virtual_pipeline",
                 split="pipeline_layout", emb="pipeline_embedding_layers", out="pipeline_output_layers",
                 cp="context_parallel")
    return ParallelConfig(**{names[k]: v for k, v in kw.items()})


@pytest.mark.parametrize("cfg,world,model,dp,edp,sp", [
    (P(), 1, MOE, 1, 1, False),
    (P(tp=2), 2, MOE, 1, 1, True),
    (P(ep=2), 2, MOE, 2, 1, False),
    (P(ep=3), 6, MOE, 6, 2, False),
    (P(tp=2, ep=2), 4, MOE, 2, 1, True),
    (P(tp=2, ep=2, etp=1), 4, MOE, 2, 2, True),
    (P(pp=2, ep=2), 4, MOE, 2, 1, False),
    (P(etp=2), 2, MOE, 2, 1, False),
    (P(tp=2, pp=2), 8, DENSE, 2, 2, True),
])
def test_valid_layouts(cfg, world, model, dp, edp, sp):
    d = ParallelDims.build(cfg, world, model)
    assert (d.dp, d.edp, d.sp) == (dp, edp, sp)
    assert d.tp * d.pp * d.dp == world
    assert d.etp * d.ep * d.edp * d.pp == world


@pytest.mark.parametrize("cfg,world,model,msg", [
    (P(ep=4), 4, MOE, "expert_parallel (4) must divide num_experts (6)"),
    (P(tp=3), 3, MOE, "tensor_parallel (3) must divide num_attention_heads (4)"),
    (P(tp=4), 4, MOE, "tensor_parallel (4) must divide the number of key/value heads (2)"),
    (P(pp=5), 5, MOE, "pipeline_parallel (5) x virtual_pipeline (1) = 5 stages need at least 5 layers (one per stage); the model has 4"),
    (P(pp=2, vpp=3), 2, MOE, "pipeline_parallel (2) x virtual_pipeline (3) = 6 stages need at least 6 layers"),
    (P(vpp=2), 1, MOE, "virtual_pipeline (2) > 1 needs pipeline_parallel > 1"),
    (P(pp=2, split="1,2"), 2, MOE, "pipeline_layout '1,2' places 3 layers; the model has 4"),
    (P(pp=2, split="1,1,2"), 2, MOE, "pipeline_layout '1,1,2' has 3 stages; pipeline_parallel (2) x virtual_pipeline (1) needs 2"),
    (P(pp=2, vpp=2, split="2,2"), 2, MOE, "has 2 stages; pipeline_parallel (2) x virtual_pipeline (2) needs 4"),
    (P(pp=2, split="0,4"), 2, MOE, "stage 0 has no layer"),
    (P(pp=2, split="E|ttttL"), 2, MOE, "stage 0 has no layer"),
    (P(pp=2, split="tt|ttL"), 2, MOE, "the first stage must start with the embedding 'E'"),
    (P(pp=2, split="Ett|tt"), 2, MOE, "the last stage must end with the loss 'L'"),
    (P(pp=2, split="Ettx|ttL"), 2, MOE, "unknown characters ['x']"),
    (P(split="4"), 1, MOE, "pipeline_layout ('4') set with pipeline_parallel (1)"),
    (P(tp=2), 3, MOE, "world_size (3) must be divisible by tensor_parallel (2) x pipeline_parallel (1) = 2"),
    (P(ep=2, pp=2), 2, MOE, "world_size (2) must be divisible by expert_tensor_parallel (1) x expert_parallel (2) x pipeline_parallel (2) = 4"),
    (P(tp=2, sp=False), 2, MOE, "MoE with tensor_parallel (2) needs sequence_parallel=true"),
    (P(ep=2), 2, DENSE, "expert_parallel (2) > 1 needs a MoE model"),
    (P(tp=0), 1, MOE, "tensor_parallel must be a positive integer, got 0"),
    (P(tp=2, etp=1), 2, DENSE, "expert_tensor_parallel (1) set on a dense model"),
    (P(ep=2), 4, ModelShape(4, 4, 2, 8, 63, 128), None),
    (P(tp=2, etp=2), 2, ModelShape(4, 4, 2, 8, 63, 128), "expert_tensor_parallel (2) must divide moe_ffn_hidden_size (63)"),
])
def test_invalid_layouts_name_the_numbers(cfg, world, model, msg):
    if msg is None:
        ParallelDims.build(cfg, world, model)
        return
    with pytest.raises(ValueError) as e:
        ParallelDims.build(cfg, world, model)
    assert msg in str(e.value)


def _shape(layers):
    return ModelShape(num_layers=layers, num_attention_heads=4, num_query_groups=2, num_experts=8,
                      moe_ffn_hidden_size=64, ffn_hidden_size=128)


@pytest.mark.parametrize("cfg,layers,split", [
    (P(pp=2), 4, (2, 2)),  # even counts stay even
    (P(pp=2), 3, (1, 2)),  # uneven: a tie in cost, fewer layers first
    (P(pp=4), 8, (2, 2, 2, 2)),
    (P(pp=4), 10, (2, 3, 3, 2)),  # the ends carry embedding / output layer
    (P(pp=16), 61, (3, 3) + (4,) * 13 + (3,)),  # DeepSeek-V3's 61 layers
    (P(pp=8), 94, (11,) + (12,) * 6 + (11,)),  # Qwen3-235B-A22B
    (P(pp=4, emb=0, out=3), 9, (2, 3, 3, 1)),  # a heavy output layer (large vocabulary)
    (P(pp=2, vpp=2), 4, (1, 1, 1, 1)),
    (P(pp=2, split="1,3"), 4, (1, 3)),
    (P(pp=2, split="Ettt|tL"), 4, (3, 1)),
    (P(pp=2, vpp=2, split="E(t|)*3tL"), 4, (1, 1, 1, 1)),
    (P(pp=3, split=[1, 2, 1]), 4, (1, 2, 1)),
])
def test_pipeline_split(cfg, layers, split):
    d = ParallelDims.build(cfg, cfg.pipeline_parallel, _shape(layers))
    assert d.stage_layers(layers) == split
    layout = d.megatron_layout(layers)
    assert layout[0][0] == "embedding" and layout[-1][-1] == "loss"
    assert [st.count("decoder") for st in layout] == list(split)
    # stage (p, v) holds entry v * PP + p, consecutive and covering every layer once
    ranges = [d.layer_range(layers, p, v) for v in range(d.vpp) for p in range(d.pp)]
    assert [i for r in ranges for i in r] == list(range(layers))


def test_megatron_accepts_our_layout():
    """Megatron-Core's own parser and validator take the layout we hand it, and place the
    same layers on each stage."""
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    for pp, vpp, layers in [(2, 1, 3), (4, 1, 10), (2, 2, 7), (3, 2, 13)]:
        d = ParallelDims.build(P(pp=pp, vpp=vpp), pp, _shape(layers))
        ml = PipelineParallelLayerLayout(d.megatron_layout(layers), pp)
        ml.validate_layer_layout(num_layers=layers, mtp_num_layers=None)
        assert ml.virtual_pipeline_model_parallel_size == vpp
        for p, v in itertools.product(range(pp), range(vpp)):
            assert ml.layout[p][v].count(LayerType.decoder) == len(d.layer_range(layers, p, v))


def test_balanced_split_minimises_the_costliest_stage():
    """Against brute force over every composition (small cases)."""
    def compositions(n, k):
        if k == 1:
            yield (n,)
            return
        for first in range(1, n - k + 2):
            for rest in compositions(n - first, k - 1):
                yield (first,) + rest

    for layers, stages, e, o in itertools.product(range(2, 11), range(2, 5), (0.0, 1.0, 2.5), (0.0, 1.0, 3.0)):
        if layers < stages:
            continue
        def cost(c):
            return max([c[0] + e] + list(c[1:-1]) + [c[-1] + o])
        best = min(cost(c) for c in compositions(layers, stages))
        got = balanced_split(layers, stages, e, o)
        assert sum(got) == layers and min(got) >= 1 and cost(got) == best, (layers, stages, e, o, got)


def test_context_parallel_chunks_are_load_balanced():
    """CP rank r holds chunks r and 2CP-1-r: together the ranks cover each position once, and
    under a causal mask every rank attends to the same number of (query, key) pairs."""
    import torch

    from moe_rl.parallel.context_parallel import cp_positions, slice_sequence

    S = 32
    for cp in (1, 2, 4):
        parts = [cp_positions(S, cp, r) for r in range(cp)]
        assert sorted(torch.cat(parts).tolist()) == list(range(S))
        assert len({int((p + 1).sum()) for p in parts}) == 1  # causal work per rank
        x = torch.arange(2 * S).view(2, S)
        assert torch.equal(slice_sequence(x, cp, cp - 1), x[:, parts[-1]])
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"sequence length 30 must be divisible by 2 x context_parallel \(4\) = 8"):
        cp_positions(30, 4, 0)
    d = ParallelDims.build(P(tp=2, cp=2, ep=2), 8, MOE)
    assert (d.dp, d.edp, d.cp) == (2, 2, 2) and "CP2" in d.describe()
    with pytest.raises(ValueError, match=r"world_size \(4\) must be divisible by tensor_parallel \(2\) x "
                                         r"context_parallel \(4\) x pipeline_parallel \(1\) = 8"):
        ParallelDims.build(P(tp=2, cp=4), 4, MOE)
