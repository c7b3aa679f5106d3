"""``GET /metrics`` of the embedded server (``--enable-metrics``): SGLang's series, names and
labels, with values that follow the requests a client made (counted here independently)."""

from __future__ import annotations

import json
import re
import threading

import httpx
import pytest

from moe_rl.rollout.config import EmbeddedEngineConfig
from moe_rl.rollout.embedded.engine import EmbeddedEngine
from moe_rl.rollout.embedded.http_context import ServerOptions

from embedded_servers import InProcessServer

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\} (\S+)$')


def parse(text: str) -> dict:
    """{(name, frozenset(labels)): value} of a Prometheus text exposition; every sample's
    family has a TYPE line of the same name before it."""
    out, typed = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            typed[name] = kind
        elif line and not line.startswith("#"):
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.groups()
            assert name in typed, f"{name} has no TYPE line of its own name"
            pairs = frozenset(re.findall(r'([a-zA-Z_]+)="([^"]*)"', labels))
            out[(name, pairs)] = float(value)
    return out


def value(metrics: dict, name: str, **labels) -> float:
    hits = [v for (n, lab), v in metrics.items() if n == name and set(labels.items()) <= lab]
    assert len(hits) == 1, (name, labels, hits)
    return hits[0]


@pytest.fixture
def server(tiny_ckpts):
    eng = EmbeddedEngine(EmbeddedEngineConfig(model_path=tiny_ckpts["v0"], max_running=4))
    eng.start()
    srv = InProcessServer(eng, ServerOptions(enable_metrics=True, api_key="k"))
    yield srv
    srv.close()


def _scrape(srv) -> dict:
    r = httpx.get(srv.url + "/metrics", timeout=30)  # open without the API key, as SGLang
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


def test_counters_follow_the_requests_and_gauges_the_engine(server):
    auth = {"Authorization": "Bearer k"}
    m0 = _scrape(server)
    model = server.app.state.ctx.served_model_name
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:gen_throughput"):
        assert value(m0, name, model_name=model, engine_type="unified", tp_rank="0") == 0.0
    info = httpx.get(server.url + "/server_info", headers=auth, timeout=30).json()
    assert value(m0, "sglang:max_total_num_tokens") == info["max_total_num_tokens"]

    # non-streamed: 2 prompts x n=3, fixed lengths
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    r = httpx.post(server.url + "/generate", headers=auth, timeout=120, json={
        "input_ids": prompts, "sampling_params": {"max_new_tokens": 4, "n": 3, "ignore_eos": True}})
    assert r.status_code == 200
    outs = r.json()
    # streamed: one prompt, read to the end
    streamed_tokens = 0
    with httpx.stream("POST", server.url + "/generate", headers=auth, timeout=120, json={
            "input_ids": [5, 6], "stream": True, "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                streamed_tokens = json.loads(line[6:])["meta_info"]["completion_tokens"]
    m1 = _scrape(server)

    def delta(name, streaming):
        return value(m1, name, is_streaming=streaming) - value(m0, name, is_streaming=streaming)

    assert delta("sglang:num_requests_total", "false") == 6 == len(outs)
    assert delta("sglang:prompt_tokens_total", "false") == 3 * (3 + 5) == sum(o["meta_info"]["prompt_tokens"]
                                                                              for o in outs)
    assert delta("sglang:generation_tokens_total", "false") == 6 * 4 == sum(o["meta_info"]["completion_tokens"]
                                                                             for o in outs)
    assert streamed_tokens == 5
    assert delta("sglang:num_requests_total", "true") == 1
    assert delta("sglang:prompt_tokens_total", "true") == 2
    assert delta("sglang:generation_tokens_total", "true") == 5
    assert value(m1, "sglang:gen_throughput") > 0.0  # tokens were generated since the last scrape
    assert value(m1, "sglang:num_aborted_requests_total") == value(m0, "sglang:num_aborted_requests_total")


def test_paused_and_aborted_requests_show(server):
    auth = {"Authorization": "Bearer k"}
    assert httpx.post(server.url + "/pause_generation", json={"mode": "in_place"}, headers=auth,
                      timeout=30).status_code == 200
    with httpx.Client(timeout=120, headers=auth) as c:
        t = threading.Thread(target=lambda: c.post(server.url + "/generate", json={
            "input_ids": [5, 6], "rid": "held-1", "sampling_params": {"max_new_tokens": 3}}))
        t.start()
        for _ in range(200):
            if value(_scrape(server), "sglang:num_paused_reqs") == 1.0:
                break
            t.join(0.05)
        assert value(_scrape(server), "sglang:num_paused_reqs") == 1.0
        before = value(_scrape(server), "sglang:num_aborted_requests_total")
        assert httpx.post(server.url + "/abort_request", json={"rid": "held-1"}, headers=auth,
                          timeout=30).status_code == 200
        assert httpx.post(server.url + "/continue_generation", json={}, headers=auth, timeout=30).status_code == 200
        t.join(60)
    m = _scrape(server)
    assert value(m, "sglang:num_paused_reqs") == 0.0
    assert value(m, "sglang:num_aborted_requests_total") == before + 1


def sglang_load_snapshot():
    """SGLang's ``LoadSnapshot`` and its section structs, run from the installed wheel's source
    (``sglang/srt/managers/load_snapshot.py``; the module itself imports the GPU runtime)."""
    import ast
    import importlib.util
    import os
    import sys
    import types
    import typing

    msgspec = pytest.importorskip("msgspec")
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sglang wheel not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "srt", "managers", "load_snapshot.py")
    text = open(path).read()
    wanted = {"MemoryMetrics", "SpeculativeMetrics", "LoRAMetrics", "DisaggregationMetrics", "QueueMetrics",
              "LoadSnapshot", "_SECTION_FIELDS", "_CORE_KEYS"}
    mod = types.ModuleType("_sglang_load_snapshot")
    sys.modules[mod.__name__] = mod
    ns = mod.__dict__
    ns.update({"msgspec": msgspec, **{n: getattr(typing, n) for n in typing.__all__}})
    found = set()
    for node in ast.parse(text).body:  # in file order: the sections before the snapshot
        names = ({node.name} if isinstance(node, ast.ClassDef)
                 else {t.id for t in node.targets if isinstance(t, ast.Name)} if isinstance(node, ast.Assign) else set())
        if names & wanted:
            exec(ast.get_source_segment(text, node), ns)  # noqa: S102 - the installed wheel's own declarations
            found |= names & wanted
    assert found == wanted, f"{path} no longer defines {wanted - found}"
    return ns, msgspec


def test_v1_loads_is_sglangs_load_snapshot(server):
    """Each load parses as SGLang's ``LoadSnapshot`` (msgspec, strict types) and SGLang's own
    ``to_dict`` of it gives back exactly what the server sent, for each ``include``."""
    ns, msgspec = sglang_load_snapshot()
    snap_cls, sections = ns["LoadSnapshot"], {"memory": ns["MemoryMetrics"], "queues": ns["QueueMetrics"]}
    auth = {"Authorization": "Bearer k"}
    assert httpx.post(server.url + "/generate", headers=auth, timeout=120, json={
        "input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3, "n": 2}}).status_code == 200
    for include in (None, "core", "queues", "core,memory", "all"):
        body = httpx.get(server.url + "/v1/loads", params={"include": include} if include else {}, headers=auth,
                         timeout=30).json()
        assert set(body) >= {"timestamp", "version", "accelerator", "num_accelerators", "loads"}
        (load,) = body["loads"]
        core = {k: load[k] for k in ns["_CORE_KEYS"]}
        parsed = msgspec.convert(core, snap_cls)
        for name, cls in sections.items():
            if name in load:
                setattr(parsed, name, msgspec.convert(list(load[name].values()), cls))
        wanted = set(include.split(",")) if include else None
        assert parsed.to_dict(wanted) == load, include
        if include == "core":
            assert set(load) == set(ns["_CORE_KEYS"])
    assert load["max_total_num_tokens"] == httpx.get(server.url + "/server_info", headers=auth,
                                                     timeout=30).json()["max_total_num_tokens"]
    bad = httpx.get(server.url + "/v1/loads", params={"include": "core,bogus"}, headers=auth, timeout=30)
    assert bad.status_code == 400 and "Invalid include sections: {'bogus'}" in bad.json()["message"]
    assert httpx.get(server.url + "/v1/loads", params={"dp_rank": 1}, headers=auth, timeout=30).json()["loads"] == []
    prom = httpx.get(server.url + "/v1/loads", params={"format": "prometheus", "include": "core"},
                     headers=auth, timeout=30).text
    m = parse(prom)
    assert value(m, "sglang_max_running_requests", dp_rank="0") == 4.0


def test_v1_loads_follows_a_retraction(server):
    """A running sample retracted by ``/pause_generation {"mode": "retract"}`` shows as a waiting,
    retracted request whose prompt and output so far must be prefilled again."""
    auth = {"Authorization": "Bearer k"}

    def loads():
        return httpx.get(server.url + "/v1/loads", headers=auth, timeout=30).json()["loads"][0]

    with httpx.Client(timeout=120, headers=auth) as c:
        t = threading.Thread(target=lambda: c.post(server.url + "/generate", json={
            "input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}))
        t.start()
        for _ in range(400):
            if loads()["num_running_reqs"] == 1:
                break
            t.join(0.02)
        running = loads()
        assert running["num_running_reqs"] == 1 and running["num_used_tokens"] > 3
        assert httpx.post(server.url + "/pause_generation", json={"mode": "retract"}, headers=auth,
                          timeout=30).status_code == 200
        paused = loads()
        assert (paused["num_running_reqs"], paused["num_waiting_reqs"], paused["queues"]["retracted"]) == (0, 1, 1)
        assert paused["num_waiting_uncached_tokens"] > 3 and paused["num_used_tokens"] == 0
        assert httpx.post(server.url + "/continue_generation", json={}, headers=auth, timeout=30).status_code == 200
        t.join(120)
    done = loads()
    assert (done["num_running_reqs"], done["num_waiting_reqs"], done["queues"]["retracted"]) == (0, 0, 0)
