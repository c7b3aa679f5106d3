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


def test_router_engine_metrics_aggregates_every_worker(router, two_servers):
    """sglang-router's ``/engine_metrics`` scrapes each worker's ``/metrics`` and relabels it
    (``worker_addr``, ':' -> '_'); its parser refuses what it cannot read, so every series of
    both workers showing up is the format check. The request counts are the workers' own."""
    import re

    assert httpx.post(router.url + "/generate", json={"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}},
                      timeout=60).status_code == 200
    r = httpx.get(router.url + "/engine_metrics", timeout=30)
    assert r.status_code == 200 and r.text, "the router parsed no worker's /metrics"
    seen = {}
    for line in r.text.splitlines():
        m = re.match(r'^sglang_num_requests_total\{(.*)\} (\S+)$', line)
        if m:
            labels = dict(re.findall(r'([a-z_]+)="([^"]*)"', m.group(1)))
            seen[(labels["worker_addr"], labels["is_streaming"])] = float(m.group(2))
    for s in two_servers:
        own = httpx.get(s.url + "/metrics", timeout=30).text
        mine = sum(float(x) for x in re.findall(r'^sglang:num_requests_total\{[^}]*\} (\S+)$', own, re.M))
        assert seen[(s.url, "false")] + seen[(s.url, "true")] == mine
    assert sum(seen.values()) >= 1  # at least the request above
    for family in ("sglang_num_running_reqs", "sglang_token_usage", "sglang_generation_tokens_total"):
        assert sum(f'worker_addr="{s.url}"' in line for line in r.text.splitlines()
                   if line.startswith(family + "{") for s in two_servers) >= 2, family
