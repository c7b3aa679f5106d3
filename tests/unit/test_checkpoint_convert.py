"""``tools/convert_checkpoint.py`` refuses bad input before any work, naming the file or the
numbers (these checks need no Megatron and no process group). Conversions themselves, the
bitwise round trips and the logits at other layouts run in tests/distributed/test_weights.py."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools/convert_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def run(cli, capsys, *argv):
    rc = cli(["--no-progress", *map(str, argv)])
    return rc, capsys.readouterr().err


def test_an_output_that_holds_files_is_refused_unless_overwrite(cli, capsys, tiny_hf_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, err = run(cli, capsys, "--input", tiny_hf_dirs["llama"], "--output", out, "--to", "mcore")
    assert rc == 2 and f"{out} already exists and is not empty" in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    rc, err = run(cli, capsys, "--input", tiny_hf_dirs["llama"], "--output", tiny_hf_dirs["llama"], "--to", "hf",
                  "--overwrite")
    assert rc == 2 and "the output must differ from the input" in err


def test_an_output_around_or_inside_the_input_is_refused_even_with_overwrite(cli, capsys, tiny_hf_dirs, tmp_path):
    """--output RUN for --input RUN/checkpoints/step_N with --overwrite would replace (delete)
    the run holding the input; --output inside the input would write into it."""
    run_dir = tmp_path / "run"
    src = run_dir / "checkpoints" / "hf"
    shutil.copytree(tiny_hf_dirs["llama"], src)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    rc, err = run(cli, capsys, "--input", src, "--output", run_dir, "--to", "mcore", "--overwrite")
    assert rc == 2 and f"{src} lies inside {run_dir}" in err, err
    rc, err = run(cli, capsys, "--input", src, "--output", src / "inner", "--to", "mcore")
    assert rc == 2 and f"{src / 'inner'} lies inside {src}" in err, err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


@pytest.mark.parametrize("layout,msg", [
    (["--tp", "3"], r"tensor_parallel \(3\) must divide num_attention_heads \(4\)"),
    (["--pp", "5"], r"pipeline_parallel \(5\).*(num_layers \(4\)|the model has 4)"),  # 5 stages, 4 layers
    (["--ep", "3"], r"expert_parallel \(3\) must divide num_experts \(8\)"),
    (["--etp", "3"], r"expert_tensor_parallel \(3\) must divide moe_ffn_hidden_size \(64\)"),
])
def test_a_layout_that_does_not_fit_the_model_is_refused(cli, capsys, tiny_hf_dirs, tmp_path, layout, msg):
    rc, err = run(cli, capsys, "--input", tiny_hf_dirs["qwen3_moe"], "--output", tmp_path / "o", "--to", "mcore", *layout)
    assert rc == 2 and "layout does not fit qwen3_moe" in err and re.search(msg, err), err
    assert not (tmp_path / "o").exists() and os.listdir(tmp_path) == []


def test_unknown_architecture_truncated_file_and_missing_pieces_are_named(cli, capsys, tiny_hf_dirs, tmp_path):
    src = Path(tiny_hf_dirs["llama"])
    gpt = tmp_path / "gpt"
    shutil.copytree(src, gpt)
    cfg = json.loads((gpt / "config.json").read_text())
    (gpt / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    rc, err = run(cli, capsys, "--input", gpt, "--output", tmp_path / "o1", "--to", "mcore")
    assert rc == 2 and "model_type 'gpt2' is not supported" in err and "llama" in err, err

    cut = tmp_path / "cut"
    shutil.copytree(src, cut)
    weights = cut / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    rc, err = run(cli, capsys, "--input", cut, "--output", tmp_path / "o2", "--to", "mcore")
    assert rc == 2 and f"{weights}: not a readable safetensors file (truncated or garbled?)" in err, err

    bins = tmp_path / "bins"
    shutil.copytree(src, bins)
    weights = bins / "model.safetensors"
    weights.rename(bins / "pytorch_model.bin")
    rc, err = run(cli, capsys, "--input", bins, "--output", tmp_path / "o3", "--to", "mcore")
    assert rc == 2 and "no *.safetensors files (found pytorch_model.bin" in err, err

    rc, err = run(cli, capsys, "--input", tmp_path / "nowhere", "--output", tmp_path / "o4", "--to", "mcore")
    assert rc == 2 and "no such directory" in err

    mcore = tmp_path / "mcore_without_hf"
    mcore.mkdir()
    (mcore / "latest_checkpointed_iteration.txt").write_text("release")
    rc, err = run(cli, capsys, "--input", mcore, "--output", tmp_path / "o5", "--to", "hf")
    assert rc == 2 and "pass --hf-config DIR" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bins", "cut", "gpt", "mcore_without_hf"]


def test_safetensors_written_and_read_as_the_safetensors_package_does(tmp_path):
    """Our writer and reader against the reference implementation, both ways."""
    import torch
    from safetensors.torch import load_file, save_file

    from moe_rl.checkpoint.hf_format import HFFiles, write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
               "b.f32.transposed": torch.randn(4, 6, generator=g).t(),  # not contiguous
               "c.i64": torch.arange(9, dtype=torch.int64), "d.scalar": torch.tensor(3.5),
               "e.empty": torch.zeros(0, 3), "f.f16": torch.randn(3, generator=g).half()}
    write_safetensors(tmp_path / "ours.safetensors", list(tensors.items()))
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    assert set(theirs) == set(tensors)
    for k, t in tensors.items():
        assert theirs[k].dtype == t.dtype and torch.equal(theirs[k], t), k

    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp_path / "ref.safetensors"))
    files = HFFiles(tmp_path, ["ref.safetensors"])
    try:
        for k, t in tensors.items():
            got = files.get(k)
            assert got.dtype == t.dtype and tuple(got.shape) == tuple(t.shape) and torch.equal(got, t), k
        files.release()  # pages dropped; the tensors read again from the file
        assert torch.equal(files.get("a.bf16"), tensors["a.bf16"])
    finally:
        files.close()


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_tensors_copied_file_to_file_land_whole(tmp_path, monkeypatch, kernel_copy):
    """A FileRange is copied by copy_file_range, or through memory where the kernel refuses."""
    import torch
    from safetensors.torch import load_file, save_file

    from moe_rl.checkpoint.hf_format import FileRange, read_header, write_safetensors

    src = {"x": torch.randn(33, 7).to(torch.bfloat16), "y": torch.arange(10, dtype=torch.int32)}
    save_file(src, str(tmp_path / "src.safetensors"))
    stored = read_header(tmp_path / "src.safetensors")
    if not kernel_copy:
        def refuse(*a, **k):
            raise OSError(18, "Invalid cross-device link")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    fd = os.open(tmp_path / "src.safetensors", os.O_RDONLY)
    try:
        named = [(n, FileRange(fd, stored[n].start, stored[n].dtype, stored[n].shape)) for n in ("y", "x")]
        write_safetensors(tmp_path / "out.safetensors", [("z", torch.ones(3))] + named)
    finally:
        os.close(fd)
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out["x"], src["x"]) and torch.equal(out["y"], src["y"]) and torch.equal(out["z"], torch.ones(3))


def test_megatron_checkpoint_direct_reads_equal_dcp_and_hf(tiny_hf_dirs, tmp_path):
    """HF -> mcore, then every canonical tensor read back by the direct path equals DCP's own
    load of it and the HF tensors it was made from (the independent reference); mcore -> HF
    is bitwise. The writer turns torch's zip CRC-32s off for its own records only: the
    process-wide option is as it was after a conversion and after a failed write."""
    import torch

    from moe_rl.checkpoint import megatron_format as mf
    from moe_rl.checkpoint.convert import convert
    from moe_rl.models.hf_checkpoint import HFCheckpoint

    src = Path(tiny_hf_dirs["qwen3_moe"])
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(True)
    try:
        convert(src, tmp_path / "mcore", to="mcore")
        assert torch.serialization.get_crc32_options() is True
    finally:
        torch.serialization.set_crc32_options(crc)
    convert(tmp_path / "mcore", tmp_path / "back", to="hf", file_bytes=64 << 10)  # several files
    back = _tensors(tmp_path / "back")
    with HFCheckpoint(src) as ck:
        hf = ck.config()
        assert set(back) == set(ck.keys())
        assert all(back[k].dtype == ck.get(k).dtype and torch.equal(back[k], ck.get(k)) for k in back)
        with mf.single_process_megatron() as groups:
            shards = mf.model_shards(hf, groups, ck.get(next(iter(ck.keys()))).dtype)
            names = list(shards.per_param)
            fast = mf.DistCheckpointReader(mf.iteration_dir(tmp_path / "mcore"), shards)
            slow = mf.DistCheckpointReader(fast.path, shards, fast=False)
            a, b = fast.read(names), slow.read(names)
            fast.close()
            assert fast.fast_reads >= len(names) and slow.fast_reads == 0
            pmap = shards.built.param_map
            for n in names:
                assert torch.equal(a[n], b[n]), n
                assert torch.equal(a[n], pmap[n].to_mcore(ck.get)), n

            def unreadable(name):
                raise mf.CheckpointError(f"{name}: unreadable")
            (tmp_path / "failed").mkdir()
            torch.serialization.set_crc32_options(True)
            try:
                with pytest.raises(mf.CheckpointError, match="unreadable"):
                    mf.write_dist_checkpoint(tmp_path / "failed", shards, unreadable, common={})
                assert torch.serialization.get_crc32_options() is True
            finally:
                torch.serialization.set_crc32_options(crc)


@pytest.mark.parametrize("family", ["llama", "mixtral", "deepseek_v3"])
def test_common_state_holds_the_args_megatron_lm_reads(tiny_hf_dirs, tmp_path, family):
    """Megatron-LM's ``load_checkpoint`` indexes ``common.pt``'s ``args`` for the saved TP and
    PP sizes and, unless fine-tuning, compares the model's shape with the run's. The stored
    args load under ``torch.load``'s weights-only rule with Megatron's safe globals, and match
    the HF config (read here with transformers, independently of our families)."""
    import torch
    import transformers
    from megatron.core.safe_globals import register_safe_globals

    from moe_rl.checkpoint import megatron_format as mf
    from moe_rl.checkpoint.convert import convert

    src = Path(tiny_hf_dirs[family])
    convert(src, tmp_path / "mcore", to="mcore")
    register_safe_globals()
    common = torch.load(mf.iteration_dir(tmp_path / "mcore") / "common.pt", map_location="cpu", weights_only=True)
    a, hf = common["args"], transformers.AutoConfig.from_pretrained(src)
    # What load_checkpoint reads before anything else, and check_checkpoint_args' comparisons.
    assert (a.tensor_model_parallel_size, a.pipeline_model_parallel_size) == (1, 1)
    assert a.no_save_optim and a.no_save_rng and common["checkpoint_version"] >= 3.0
    assert (a.num_layers, a.hidden_size, a.num_attention_heads) == (
        hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads)
    assert a.num_query_groups == hf.num_key_value_heads
    assert a.group_query_attention == (hf.num_key_value_heads != hf.num_attention_heads)
    assert a.max_position_embeddings == hf.max_position_embeddings and a.padded_vocab_size == hf.vocab_size
    assert a.untie_embeddings_and_output_weights == (not hf.tie_word_embeddings) and a.swiglu
    assert a.normalization == "RMSNorm" and a.norm_epsilon == hf.rms_norm_eps
    experts = {"llama": None, "mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts"}[family]
    assert a.num_experts == (getattr(hf, experts) if experts else None)
    if experts:
        assert a.moe_router_topk == hf.num_experts_per_tok
    else:
        assert a.ffn_hidden_size == hf.intermediate_size
    assert a.multi_latent_attention == (family == "deepseek_v3")
    if family == "deepseek_v3":
        assert (a.q_lora_rank, a.kv_lora_rank, a.v_head_dim) == (hf.q_lora_rank, hf.kv_lora_rank, hf.v_head_dim)


def _tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _patched(src, dst: Path, **fields) -> Path:
    """A copy of the HF directory ``src`` whose config.json has ``fields`` set."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **fields}))
    return dst


@pytest.mark.parametrize("family,fields,msg", [
    ("qwen3", {"rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}},
     r"qwen3: rope_parameters.rope_type 'dynamic' is not supported"),
    ("mixtral", {"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
     r"mixtral: rope_parameters.rope_type 'linear' is not supported"),
    ("mixtral", {"sliding_window": 8}, r"sliding-window attention \(sliding_window=8 < max_position_embeddings=512"),
    ("qwen3_moe", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0,
                   "layer_types": ["sliding_attention"] * 4}, r"qwen3_moe: sliding-window attention"),
    ("llama", {"hidden_act": "gelu"}, r"llama: hidden_act 'gelu' is not supported"),
    ("llama", {"mlp_bias": True}, r"llama: mlp_bias=true is not supported"),
    ("deepseek_v3", {"rope_interleave": False}, r"deepseek_v3: rope_interleave=false is not supported"),
    ("mixtral", {"num_experts_per_tok": 1}, r"mixtral: num_experts_per_tok=1 with a renormalised"),
    ("qwen3_moe", {"num_experts_per_tok": 1}, r"qwen3_moe: num_experts_per_tok=1 with a renormalised"),
])
def test_configs_megatron_would_compute_differently_are_refused_by_field(cli, capsys, tiny_hf_dirs, tmp_path,
                                                                         family, fields, msg):
    """Each of these converts into a model whose logits differ from transformers' (measured:
    diffs of 1 to 7 on the tiny models: plain RoPE for NTK scaling, full attention past the window,
    SiLU for GELU, weight p for a renormalised top-1 expert, interleaved RoPE read as
    contiguous): refused before anything is written, naming the field."""
    src = _patched(tiny_hf_dirs[family], tmp_path / "src", **fields)
    rc, err = run(cli, capsys, "--input", src, "--output", tmp_path / "o", "--to", "mcore")
    assert rc == 2 and re.search(msg, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_top1_without_renormalisation_still_converts(cli, capsys, tiny_hf_dirs, tmp_path):
    """Qwen3-MoE top-1 with norm_topk_prob=false weights the expert by its probability, which
    is Megatron's pre-softmax top-1: allowed."""
    src = _patched(tiny_hf_dirs["qwen3_moe"], tmp_path / "src", num_experts_per_tok=1, norm_topk_prob=False)
    rc, err = run(cli, capsys, "--input", src, "--output", tmp_path / "o", "--to", "mcore")
    assert rc == 0, err


def test_bf16_deepseek_keeps_its_float32_router_both_ways(tiny_hf_dirs, tmp_path):
    """transformers saves DeepSeek-V3's router weight and score-correction bias in float32
    inside a bf16 model. HF -> mcore keeps them float32 in the checkpoint (Megatron casts on
    load) and mcore -> HF writes them back float32: the round trip is bitwise, dtypes
    included (casting them to bf16 flipped routing: logits off by 3.6 in the audit)."""
    import torch
    import transformers as tf
    from safetensors.torch import load_file

    from moe_rl.checkpoint import megatron_format as mf
    from moe_rl.checkpoint.convert import convert

    src = tmp_path / "bf16"
    tf.AutoModelForCausalLM.from_pretrained(tiny_hf_dirs["deepseek_v3"], dtype=torch.bfloat16).save_pretrained(src)
    orig = load_file(str(src / "model.safetensors"))
    fp32 = sorted(k for k, v in orig.items() if v.dtype == torch.float32)
    assert fp32 and all(k.endswith(("mlp.gate.weight", "gate.e_score_correction_bias")) for k in fp32), fp32
    convert(src, tmp_path / "mcore", to="mcore")
    stored = mf.stored_dtypes(mf.iteration_dir(tmp_path / "mcore"))
    routers = {k: v for k, v in stored.items() if "router" in k}
    assert routers and all(v == torch.float32 for v in routers.values()), routers
    assert mf.stored_dtype(mf.iteration_dir(tmp_path / "mcore")) == torch.bfloat16
    convert(tmp_path / "mcore", tmp_path / "back", to="hf")
    back = _tensors(tmp_path / "back")
    assert set(back) == set(orig)
    bad = [k for k in orig if back[k].dtype != orig[k].dtype or not torch.equal(back[k], orig[k])]
    assert not bad, bad[:5]
    # an explicit --dtype casts every tensor but the expert bias, which Megatron holds in float32
    convert(src, tmp_path / "mcore16", to="mcore", dtype="bfloat16")
    convert(tmp_path / "mcore16", tmp_path / "back16", to="hf")
    b16 = _tensors(tmp_path / "back16")
    assert {k for k, v in b16.items() if v.dtype == torch.float32} == {
        k for k in orig if k.endswith("e_score_correction_bias")}


def test_tensors_transformers_skips_are_left_out_and_said(cli, capsys, tiny_hf_dirs, tmp_path):
    """A tied checkpoint that still stores lm_head.weight, a rotary inv_freq buffer and a
    DeepSeek multi-token-prediction layer load in transformers (which skips them); the
    converter leaves them out too and says so, rather than refusing the checkpoint."""
    import torch
    from safetensors.torch import load_file, save_file

    src = _patched(tiny_hf_dirs["deepseek_v3"], tmp_path / "src", tie_word_embeddings=True, num_nextn_predict_layers=1)
    t = load_file(str(src / "model.safetensors"))
    del t["lm_head.weight"]
    extra = {"lm_head.weight": t["model.embed_tokens.weight"].clone(),
             "model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(4),
             "model.layers.4.eh_proj.weight": torch.rand(64, 128),
             "model.layers.4.mlp.experts.0.up_proj.weight": torch.rand(32, 64)}
    save_file({**t, **extra}, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert cli(["--no-progress", "--input", str(src), "--output", str(tmp_path / "m"), "--to", "mcore"]) == 0
    out = capsys.readouterr().out
    assert "left out 4 input tensors that transformers skips too" in out, out
    assert cli(["--no-progress", "--input", str(tmp_path / "m"), "--output", str(tmp_path / "b"), "--to", "hf"]) == 0
    back = _tensors(tmp_path / "b")
    assert set(back) == set(t) and all(torch.equal(back[k], t[k]) for k in t)
    # a layer index past the decoder without num_nextn_predict_layers is still an error
    plain = _patched(tiny_hf_dirs["qwen3"], tmp_path / "plain")
    t = load_file(str(plain / "model.safetensors"))
    save_file({**t, "model.layers.4.mlp.up_proj.weight": torch.rand(128, 64)}, str(plain / "model.safetensors"),
              metadata={"format": "pt"})
    rc, err = run(cli, capsys, "--input", plain, "--output", tmp_path / "o", "--to", "mcore")
    assert rc == 2 and "1 tensors are not part of the model, e.g. model.layers.4.mlp.up_proj.weight" in err, err


# ------------------------------------------------------------------ fine-grained FP8 input

FP8_BLOCK = (16, 32)  # rows, columns: the tiny DeepSeek's 40-row kv_a_proj ends in a partial block


def _fp8_checkpoint(src: Path, dst: Path, block=FP8_BLOCK) -> dict:
    """``src`` (bf16) quantized the way DeepSeek-V3's FP8 release is: each attention and MLP
    projection (experts and shared experts included; not norms, embeddings, lm_head or the
    router) to float8_e4m3 in blocks, ``weight_scale_inv`` = block amax / 448, the config
    carrying ``quantization_config``. Returns {weight: (float8, scale)}."""
    import torch
    from safetensors.torch import save_file

    t = _tensors(src)
    quantized = {}
    for name in sorted(t):
        if not re.search(r"\.layers\.\d+\.(self_attn|mlp)\..*_proj(_with_mqa)?\.weight$", name):
            continue
        w = t[name].float()
        rows, cols = w.shape
        gr, gc = -(-rows // block[0]), -(-cols // block[1])
        scale = torch.empty(gr, gc)
        q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
        for i in range(gr):
            for j in range(gc):
                blk = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
                scale[i, j] = w[blk].abs().max().clamp(min=1e-12) / 448.0
                q[blk] = (w[blk] / scale[i, j]).to(torch.float8_e4m3fn)
        t[name], t[name + "_scale_inv"] = q, scale
        quantized[name] = (q, scale)
    dst.mkdir()
    save_file(t, str(dst / "model.safetensors"))
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))
    return quantized


def test_fp8_checkpoint_is_dequantized_as_transformers_does_to_either_target(cli, capsys, tiny_hf_dirs, tmp_path):
    """An FP8 block-quantized checkpoint converts to bf16: every float8 weight equals
    transformers' own block dequantization (float32 product, rounded once to bf16), partial
    blocks included; every other tensor is unchanged; no scale tensor and no
    quantization_config reach the output, HF -> HF and HF -> mcore -> HF alike."""
    import torch
    import transformers as tf
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    bf16 = tmp_path / "bf16"
    tf.AutoModelForCausalLM.from_pretrained(tiny_hf_dirs["deepseek_v3"], dtype=torch.bfloat16).save_pretrained(bf16)
    src = tmp_path / "fp8"
    quantized = _fp8_checkpoint(bf16, src)
    assert any(q.shape[0] % FP8_BLOCK[0] for q, _ in quantized.values())  # a partial block is exercised
    want = _tensors(bf16)
    for name, (q, s) in quantized.items():
        want[name] = _dequantize_fp8_weight(q.clone(), s, list(FP8_BLOCK), torch.float32).to(torch.bfloat16)

    rc, _ = run(cli, capsys, "--input", src, "--output", tmp_path / "hf", "--to", "hf")
    assert rc == 0
    rc, _ = run(cli, capsys, "--input", src, "--output", tmp_path / "mcore", "--to", "mcore")
    assert rc == 0
    rc, _ = run(cli, capsys, "--input", tmp_path / "mcore", "--output", tmp_path / "back", "--to", "hf")
    assert rc == 0
    for d in ("hf", "back"):
        got = _tensors(tmp_path / d)
        assert set(got) == set(want), sorted(set(got) ^ set(want))[:4]
        bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
        assert not bad, (d, bad[:4])
        assert "quantization_config" not in json.loads((tmp_path / d / "config.json").read_text())
    assert "quantization_config" not in json.loads((tmp_path / "mcore" / "hf" / "config.json").read_text())
    # dequantizing is not a no-op: the float8 values differ from the bf16 weights they came from
    orig = _tensors(bf16)
    assert any(not torch.equal(want[k], orig[k]) for k in quantized)


def test_fp8_cli_says_what_it_dequantized(cli, capsys, tiny_hf_dirs, tmp_path):
    import torch
    import transformers as tf

    bf16 = tmp_path / "bf16"
    tf.AutoModelForCausalLM.from_pretrained(tiny_hf_dirs["qwen3_moe"], dtype=torch.bfloat16).save_pretrained(bf16)
    quantized = _fp8_checkpoint(bf16, tmp_path / "fp8")
    rc = cli(["--no-progress", "--input", str(tmp_path / "fp8"), "--output", str(tmp_path / "o"), "--to", "mcore"])
    out = capsys.readouterr().out
    assert rc == 0 and f"dequantized {len(quantized)} float8 tensors" in out, out


@pytest.mark.parametrize("damage, msg", [
    ("drop_scale", r"1 float8 tensors have no scale \(weight_scale_inv\), e\.g\. model\.layers\.\d+\..*proj\.weight"),
    ("bad_grid", r"weight_scale_inv has shape \[1, 1\]; .* in blocks of \[16, 32\] needs \[\d+, \d+\]"),
    ("other_method", r"quantization_config.quant_method 'gptq' is not supported"),
])
def test_fp8_checkpoints_that_cannot_be_read_are_refused_by_name(cli, capsys, tiny_hf_dirs, tmp_path, damage, msg):
    import torch
    import transformers as tf
    from safetensors.torch import load_file, save_file

    bf16 = tmp_path / "bf16"
    tf.AutoModelForCausalLM.from_pretrained(tiny_hf_dirs["qwen3_moe"], dtype=torch.bfloat16).save_pretrained(bf16)
    src = tmp_path / "fp8"
    quantized = _fp8_checkpoint(bf16, src)
    victim = sorted(quantized)[0]
    t = load_file(str(src / "model.safetensors"))
    if damage == "drop_scale":
        del t[victim + "_scale_inv"]
    elif damage == "bad_grid":
        t[victim + "_scale_inv"] = torch.ones(1, 1)
    else:
        cfg = json.loads((src / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
        (src / "config.json").write_text(json.dumps(cfg))
    save_file(t, str(src / "model.safetensors"))
    rc, err = run(cli, capsys, "--input", src, "--output", tmp_path / "o", "--to", "hf")
    assert rc == 2 and re.search(msg, err), err
    assert not (tmp_path / "o").exists()


def test_what_an_interrupted_conversion_on_this_host_left_is_removed_by_the_next(cli, capsys, tiny_hf_dirs, tmp_path):
    """A conversion killed mid-way leaves its hidden build directory (never anything under the
    output name); the next conversion to that output removes those whose process is gone."""
    import socket
    import subprocess

    host = socket.gethostname().replace(".", "_").replace("-", "_")
    dead = subprocess.Popen(["true"])  # a process that has exited: its pid names a gone conversion
    dead.wait()
    stale = tmp_path / f".out.converting-{host}-{dead.pid}-deadbeef"
    live = tmp_path / f".out.converting-{host}-{os.getpid()}-cafecafe"
    other = tmp_path / f".out.converting-otherhost-{dead.pid}-0badf00d"
    for d in (stale, live, other):
        d.mkdir()
        (d / "partial.bin").write_bytes(b"x")
    rc, err = run(cli, capsys, "--input", tiny_hf_dirs["llama"], "--output", tmp_path / "out", "--to", "mcore")
    assert rc == 0, err
    assert not stale.exists() and live.exists() and other.exists()
