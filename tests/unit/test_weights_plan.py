"""The export plan, without any process group: every family x layout covers every HF tensor
exactly once with the checkpoint's shapes; ranks agree with Megatron's own RankGenerator;
executing the plan on shards cut from the checkpoint gives back the checkpoint, bitwise."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moe_rl.models import FAMILIES
from moe_rl.models.hf_checkpoint import HFCheckpoint
from moe_rl.models.param_map import shard
from moe_rl.parallel import ParallelConfig, ParallelDims
from moe_rl.weights.export import assemble
from moe_rl.weights.plan import (checkpoint_shapes, coords, dense_rank, expert_rank, is_expert,
                                 plan_export)

MOE = {"qwen3_moe", "mixtral", "deepseek_v3"}
BUCKET = 48 << 10  # small enough that every tiny model spans many buckets


def layouts(family: str):
    """Every (TP 1/2, PP 1/2, EP 1/2/4, ETP 1/2) valid for the family, at its smallest world."""
    for tp, pp, ep, etp in itertools.product((1, 2), (1, 2), (1, 2, 4), (1, 2)):
        if family not in MOE and (ep > 1 or etp != tp):
            continue
        world = pp * math.lcm(tp, etp * ep)
        cfg = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                             expert_tensor_parallel=etp)
        yield ParallelDims.build(cfg, world)


@pytest.fixture(scope="module")
def ckpts(tiny_hf_dirs):
    out = {}
    for fam, d in tiny_hf_dirs.items():
        with HFCheckpoint(d) as c:
            out[fam] = (c.config(), checkpoint_shapes(d), {n: c.get(n) for n in c.keys()})
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_layout_covers_every_hf_tensor_once(family, ckpts):
    hf, shapes, _ = ckpts[family]
    L, n_exp = hf.num_hidden_layers, FAMILIES[family].num_experts(hf)
    seen_layouts = 0
    for dims in layouts(family):
        seen_layouts += 1
        plan = plan_export(hf, shapes, dims, bucket_bytes=BUCKET)
        names = [t.name for t in plan.tensors()]
        assert sorted(names) == sorted(shapes), dims.describe()  # each exactly once, nothing else
        assert {t.name: t.shape for t in plan.tensors()} == shapes
        assert plan.nbytes == sum(4 * math.prod(s) for s in shapes.values())
        for b in plan.buckets:
            assert b.nbytes <= BUCKET or len(b.items) == 1
            for it in b.items:
                assert it.sources[0] == b.sender and len(set(it.sources)) == len(it.sources)
                assert all(0 <= r < dims.world_size for r in it.sources)
                c = [coords(dims, r) for r in it.sources]
                layer = it.mcore.split(".")[2] if it.mcore.startswith("decoder.layers.") else None
                stage = int(layer) // (L // dims.pp) if layer else (0 if "embedding" in it.mcore else dims.pp - 1)
                assert {x.pp for x in c} == {stage}, (it.mcore, dims.describe())
                if is_expert(it.mcore):
                    e = int(it.mcore.split("local_experts.")[1].split(".")[0])
                    assert {x.ep for x in c} == {e // (n_exp // dims.ep)} and {x.edp for x in c} == {0}
                    assert [x.etp for x in c] == list(range(len(c)))
                    assert f"local_experts.{e % (n_exp // dims.ep)}." in it.local_name
                else:
                    assert {x.dp for x in c} == {0} and [x.tp for x in c] == list(range(len(c)))
                if layer:
                    assert it.local_name.startswith(f"decoder.layers.{int(layer) % (L // dims.pp)}.")
        # every pipeline stage, and every EP rank of a MoE model, sends its own part
        senders = {(coords(dims, s).pp, coords(dims, s).ep) for s in plan.senders()}
        assert {x[0] for x in senders} == set(range(dims.pp))
        if n_exp:
            assert {x[1] for x in senders} == set(range(dims.ep))
    assert seen_layouts >= (24 if family in MOE else 4)


def test_ranks_follow_megatrons_rank_generator():
    from megatron.core.parallel_state import RankGenerator

    for tp, pp, ep, etp, world in [(2, 2, 2, 1, 8), (2, 1, 2, 2, 8), (1, 2, 4, 1, 8), (2, 2, 1, 2, 8),
                                   (2, 1, 4, 1, 4)]:
        dims = ParallelDims.build(ParallelConfig(tp, pp, ep, etp), world)
        dense = RankGenerator(tp=tp, ep=1, dp=dims.dp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
        expert = RankGenerator(tp=etp, ep=ep, dp=dims.edp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
        for group in dense.get_ranks("tp"):
            c = coords(dims, group[0])
            assert group == [dense_rank(dims, tp=i, dp=c.dp, pp=c.pp) for i in range(tp)]
        for group in dense.get_ranks("pp"):
            c = coords(dims, group[0])
            assert group == [dense_rank(dims, tp=c.tp, dp=c.dp, pp=i) for i in range(pp)]
        for group in expert.get_ranks("ep"):
            c = coords(dims, group[0])
            assert group == [expert_rank(dims, etp=c.etp, ep=i, edp=c.edp, pp=c.pp) for i in range(ep)]
        for group in expert.get_ranks("tp"):
            c = coords(dims, group[0])
            assert group == [expert_rank(dims, etp=i, ep=c.ep, edp=c.edp, pp=c.pp) for i in range(etp)]
        for r in range(world):
            c = coords(dims, r)
            assert dense_rank(dims, tp=c.tp, dp=c.dp, pp=c.pp) == r
            assert expert_rank(dims, etp=c.etp, ep=c.ep, edp=c.edp, pp=c.pp) == r


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plan_on_cut_shards_gives_the_checkpoint_back(family, ckpts):
    """Cut each rank's shards from the checkpoint the way the trainer loads them
    (``param_map.shard``), execute the plan on them: every HF tensor comes back bitwise."""
    hf, shapes, tensors = ckpts[family]
    fam = FAMILIES[family]
    for tp, pp, ep, etp in [(2, 2, 2, 1), (2, 1, 4, 2), (1, 2, 1, 1), (2, 1, 1, 2)]:
        if family not in MOE and (ep > 1 or etp != tp):
            continue
        world = pp * math.lcm(tp, etp * ep)
        dims = ParallelDims.build(ParallelConfig(tp, pp, ep, etp), world)
        plan = plan_export(hf, shapes, dims, bucket_bytes=BUCKET)
        pmap = fam.param_map(hf)
        padded = fam.padded_vocab_size(hf, dims)
        got = {}
        for b in plan.buckets:
            for it in b.items:
                full = pmap[it.mcore].to_mcore(tensors.__getitem__, padded)
                shards = [shard(full, it.entry, partition_dim=it.partition_dim, rank=i, size=len(it.sources))
                          for i in range(len(it.sources))]
                got.update(assemble(it, shards))
        assert got.keys() == tensors.keys()
        for n, t in tensors.items():
            assert torch.equal(got[n], t), (family, dims.describe(), n)


def test_padded_vocabulary_is_trimmed_and_bad_input_is_named():
    from moe_rl.models.tiny import tiny_hf_config

    hf = tiny_hf_config("qwen3", vocab_size=511)
    V, H = 511, hf.hidden_size
    shapes = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,)}
    for l in range(hf.num_hidden_layers):
        p = f"model.layers.{l}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (64, H), p + "self_attn.k_proj.weight": (32, H),
                       p + "self_attn.v_proj.weight": (32, H), p + "self_attn.o_proj.weight": (H, 64),
                       p + "self_attn.q_norm.weight": (16,), p + "self_attn.k_norm.weight": (16,),
                       p + "mlp.gate_proj.weight": (128, H), p + "mlp.up_proj.weight": (128, H),
                       p + "mlp.down_proj.weight": (H, 128)})
    dims = ParallelDims.build(ParallelConfig(tensor_parallel=2), 2)
    plan = plan_export(hf, shapes, dims, bucket_bytes=BUCKET, dtype=torch.bfloat16)
    emb = next(it for b in plan.buckets for it in b.items if it.mcore == "embedding.word_embeddings.weight")
    assert emb.shape == (512, H) and emb.vocab_rows == 511 and emb.hf[0].dtype == "bfloat16"
    w = torch.randn(V, H)
    full = torch.cat([w, torch.zeros(1, H)])
    assert torch.equal(dict(assemble(emb, list(full.chunk(2))))["model.embed_tokens.weight"], w.bfloat16())
    with pytest.raises(ValueError, match=r"2 HF tensors .* have no shape, e.g. model.layers.0.mlp.up_proj"):
        plan_export(hf, {k: v for k, v in shapes.items() if not (
            k.endswith("mlp.up_proj.weight") and k.startswith(("model.layers.0.", "model.layers.1.")))}, dims)
    with pytest.raises(ValueError, match=r"= 5 stages need at least 5 layers \(one per stage\); the model has 4"):
        plan_export(hf, shapes, ParallelDims.build(ParallelConfig(pipeline_parallel=5), 5))


def test_tied_embeddings_are_sent_once_from_the_first_stage(ckpts):
    hf, shapes, _ = ckpts["qwen3"]
    tied = type(hf).from_dict({**hf.to_dict(), "tie_word_embeddings": True})
    shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    dims = ParallelDims.build(ParallelConfig(pipeline_parallel=2, tensor_parallel=2), 4)
    plan = plan_export(tied, shapes, dims, bucket_bytes=BUCKET)
    names = [t.name for t in plan.tensors()]
    assert sorted(names) == sorted(shapes)
    (emb,) = [it for b in plan.buckets for it in b.items if "model.embed_tokens.weight" in [t.name for t in it.hf]]
    assert emb.mcore == "embedding.word_embeddings.weight" and {coords(dims, r).pp for r in emb.sources} == {0}


@pytest.mark.parametrize("family", sorted(MOE))
@pytest.mark.parametrize("pp,vpp,split,expect", [
    # (pipeline rank, virtual stage, local index) of global layers 0..3
    (2, 1, "1,3", [(0, 0, 0), (1, 0, 0), (1, 0, 1), (1, 0, 2)]),
    (2, 1, "Ettt|tL", [(0, 0, 0), (0, 0, 1), (0, 0, 2), (1, 0, 0)]),
    (2, 2, None, [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]),  # interleaved order
])
def test_uneven_and_virtual_stages_place_layers_where_megatron_builds_them(family, ckpts, pp, vpp, split, expect):
    """Each layer's sender is the pipeline rank of its stage, read from that rank's model chunk
    under its local index; the embedding from the first chunk of rank 0, the output layer from
    the last chunk of the last rank. Still every HF tensor exactly once."""
    hf, shapes, _ = ckpts[family]
    dims = ParallelDims.build(ParallelConfig(pipeline_parallel=pp, virtual_pipeline=vpp, pipeline_layout=split), pp)
    plan = plan_export(hf, shapes, dims, bucket_bytes=BUCKET)
    assert sorted(t.name for t in plan.tensors()) == sorted(shapes)
    for it in (i for b in plan.buckets for i in b.items):
        layer = it.mcore.split(".")[2] if it.mcore.startswith("decoder.layers.") else None
        if layer is not None:
            rank, chunk, local = expect[int(layer)]
            assert (it.sources[0], it.chunk) == (rank, chunk), it.mcore
            assert it.local_name.startswith(f"decoder.layers.{local}."), (it.mcore, it.local_name)
        elif it.mcore.startswith("embedding."):
            assert (it.sources[0], it.chunk) == (0, 0)
        else:
            assert (it.sources[0], it.chunk) == (pp - 1, vpp - 1), it.mcore


def test_context_parallel_ranks_follow_megatrons_rank_generator(ckpts):
    """With CP the dense ranks fold TP x CP x DP (cp between tp and dp); the expert fold is
    unchanged. Dense tensors are sent by CP rank 0."""
    from megatron.core.parallel_state import RankGenerator

    for tp, cp, pp, ep, world in [(1, 2, 1, 2, 4), (2, 2, 1, 1, 4), (2, 2, 2, 2, 16), (1, 4, 1, 2, 8)]:
        dims = ParallelDims.build(ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, expert_parallel=ep,
                                                 context_parallel=cp), world)
        dense = RankGenerator(tp=tp, ep=1, dp=dims.dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
        for kind, key in (("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("pp", "pp")):
            for group in dense.get_ranks(kind):
                cs = [coords(dims, r) for r in group]
                others = {tuple(getattr(c, f) for f in ("tp", "cp", "dp", "pp") if f != key) for c in cs}
                assert len(others) == 1 and [getattr(c, key) for c in cs] == list(range(len(group))), (kind, group)
        for r in range(world):
            c = coords(dims, r)
            assert dense_rank(dims, tp=c.tp, dp=c.dp, pp=c.pp, cp=c.cp) == r
            assert expert_rank(dims, etp=c.etp, ep=c.ep, edp=c.edp, pp=c.pp) == r
        hf, shapes, _ = ckpts["qwen3_moe"]
        plan = plan_export(hf, shapes, dims, bucket_bytes=BUCKET)
        for it in (i for b in plan.buckets for i in b.items):
            c = coords(dims, it.sources[0])
            if is_expert(it.mcore):
                assert c.edp == 0 and c.etp == 0, it.mcore
            else:
                assert (c.cp, c.dp, c.tp) == (0, 0, 0), it.mcore



def test_float32_parameters_keep_float32_in_a_bf16_plan(ckpts):
    """DeepSeek's expert bias is float32 in Megatron (and in transformers) whatever the model's
    dtype: a bf16 plan sends it in float32, never rounded; ``dtypes`` sets single parameters'."""
    cfg, shapes, _ = ckpts["deepseek_v3"]
    dims = ParallelDims.build(ParallelConfig(), 1)
    plan = plan_export(cfg, shapes, dims, bucket_bytes=BUCKET, dtype=torch.bfloat16)
    fp32 = {t.name for t in plan.tensors() if t.dtype == "float32"}
    assert fp32 == {n for n in shapes if n.endswith("gate.e_score_correction_bias")} and fp32
    assert {t.dtype for t in plan.tensors() if t.name not in fp32} == {"bfloat16"}
    router = "decoder.layers.1.mlp.router.weight"
    plan = plan_export(cfg, shapes, dims, bucket_bytes=BUCKET, dtype=torch.bfloat16, dtypes={router: torch.float32})
    assert {t.name for t in plan.tensors() if t.dtype == "float32"} == fp32 | {"model.layers.1.mlp.gate.weight"}
