"""Real servers on 127.0.0.1 for the HTTP tests: start, wait for /health, kill the process group."""

from __future__ import annotations

import pytest

from embedded_servers import ServerProc, free_port, start_embedded  # noqa: F401


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """The tiny qwen3_moe checkpoint (seed 0) and a second one with other weights (seed 1)."""
    from moe_rl.models.tiny import save_tiny_hf

    root = tmp_path_factory.mktemp("ckpt")
    return {"v0": save_tiny_hf("qwen3_moe", root / "v0", seed=0), "v1": save_tiny_hf("qwen3_moe", root / "v1", seed=1)}


@pytest.fixture(scope="module")
def two_servers(tiny_ckpts, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    servers = [start_embedded(tiny_ckpts["v0"], logs, name=f"s{i}", extra=("--enable-metrics",)) for i in range(2)]
    try:
        for s in servers:
            s.wait_healthy()
        yield servers
    finally:
        for s in servers:
            s.kill()
