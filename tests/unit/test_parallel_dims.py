"""ParallelDims: every invalid combination gets a clear error naming the numbers."""

import pytest

from moe_rl.parallel import ModelShape, ParallelConfig, ParallelDims

MOE = ModelShape(num_layers=4, num_attention_heads=4, num_query_groups=2, num_experts=6,
                 moe_ffn_hidden_size=64, ffn_hidden_size=128)
DENSE = ModelShape(num_layers=4, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128)


def P(**kw):
    names = dict(tp="tensor_parallel", pp="pipeline_parallel", ep="expert_parallel",
                 etp="expert_tensor_parallel", sp="sequence_parallel")
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
    (P(pp=3), 3, MOE, "pipeline_parallel (3) must divide num_layers (4)"),
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
