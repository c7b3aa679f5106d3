"""The RL loop on GPUs: NCCL world and Megatron groups, CUDA model, the embedded engine in each
process, weight sync every step. On CPU every host-side collective (counts, metrics, the stop
flag, the in-process weight broadcast) goes over gloo, which takes CPU tensors; on NCCL they must
cross the GPU, and only a run on GPUs shows that they do. Skipped where no CUDA GPU exists."""

from __future__ import annotations

import json

import pytest

from launcher import ROOT, torchrun

pytestmark = pytest.mark.gpu


def test_quickstart_steps_on_gpus(tmp_path):
    import torch

    n = min(torch.cuda.device_count(), 2)
    out = tmp_path / "run"
    torchrun(ROOT / "moe_rl/launch.py", n, str(ROOT / "launch/configs/quickstart.yaml"),
             f"parallel.expert_parallel={n}", "train.steps=3", "weights.probe_interval=1", f"output_dir={out}",
             "metrics.progress=false", timeout=600)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [0, 1, 2]  # optimizer steps, 0-based
    for s in steps:
        assert s["weights/probe_logprob_diff"] < 0.1  # the engine samples from what was trained
        assert 0.0 <= s["rollout/reward_mean"] <= 1.0
        assert s["actor/grad_norm"] > 0.0


def test_entropy_selection_epochs_evaluation_and_hf_checkpoint_on_gpus(tmp_path):
    """The device-tensor paths added beside the loop: the high-entropy threshold gathered over the
    data-parallel group (NCCL all_gather of CUDA tensors), the entropy bonus's gradient, two passes
    per batch, the held-out evaluation on the engines, and a final checkpoint whose hf/ transformers
    loads (the export stream written to disk from CUDA parameters)."""
    import torch
    import transformers

    n = min(torch.cuda.device_count(), 2)
    out = tmp_path / "run"
    torchrun(ROOT / "moe_rl/launch.py", n, str(ROOT / "launch/configs/quickstart.yaml"),
             f"parallel.expert_parallel={n}", "train.steps=2", "train.ppo_epochs=2", "algorithm.entropy_coeff=0.01",
             "algorithm.top_entropy_quantile=0.5", "eval.interval=1", "eval.num_prompts=32",
             "checkpoint.save_hf=true", f"output_dir={out}", "metrics.progress=false", timeout=600)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(s["step"], s["epoch"]) for s in steps] == [(0, 0), (1, 1), (2, 0), (3, 1)]
    for s in steps:
        assert 0.3 < s["actor/entropy_kept_frac"] < 0.8 and s["actor/entropy_loss"] > 0
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["policy_version"] for e in evals] == [0, 1, 2]
    hf = out / "checkpoints" / "step_00000002" / "hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf)
    assert model.config.model_type == "qwen3_moe"
