"""The HF <-> Megatron parameter map: fusions against an independent layout, inverses in
both directions, sharding against hand-built shards, and coverage of every HF tensor."""

import pytest
import torch

from moe_rl.models import FAMILIES, family_for
from moe_rl.models.param_map import Entry, canonical_name, shard, unshard
from moe_rl.models.tiny import tiny_hf_config


def test_qkv_fusion_is_per_query_group():
    Q, G, D, H = 4, 2, 3, 5
    q = torch.arange(Q * D * H, dtype=torch.float32).reshape(Q * D, H)
    k = 1000 + torch.arange(G * D * H, dtype=torch.float32).reshape(G * D, H)
    v = 2000 + torch.arange(G * D * H, dtype=torch.float32).reshape(G * D, H)
    e = Entry("qkv", ("q", "k", "v"), "qkv", (Q, G, D))
    fused = e.to_mcore({"q": q, "k": k, "v": v}.__getitem__)
    # independent reference: group g = [q heads 2g, 2g+1 | k head g | v head g]
    rows = []
    for g in range(G):
        for h in range(Q // G):
            rows.append(q[(g * (Q // G) + h) * D:(g * (Q // G) + h + 1) * D])
        rows.append(k[g * D:(g + 1) * D])
        rows.append(v[g * D:(g + 1) * D])
    assert torch.equal(fused, torch.cat(rows))
    back = e.to_hf(fused)
    assert torch.equal(back["q"], q) and torch.equal(back["k"], k) and torch.equal(back["v"], v)


def test_glu_shard_is_gate_i_then_up_i():
    gate = torch.arange(8.0)[:, None].expand(8, 3)
    up = 100 + torch.arange(8.0)[:, None].expand(8, 3)
    e = Entry("fc1", ("g", "u"), "glu")
    full = e.to_mcore({"g": gate, "u": up}.__getitem__)
    parts = [shard(full, e, partition_dim=0, rank=r, size=2) for r in range(2)]
    assert torch.equal(parts[1], torch.cat([gate[4:], up[4:]]))
    assert torch.equal(unshard(parts, e, partition_dim=0), full)


def test_vocab_padding_and_unpadding():
    e = Entry("emb", ("w",), vocab=True)
    w = torch.randn(5, 2)
    full = e.to_mcore({"w": w}.__getitem__, padded_vocab=8)
    assert full.shape == (8, 2) and torch.equal(full[5:], torch.zeros(3, 2))
    assert torch.equal(e.to_hf(full, vocab_size=5)["w"], w)


def test_canonical_names_offset_layers_and_experts():
    n = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"
    assert canonical_name(n, layer_offset=2, expert_offset=4) == \
        "decoder.layers.3.mlp.experts.local_experts.7.linear_fc1.weight"
    assert canonical_name("embedding.word_embeddings.weight", layer_offset=2, expert_offset=4) == \
        "embedding.word_embeddings.weight"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_map_covers_every_hf_tensor_and_round_trips(family, tiny_hf_dirs):
    from moe_rl.models.hf_checkpoint import HFCheckpoint

    with HFCheckpoint(tiny_hf_dirs[family]) as ck:
        hf = ck.config()
        pm = family_for(hf).param_map(hf)
        assert pm.hf_names() == set(ck.keys())  # nothing on disk is ignored, nothing invented
        full = {name: e.to_mcore(ck.get) for name, e in pm.entries.items()}
        back = pm.to_hf(full)
        assert set(back) == set(ck.keys())
        for k in back:
            assert torch.equal(back[k], ck.get(k)), k


def test_unknown_model_type_is_a_clear_error():
    class C:
        model_type = "gpt2"
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        family_for(C())


def test_deepseek_group_topk_mismatch_is_refused():
    from moe_rl.parallel import ParallelConfig, ParallelDims

    hf = tiny_hf_config("deepseek_v3", num_experts_per_tok=3)
    with pytest.raises(ValueError, match="agree only when that is 2"):
        family_for(hf).transformer_config(hf, ParallelDims.build(ParallelConfig(), 1))


@pytest.mark.parametrize("kind", ["copy", "glu", "qkv"])
@pytest.mark.parametrize("dim", [0, 1])
def test_chunked_read_equals_shard_of_full(kind, dim):
    if kind != "copy" and dim == 1:
        pytest.skip("fused kinds are column-parallel (dim 0) only")
    g = torch.Generator().manual_seed(0)
    src = {"a": torch.randn(16, 8, generator=g), "b": torch.randn(8, 8, generator=g),
           "c": torch.randn(8, 8, generator=g)}
    if kind == "copy":
        e = Entry("x", ("a",))
    elif kind == "glu":
        e = Entry("x", ("a", "b"), "glu")
        src["b"] = torch.randn(16, 8, generator=g)
    else:
        e = Entry("x", ("a", "b", "c"), "qkv", (4, 2, 4))  # Q=4 heads, G=2 groups, D=4

    def get_chunk(name, d, i, n):
        return src[name].chunk(n, dim=d)[i]

    full = e.to_mcore(src.__getitem__)
    for r in range(2):
        assert torch.equal(e.to_mcore_chunk(get_chunk, dim, r, 2),
                           shard(full, e, partition_dim=dim, rank=r, size=2))


@pytest.mark.parametrize("change, message", [
    ({"rope_type": "yarn", "factor": 4.0}, "rope_type 'yarn' is not supported"),
    ({"low_freq_factor": 2.0}, "low_freq_factor=2.0 is not supported"),
    ({"original_max_position_embeddings": 4096}, "original_max_position_embeddings=4096"),
])
def test_llama_rope_variants_megatron_cannot_run_are_refused(change, message):
    from moe_rl.models import family_for
    from moe_rl.models.tiny import tiny_hf_config

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0, **change}
    hf = tiny_hf_config("llama", rope_parameters=rope)
    with pytest.raises(ValueError, match=message):
        family_for(hf).gpt_kwargs(hf)


def test_llama31_rope_scaling_reaches_megatron():
    from moe_rl.models import family_for
    from moe_rl.models.tiny import tiny_hf_config

    hf = tiny_hf_config("llama", rope_parameters={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0})  # Llama 3.2's values
    kw = family_for(hf).gpt_kwargs(hf)
    assert kw["rope_scaling"] is True and kw["rope_scaling_factor"] == 32.0
    assert "rope_scaling" not in family_for(tiny_hf_config("llama")).gpt_kwargs(tiny_hf_config("llama"))
