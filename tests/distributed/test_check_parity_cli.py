"""tools/check_parity.py as a user runs it: last line ``max_abs_diff=<x>``, exit 0 within the
tolerance, 1 above it, 2 with a clear message for a layout that cannot work."""

import pytest

from launcher import ROOT, torchrun

pytestmark = pytest.mark.distributed
TOOL = ROOT / "tools/check_parity.py"


def _last(proc):
    return proc.stdout.strip().splitlines()[-1]


def test_parity_ok_on_an_hf_dir(tiny_hf_dirs):
    proc = torchrun(TOOL, 2, "--hf-dir", str(tiny_hf_dirs["mixtral"]), "--ep", "2")
    last = _last(proc)
    assert last.startswith("max_abs_diff=") and float(last.split("=")[1]) <= 1e-4, proc.stdout


def test_above_tolerance_exits_1():
    proc = torchrun(TOOL, 2, "--family", "qwen3", "--tp", "2", "--tolerance", "1e-12", check=False)
    assert proc.returncode != 0
    assert "exitcode  : 1" in proc.stderr or "exitcode: 1" in proc.stderr.replace(" ", ""), proc.stderr[-2000:]
    last = _last(proc)
    assert last.startswith("max_abs_diff=") and float(last.split("=")[1]) > 1e-12


def test_impossible_layout_is_a_clear_error():
    proc = torchrun(TOOL, 2, "--family", "qwen3_moe", "--ep", "4", check=False)
    assert proc.returncode != 0
    assert "expert_parallel (4)" in proc.stderr, proc.stderr[-2000:]


def test_three_layers_at_pp2_and_impossible_splits(tmp_path):
    """The user's case: a 3-layer checkpoint made by transformers alone at --pp 2 (balanced
    split [1, 2]), then splits that cannot work, refused with their numbers (exit 2)."""
    from moe_rl.models.tiny import save_tiny_hf

    hf_dir = save_tiny_hf("qwen3_moe", tmp_path / "three", num_hidden_layers=3)
    proc = torchrun(TOOL, 2, "--hf-dir", hf_dir, "--pp", "2")
    last = _last(proc)
    assert last.startswith("max_abs_diff=") and float(last.split("=")[1]) <= 1e-4, proc.stdout
    assert "PP2" in proc.stdout
    proc = torchrun(TOOL, 2, "--hf-dir", hf_dir, "--pp", "2", "--vpp", "2", check=False)
    assert proc.returncode != 0
    assert "pipeline_parallel (2) x virtual_pipeline (2) = 4 stages need at least 4 layers" in proc.stderr, \
        proc.stderr[-2000:]


# RoPE scalings of released checkpoints. Llama 3.1 (factor 8, low/high frequency factors 1
# and 4, original context 8192, theta 500000): with head_dim 16 one frequency pair falls in
# the smoothed band (wavelength 4443 -> 11971). DeepSeek-V3's YaRN (beta 32/1, mscale and
# mscale_all_dim 1) with the original context shrunk to 64 so that 256 positions exceed it.
# Qwen3's YaRN (factor 4, the default betas and attention factor) through GPTModel's YaRN
# embedding, with the original context shrunk to 64 the same way.
# In each, at 256 positions the scaled and the plain RoPE disagree by far more than the
# tolerance (measured 0.62, 5.6 and 5.5), so the check is decisive.
SCALED_ROPE = {
    "llama": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}, 500000.0),
    "deepseek_v3": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "rope_theta": 10000.0}, 10000.0),
    "qwen3_moe": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                   "rope_theta": 10000.0}, 10000.0),
}


@pytest.mark.parametrize("family", sorted(SCALED_ROPE))
def test_scaled_rope_matches_transformers(tmp_path, family):
    import torch
    import transformers

    from moe_rl.models.tiny import save_tiny_hf

    rope, theta = SCALED_ROPE[family]
    scaled = save_tiny_hf(family, tmp_path / "scaled", rope_parameters=rope, max_position_embeddings=256)
    plain = save_tiny_hf(family, tmp_path / "plain", max_position_embeddings=256,
                         rope_parameters={"rope_type": "default", "rope_theta": theta})
    tokens = torch.randint(3, 512, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = (transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)(tokens).logits
                for d in (scaled, plain))
    assert (a - b).abs().max() > 1e-2
    proc = torchrun(TOOL, 2, "--hf-dir", scaled, "--tp", "2", "--seq", "256")
    last = _last(proc)
    assert last.startswith("max_abs_diff=") and float(last.split("=")[1]) <= 1e-4, proc.stdout
