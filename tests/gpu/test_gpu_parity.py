"""The parity check on GPU (NCCL, CUDA kernels, Transformer Engine specs when installed).
Skipped where no CUDA GPU exists (see tests/conftest.py)."""

import pytest

from launcher import ROOT, torchrun

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "qwen3"])
def test_check_parity_on_gpu(family):
    import torch

    n = min(torch.cuda.device_count(), 2)
    args = ["--family", family] + (["--ep", "2"] if n == 2 and family != "qwen3" else [])
    proc = torchrun(ROOT / "tools/check_parity.py", n, *args)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("max_abs_diff=")
    assert float(last.split("=")[1]) <= 1e-4
