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
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert s["weights/probe_logprob_diff"] < 0.1  # the engine samples from what was trained
        assert 0.0 <= s["rollout/reward_mean"] <= 1.0
        assert s["actor/grad_norm"] > 0.0
