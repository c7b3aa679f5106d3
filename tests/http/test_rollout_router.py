"""The real sglang-router (PyPI sglang-router 0.3.2) in front of two embedded servers."""

from __future__ import annotations

import shutil
import sys

import httpx
import pytest

from moe_rl.rollout.client import RolloutClient
from moe_rl.rollout.config import ClientConfig
from moe_rl.rollout.sglang_backend import router_command
from moe_rl.rollout.types import RolloutRequest, SamplingParams

from embedded_servers import ServerProc, free_port

pytest.importorskip("sglang_router", reason="sglang-router not installed (pip install sglang-router==0.3.2)")


@pytest.fixture(scope="module")
def router(two_servers, tmp_path_factory):
    port = free_port()
    argv = router_command([s.url for s in two_servers], port=port, python=sys.executable,
                          prometheus_port=free_port())
    proc = ServerProc(argv, f"http://127.0.0.1:{port}", str(tmp_path_factory.mktemp("router") / "router.log"))
    try:
        proc.wait_healthy(60, path="/readiness")
        yield proc
    finally:
        proc.kill()


def test_generate_through_router(router, two_servers):
    client = RolloutClient(ClientConfig(server_urls=[s.url for s in two_servers], router_url=router.url,
                                        return_routed_experts=False, max_concurrency=4))
    reqs = [RolloutRequest([5 + i, 6, 7], SamplingParams(max_new_tokens=4, ignore_eos=True, n=2), group_id=i)
            for i in range(6)]
    samples = client.generate(reqs)
    assert sorted((s.group_id, s.sample_index) for s in samples) == [(g, j) for g in range(6) for j in range(2)]
    assert all(len(s.response_ids) == 4 and s.routed_experts_NLK is None for s in samples)
    counts = [httpx.get(s.url + "/server_info").json()["internal_states"][0]["num_generate_requests"]
              for s in two_servers]
    assert all(c > 0 for c in counts), f"router sent nothing to one worker: {counts}"
    # the stock router re-serialises the body and drops return_routed_experts
    direct = httpx.post(two_servers[0].url + "/generate", json={"input_ids": [5, 6], "return_routed_experts": True,
                        "sampling_params": {"max_new_tokens": 2}}, timeout=30).json()
    routed = httpx.post(router.url + "/generate", json={"input_ids": [5, 6], "return_routed_experts": True,
                        "sampling_params": {"max_new_tokens": 2}}, timeout=30).json()
    assert "routed_experts" in direct["meta_info"] and "routed_experts" not in routed["meta_info"]
    # control calls are not proxied by the router: the client sends them to each worker
    assert httpx.post(router.url + "/pause_generation", json={}, timeout=10).status_code == 404
    client.pause()
    client.continue_generation()
