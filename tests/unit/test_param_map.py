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
    ({"rope_type": "longrope", "factor": 4.0}, "rope_type 'longrope' is not supported"),
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


# YaRN as checkpoints carry it: Qwen3's published form (factor 4 over 32768), an unset factor
# (transformers derives it from the two context lengths), mscale over mscale_all_dim, an mscale
# alone (transformers then ignores it), and an explicit attention factor with an untruncated
# correction range and other betas.
YARN_CASES = {
    "qwen3-published": ("qwen3_moe", {"factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
    "factor-from-context": ("qwen3", {"factor": None, "original_max_position_embeddings": 64}, 256),
    "mscale-ratio": ("mixtral", {"factor": 4.0, "original_max_position_embeddings": 64,
                                 "mscale": 2.0, "mscale_all_dim": 0.5}, 256),
    "mscale-alone": ("qwen3", {"factor": 4.0, "original_max_position_embeddings": 64, "mscale": 2.0}, 256),
    "attention-factor": ("llama", {"factor": 8.0, "original_max_position_embeddings": 64, "attention_factor": 1.3,
                                   "truncate": False, "beta_fast": 16.0, "beta_slow": 2.0}, 256),
}


@pytest.mark.parametrize("case", sorted(YARN_CASES))
def test_yarn_gives_megatron_the_frequencies_and_scale_of_transformers(case):
    """What Megatron's GPTModel builds from the config (its YarnRotaryEmbedding, constructed
    from the ``yarn_*`` attributes as GPTModel reads them) and the factor its attention
    multiplies cos and sin by equal transformers' own YaRN inverse frequencies and attention
    factor. The logits are checked end to end in tests/distributed/test_check_parity_cli.py."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding, _yarn_get_concentration_factor_from_config)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moe_rl.config.run import ParallelConfig
    from moe_rl.parallel import cpu_platform
    from moe_rl.parallel.dims import ParallelDims

    cpu_platform.activate_cpu_mode()
    family, params, max_pos = YARN_CASES[case]
    hf = tiny_hf_config(family, max_position_embeddings=max_pos,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, **params})
    want_inv_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, torch.device("cpu"))
    fam = family_for(hf)
    assert fam.gpt_kwargs(hf)["position_embedding_type"] == "yarn"
    cfg = fam.transformer_config(hf, ParallelDims.build(ParallelConfig(), 1))
    assert _yarn_get_concentration_factor_from_config(cfg) == pytest.approx(want_factor, rel=1e-12)
    rope = YarnRotaryEmbedding(
        kv_channels=cfg.kv_channels, rotary_base=fam.gpt_kwargs(hf)["rotary_base"], use_cpu_initialization=True,
        **{k: getattr(cfg, "yarn_" + k) for k in ("original_max_position_embeddings", "beta_fast", "beta_slow",
                                                  "mscale", "mscale_all_dim", "correction_range_round_to_int")},
        scaling_factor=cfg.yarn_rotary_scaling_factor)
    emb, _ = rope.get_emb(2)  # position 1's angles are the inverse frequencies
    got = emb[1, 0, 0, : want_inv_freq.numel()]
    torch.testing.assert_close(got, want_inv_freq.float(), rtol=1e-6, atol=0)
    d = cfg.kv_channels
    plain = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    assert not torch.allclose(got, plain)  # the case scales something


def test_yarn_that_megatron_cannot_scale_is_refused():
    hf = tiny_hf_config("qwen3", rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0,
                                                  "original_max_position_embeddings": 512, "attention_factor": 1.2})
    with pytest.raises(ValueError, match=r"attention_factor=1.2 with factor=1.0 <= 1 is not supported"):
        family_for(hf).gpt_kwargs(hf)


# ------------------------------------------------------------------ TE spelling of the names


def _te_layer_specs(monkeypatch, hf, *, grouped: bool):
    """Megatron's own TE layer specs for ``hf``, built on a machine without Transformer
    Engine: its module classes are placeholders here, but which norms the spec makes an
    IdentityOp (fused into the next linear) and which experts module it picks are Megatron's."""
    import megatron.core.extensions.transformer_engine as te
    import megatron.core.extensions.transformer_engine_spec_provider as tsp
    import megatron.core.models.gpt.gpt_layer_specs as gls

    from moe_rl.parallel import ParallelConfig, ParallelDims

    monkeypatch.setattr(gls, "TENorm", te.TENorm, raising=False)
    monkeypatch.setattr(gls, "TEFusedMLP", getattr(te, "TEFusedMLP", None), raising=False)
    monkeypatch.setattr(gls, "TESpecProvider", tsp.TESpecProvider, raising=False)
    monkeypatch.setattr(tsp, "is_te_min_version", lambda *a, **k: True)
    monkeypatch.setattr(tsp, "TEColumnParallelGroupedLinear", te.TEColumnParallelLinear)  # not None: TE present
    tc = family_for(hf).transformer_config(hf, ParallelDims.build(ParallelConfig(), 1), moe_grouped_gemm=grouped)
    return gls.get_gpt_decoder_layer_specs(tc, use_transformer_engine=True, normalization="RMSNorm")


def _te_names_from_spec(spec, l: int, num_experts: int) -> set[str]:
    """A layer's norm and expert parameter names as the TE spec builds them."""
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP

    p, sub = f"decoder.layers.{l}.", spec.submodules
    attn = sub.self_attention.submodules
    mla = hasattr(attn, "linear_q_up_proj")
    out = set()
    # An IdentityOp norm lives in the linear after it, as TE's ``layer_norm_weight``.
    out.add(p + ("self_attention.linear_qkv.layer_norm_weight" if sub.input_layernorm is IdentityOp
                 else "input_layernorm.weight"))
    out.add(p + ("mlp.linear_fc1.layer_norm_weight" if sub.pre_mlp_layernorm is IdentityOp
                 else "pre_mlp_layernorm.weight"))
    qk = (("q_layernorm", "linear_q_up_proj"), ("kv_layernorm", "linear_kv_up_proj")) if mla else \
        (("q_layernorm", None), ("k_layernorm", None))
    for norm, up in qk:
        cls = getattr(attn, norm)
        if cls is IdentityOp and up is not None:
            out.add(f"{p}self_attention.{up}.layer_norm_weight")
        elif cls is not IdentityOp:
            out.add(f"{p}self_attention.{norm}.weight")
    experts = getattr(sub.mlp.submodules, "experts", None)
    if experts is not None:
        for e in range(num_experts):
            for fc in ("linear_fc1", "linear_fc2"):
                if experts.module is TEGroupedMLP:
                    out.add(f"{p}mlp.experts.{fc}.weight{e}")  # TE GroupedLinear: weight<gemm index>
                else:
                    assert experts.module is SequentialMLP, experts.module
                    out.add(f"{p}mlp.experts.local_experts.{e}.{fc}.weight")
    return out


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3"])
def test_te_spelling_is_the_te_specs(family, grouped, monkeypatch):
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    from moe_rl.models.param_map import TE, TE_GROUPED

    hf = tiny_hf_config(family)
    fam = family_for(hf)
    specs = _te_layer_specs(monkeypatch, hf, grouped=grouped)
    moe = fam.moe_layers(hf)
    mla = family == "deepseek_v3"
    if grouped and any(moe):
        assert any(getattr(s.submodules.mlp.submodules, "experts", None) is not None
                   and s.submodules.mlp.submodules.experts.module is TEGroupedMLP for s in specs)
    pm = fam.param_map(hf).respelled(TE_GROUPED if grouped else TE, moe_layers=moe, mla=mla)
    for l, spec in enumerate(specs):
        ours = {n for n in pm.entries if n.startswith(f"decoder.layers.{l}.")
                and ("norm" in n or ".experts." in n) and "shared_experts" not in n}
        assert ours == _te_names_from_spec(spec, l, fam.num_experts(hf)), (family, l)


def test_te_expert_names_are_what_megatron_reads():
    """TEGroupedMLP's checkpoint code asks for ``<linear>.weight<i>`` per local expert, and
    our canonical names carry the global expert index there."""
    import inspect

    from megatron.core.transformer.moe.experts import TEGroupedMLP

    from moe_rl.models.param_map import canonical_name

    assert "f'{name}.weight{i}'" in inspect.getsource(TEGroupedMLP.sharded_state_dict)
    assert canonical_name("decoder.layers.0.mlp.experts.linear_fc1.weight3", layer_offset=2, expert_offset=4) == \
        "decoder.layers.2.mlp.experts.linear_fc1.weight7"


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "deepseek_v3"])
def test_checkpoint_keys_are_the_te_specs_names(family):
    """A checkpoint written from our local-spec model stores every norm under the name the
    Transformer Engine spec's model has for it (so Megatron-LM with TE loads it, and our
    CPU tools read what a TE run saved): dense and MoE layers, with and without MLA."""
    import torch

    from moe_rl.checkpoint import megatron_format as mf
    from moe_rl.models.param_map import TE, respell

    hf = tiny_hf_config(family)
    moe = family_for(hf).moe_layers(hf)
    mla = family == "deepseek_v3"
    with mf.single_process_megatron() as groups:
        shards = mf.model_shards(hf, groups, torch.float32)
    fused = 0
    for name, sts in shards.per_param.items():
        if not name.endswith("norm.weight") or not name.startswith("decoder.layers."):
            continue
        l = int(name.split(".")[2])
        key = sts[0].key
        if not key.startswith(f"decoder.layers.{l}."):  # uniform layers: one stacked key
            key = key.replace("decoder.layers.", f"decoder.layers.{l}.", 1)
        te = respell(name, TE, moe_layer=moe[l], mla=mla)
        assert key == te, (name, key, te)
        fused += te != name
    # Each layer fuses at least one norm into a linear in the TE spec (attention's input
    # norm, or MLA's q/kv norms).
    assert fused >= len(moe)
    if any(moe):
        assert any(k.endswith(".pre_mlp_layernorm.weight") for sts in shards.per_param.values()
                   for k in [sts[0].key])


def test_spelling_is_read_from_the_live_names():
    from moe_rl.models.param_map import LOCAL, TE, TE_GROUPED, spelling_of

    assert spelling_of(["decoder.layers.0.input_layernorm.weight"]) == LOCAL
    assert spelling_of(["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]) == TE
    assert spelling_of(["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
                        "decoder.layers.0.mlp.experts.linear_fc2.weight1"]) == TE_GROUPED


def test_llama_attention_bias_maps_every_hf_bias():
    import transformers

    hf = tiny_hf_config("llama", attention_bias=True)
    with torch.device("meta"):
        names = set(transformers.AutoModelForCausalLM.from_config(hf).state_dict())
    assert {n for n in names if n.endswith("_proj.bias")} <= family_for(hf).param_map(hf).hf_names()


def _saved_names(family, tmp_path, **overrides) -> set[str]:
    """Tensor names of a checkpoint written by ``transformers`` (``save_pretrained``; its
    in-memory names differ for fused experts)."""
    from moe_rl.models.hf_checkpoint import HFCheckpoint
    from moe_rl.models.tiny import save_tiny_hf

    with HFCheckpoint(save_tiny_hf(family, tmp_path / family, **overrides)) as ckpt:
        return set(ckpt.keys())


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "qwen3", "llama"])
def test_a_plain_checkpoint_has_nothing_unmapped(family, tmp_path):
    from moe_rl.models.hf_checkpoint import unmapped_tensors

    hf = tiny_hf_config(family)
    assert unmapped_tensors(_saved_names(family, tmp_path), family_for(hf).param_map(hf).hf_names(), hf) == []


def test_what_loading_would_drop_is_named(tmp_path):
    """A DeepSeek-V3 with attention_bias has MLA projection biases the map does not carry: the
    loader must refuse them by name (never load a model that silently differs from the
    checkpoint); what transformers itself skips (the MTP layer 61, a tied lm_head) is skipped."""
    from moe_rl.models.hf_checkpoint import unmapped_tensors

    hf = tiny_hf_config("deepseek_v3", attention_bias=True)
    names = _saved_names("deepseek_v3", tmp_path, attention_bias=True)
    biases = sorted(n for n in names if ".self_attn." in n and n.endswith(".bias"))
    assert biases and unmapped_tensors(names, family_for(hf).param_map(hf).hf_names(), hf) == biases
    ds = tiny_hf_config("deepseek_v3")
    mapped = family_for(ds).param_map(ds).hf_names()
    assert unmapped_tensors({"model.layers.61.eh_proj.weight", "model.layers.0.rotary_emb.inv_freq"}, mapped, ds) == []
    ds.tie_word_embeddings = True
    assert unmapped_tensors({"lm_head.weight", "model.layers.0.mlp.bogus"}, mapped - {"lm_head.weight"}, ds) == [
        "model.layers.0.mlp.bogus"]
