"""The embedded server against a broken engine and a hostile or careless client.

Faults are injected into the engine's forward in this process (the server runs in a thread
over it), so each case shows what a client sees: a 5xx naming the error at once, never a
request that waits forever; health that tells the truth; control calls that time out
without taking effect later; limits on what a request may make the server allocate.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from moe_rl.rollout import routed_experts_codec
from moe_rl.rollout.client import RolloutClient
from moe_rl.rollout.config import ClientConfig, EmbeddedEngineConfig
from moe_rl.rollout.embedded.engine import EmbeddedEngine
from moe_rl.rollout.embedded.http_context import ServerOptions
from moe_rl.rollout.embedded.server import parse_args
from moe_rl.rollout.types import RolloutRequest, SamplingParams

from embedded_servers import InProcessServer, free_port, post_generate, start_embedded

LONG = {"max_new_tokens": 400, "temperature": 1.0, "ignore_eos": True}


class Fault:
    """Wraps ``model.forward``: raises ``RuntimeError(message)`` once armed."""

    def __init__(self, engine: EmbeddedEngine, message: str, on_prefill_only: bool = False) -> None:
        self.armed = False
        self.message = message
        forward = engine.model.forward

        def faulty(*a, **kw):
            if self.armed and (not on_prefill_only or "logits_to_keep" in kw):
                raise RuntimeError(message)
            return forward(*a, **kw)

        engine.model.forward = faulty


def _engine(path, **kw) -> EmbeddedEngine:
    eng = EmbeddedEngine(EmbeddedEngineConfig(model_path=path, max_running=4, **kw))
    eng.start()
    return eng


@pytest.fixture
def served(tiny_ckpts):
    servers = []

    def make(options=None, **kw):
        s = InProcessServer(_engine(tiny_ckpts["v0"], **kw), options)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def _post_async(url, body, out, timeout=60):
    def run():
        try:
            out.append(httpx.post(url + "/generate", json=body, timeout=timeout))
        except httpx.HTTPError as e:
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_engine_error_fails_pending_and_later_requests_and_health(served, tiny_ckpts):
    srv = served()
    fault = Fault(srv.engine, "injected fault in forward")
    assert httpx.get(srv.url + "/health_generate", timeout=30).status_code == 200
    out: list = []
    t = _post_async(srv.url, {"input_ids": [5, 6, 7], "sampling_params": {**LONG, "n": 3}}, out)
    time.sleep(0.5)
    fault.armed = True
    t.join(timeout=20)
    assert out, "the pending request never returned"
    r = out[0]
    assert r.status_code == 500 and "injected fault in forward" in r.text, r.text
    # later requests fail at once, with the same reason; health says so
    t0 = time.monotonic()
    r = httpx.post(srv.url + "/generate", json={"input_ids": [5], "sampling_params": LONG}, timeout=20)
    assert r.status_code >= 500 and "injected fault in forward" in r.text
    assert time.monotonic() - t0 < 5
    for path in ("/health", "/health_generate"):
        h = httpx.get(srv.url + path, timeout=20)
        assert h.status_code == 503 and "injected fault in forward" in h.text, (path, h.text)
    assert httpx.post(srv.url + "/pause_generation", json={}, timeout=20).status_code == 503
    # the client does not wait on it: it fails over to a healthy server
    good = served()
    client = RolloutClient(ClientConfig(server_urls=[srv.url, good.url], max_attempts=4))
    samples = client.generate([RolloutRequest([5, 6, 7], SamplingParams(max_new_tokens=3, n=2), group_id=i)
                               for i in range(3)])
    assert len(samples) == 6 and all(len(s.response_ids) == 3 for s in samples)


def test_failing_prefill_finishes_the_request_it_admitted(served):
    srv = served()
    Fault(srv.engine, "prefill exploded", on_prefill_only=True).armed = True
    r = httpx.post(srv.url + "/generate", json={"input_ids": [5, 6], "sampling_params": LONG}, timeout=20)
    assert r.status_code == 500 and "prefill exploded" in r.text
    assert srv.engine.num_waiting == 0 and srv.engine.num_running == 0


BAD_VALUES = [
    (b'{"input_ids": [5, 6], "rid": "\xff\xfe"}', "not UTF-8"),
    (b'{"input_ids": [5, 6], "sampling_params": {"temperature": NaN}}', "finite"),
    (b'{"input_ids": [5, 6], "sampling_params": {"temperature": Infinity}}', "finite"),
    (b'{"input_ids": [5, 6], "sampling_params": {"top_p": NaN}}', "top_p"),
    (b'{"input_ids": [5, 6], "sampling_params": {"sampling_seed": 1180591620717411303424}}', "sampling_seed"),
    # SGLang's range, [-2**63, 2**63 - 1]
    (b'{"input_ids": [5, 6], "sampling_params": {"sampling_seed": 9223372036854775808}}',
     "sampling_seed must be in [-2**63, 2**63 - 1], got 9223372036854775808."),
    (b'{"input_ids": [5, 6], "sampling_params": {"sampling_seed": -9223372036854775809}}',
     "sampling_seed must be in [-2**63, 2**63 - 1], got -9223372036854775809."),
    # finite in JSON, inf in fp32 (the row's logits would turn NaN)
    (b'{"input_ids": [5, 6], "sampling_params": {"logit_bias": {"5": 1e300}}}', "logit_bias['5']=1e+300 (token 5)"),
    (b'{"input_ids": [5, 6], "sampling_params": {"logit_bias": {"7": -1e39}}}', "logit_bias['7']=-1e+39 (token 7)"),
    (b'{"input_ids": [5, 6], "sampling_params": {"logit_bias": {"7": 1' + b"0" * 400 + b'}}}', "(token 7)"),
    (b'{"input_ids": [5, 6], "sampling_params": {"temperature": 1' + b"0" * 400 + b'}}', "temperature (1000"),
    # SGLang's priority: an integer (its contract) in signed 64 bits (its tokenizer manager)
    (b'{"input_ids": [5, 6], "priority": "x"}', "priority must be an integer"),
    (b'{"input_ids": [5, 6], "priority": "5"}', "priority must be an integer"),
    (b'{"input_ids": [5, 6], "priority": 1.5}', "priority must be an integer"),
    (b'{"input_ids": [5, 6], "priority": true}', "priority must be an integer"),
    (b'{"input_ids": [5, 6], "priority": 9223372036854775808}', "priority must be a signed 64-bit integer"),
    (b'{"input_ids": [5, 6], "sampling_params": {"ignore_eos": "false"}}', "ignore_eos must be a boolean"),
    (b'{"input_ids": [5, 6], "return_logprob": "yes"}', "return_logprob must be a boolean"),
    (b'{"input_ids": [5, 6], "return_logprob": [1]}', "return_logprob must be a boolean"),
    (b'{"input_ids": [5, 6], "return_routed_experts": "no"}', "return_routed_experts must be a boolean"),
    (b'{"input_ids": [5, 6], "stream": "false"}', "stream must be a boolean"),
    (b'{"input_ids": [5, 6], "sampling_params": {"skip_special_tokens": 0}}', "must be a boolean"),
    (b'{"input_ids": [5, 6], "sampling_params": {"n": 1180591620717411303424}}', "at most"),
    (b'{"input_ids": [[5], [6]], "sampling_params": {"n": 3000}}', "at most"),
]


def test_bad_values_are_400_and_never_touch_other_requests(two_servers):
    url = two_servers[0].url
    out: list = []
    t = _post_async(url, {"input_ids": [9, 8, 7], "sampling_params": {**LONG, "max_new_tokens": 60, "n": 2}}, out)
    for raw, msg in BAD_VALUES:
        r = httpx.post(url + "/generate", content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 400 and msg in r.text, (raw, r.status_code, r.text)
    # a body that is not UTF-8: FastAPI's HTTPException, which SGLang answers with ErrorResponse type "400"
    r = httpx.post(url + "/generate", content=BAD_VALUES[0][0], timeout=30)
    assert {k: r.json()[k] for k in ("object", "type", "code")} == {"object": "error", "type": "400", "code": 400}
    # top_k beyond any vocabulary means "all tokens" (no overflow inside the engine)
    r = httpx.post(url + "/generate", json={"input_ids": [5, 6], "sampling_params": {
        "max_new_tokens": 4, "top_k": 2 ** 70, "sampling_seed": 3}}, timeout=30)
    ref = httpx.post(url + "/generate", json={"input_ids": [5, 6], "sampling_params": {
        "max_new_tokens": 4, "sampling_seed": 3}}, timeout=30)
    assert r.status_code == 200 and r.json()["output_ids"] == ref.json()["output_ids"]
    t.join(timeout=60)
    assert out and out[0].status_code == 200 and len(out[0].json()) == 2
    assert all(len(x["output_ids"]) == 60 for x in out[0].json())


@pytest.mark.parametrize("key", ["temperature", "n", "top_k", "top_p", "min_p", "ignore_eos"])
def test_sampling_params_type_errors_have_sglangs_flat_shape(two_servers, key):
    """A sampling_params value of the wrong JSON type fails SGLang's API contract, which answers
    400 ``{"error": "<text>"}`` (a string, not ``{"message": ...}``), naming the field and value."""
    r = httpx.post(two_servers[0].url + "/generate", json={"input_ids": [5, 6], "sampling_params": {key: "x"}},
                   timeout=30)
    body = r.json()
    assert r.status_code == 400 and set(body) - {"weight_version"} == {"error"}, r.text
    assert isinstance(body["error"], str) and f"sampling_params.{key}" in body["error"] and "'x'" in body["error"]


def test_priority_and_negative_seeds_are_served(two_servers):
    """SGLang takes any signed 64-bit ``priority`` (ignored here) and ``sampling_seed``; a
    negative seed samples reproducibly, and otherwise than its absolute value."""
    url = two_servers[0].url
    for priority in (7, -3, None, 2 ** 63 - 1, -(2 ** 63)):
        post_generate(two_servers[0], {"input_ids": [5, 6], "priority": priority,
                                       "sampling_params": {"max_new_tokens": 2}})
    outs = {}
    for seed in (-5, -5, 5, -(2 ** 63), 2 ** 63 - 1):
        r = httpx.post(url + "/generate", json={"input_ids": [4, 5, 6], "sampling_params": {
            "max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True, "sampling_seed": seed}}, timeout=30)
        assert r.status_code == 200, r.text
        assert outs.setdefault(seed, r.json()["output_ids"]) == r.json()["output_ids"]
    assert outs[-5] != outs[5]


def test_tiny_temperature_is_greedy_at_temperature_one(two_servers):
    """SGLang's rule: ``0 <= temperature < 1e-6`` is greedy, scored at temperature 1. So 1e-40
    and 1e-7 answer what temperature 0 answers, with log-probs or not, plain or streamed (1e-40
    used to divide the logits into NaN: a 500 with log-probs, garbage ids, a cut stream)."""
    url = two_servers[0].url

    def body(t, **kw):
        return {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 6, "temperature": t,
                                                            "ignore_eos": True}, **kw}

    ref = post_generate(two_servers[0], body(0, return_logprob=True))
    for t in (1e-40, 1e-7):
        got = post_generate(two_servers[0], body(t, return_logprob=True))
        assert got["output_ids"] == ref["output_ids"], t
        for g, w in zip(got["meta_info"]["output_token_logprobs"], ref["meta_info"]["output_token_logprobs"]):
            assert g[1] == w[1] and g[0] == pytest.approx(w[0], abs=1e-6), (t, g, w)
        assert post_generate(two_servers[0], body(t))["output_ids"] == ref["output_ids"]
        r = httpx.post(url + "/generate", json=body(t, stream=True, return_logprob=True), timeout=30)
        assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n"), r.text
        last = json.loads(r.content.split(b"\n\n")[-3].removeprefix(b"data: "))
        assert last["output_ids"] == ref["output_ids"] and last["meta_info"]["finish_reason"]["type"] == "length"


def test_deeply_nested_body_is_a_400(two_servers):
    """JSON nested past Python's recursion limit cannot be decoded: FastAPI's "There was an
    error parsing the body" (an HTTPException, SGLang's ErrorResponse type "400"), not a 500.
    Bodies nested just below the limit are refused as values of the wrong type."""
    url = two_servers[0].url
    raw = b'{"input_ids":' + b"[" * 100000 + b"]" * 100000 + b"}"
    r = httpx.post(url + "/generate", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, r.text
    assert {k: r.json()[k] for k in ("object", "type", "code")} == {"object": "error", "type": "400", "code": 400}
    assert "There was an error parsing the body" in r.json()["message"]
    # an integer of more digits than Python's int() reads (4300) fails the parse the same way
    raw = b'{"input_ids": [5], "sampling_params": {"sampling_seed": 1' + b"0" * 5000 + b"}}"
    r = httpx.post(url + "/generate", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["type"] == "400", r.text
    assert "There was an error parsing the body" in r.json()["message"]
    for depth in (900, 980, 995, 999):
        for field in ("input_ids", "rid", "priority", "sampling_params"):
            raw = b'{"input_ids":[5],"' + field.encode() + b'":' + b"[" * depth + b"]" * depth + b"}"
            r = httpx.post(url + "/generate", content=raw, headers={"content-type": "application/json"}, timeout=30)
            assert r.status_code == 400, (field, depth, r.text[:200])


def test_json_replies_write_non_finite_floats_as_null():
    """SGLang's orjson writes NaN and +-Infinity as null; so does the embedded server's encoder,
    in Starlette's compact format, and a reply with only finite floats is unchanged."""
    from moe_rl.rollout.embedded.http_context import json_bytes

    obj = {"a": [1.5, float("-inf"), (float("nan"), 2)], "b": {"c": float("inf"), "d": "é"}, "e": None}
    assert json_bytes(obj) == '{"a":[1.5,null,[null,2]],"b":{"c":null,"d":"é"},"e":null}'.encode()
    fine = {"x": [0.1, -3e38, 7], "y": "ü"}
    assert json_bytes(fine) == json.dumps(fine, ensure_ascii=False, separators=(",", ":")).encode()


def test_minus_inf_logprobs_are_null_not_a_500(two_servers):
    """A token biased far below the rest, over temperature 0.5, has log-prob -inf in fp32; the
    reply writes it as null, as SGLang's orjson does, plain and streamed, instead of failing
    with "Out of range float values are not JSON compliant"."""
    url = two_servers[0].url
    body = {"input_ids": [5, 6, 7], "return_logprob": True, "token_ids_logprob": [9],
            "sampling_params": {"max_new_tokens": 3, "temperature": 0.5, "ignore_eos": True,
                                "logit_bias": {"9": -3e38}}}
    got = post_generate(two_servers[0], body)
    assert got["meta_info"]["output_token_ids_logprobs"] == [[[None, 9, None]]] * 3
    r = httpx.post(url + "/generate", json={**body, "stream": True}, timeout=30)
    assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n"), r.text
    last = json.loads(r.content.split(b"\n\n")[-3].removeprefix(b"data: "))
    assert last["meta_info"]["output_token_ids_logprobs"] == [[[None, 9, None]]] * 3


def test_seeded_group_samples_differ_and_sample_zero_is_n1(two_servers):
    url = two_servers[0].url
    sp = {"max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True, "sampling_seed": 11}
    many = httpx.post(url + "/generate", json={"input_ids": [4, 5, 6], "sampling_params": {**sp, "n": 4}},
                      timeout=30).json()
    one = httpx.post(url + "/generate", json={"input_ids": [4, 5, 6], "sampling_params": sp}, timeout=30).json()
    again = httpx.post(url + "/generate", json={"input_ids": [4, 5, 6], "sampling_params": {**sp, "n": 4}},
                       timeout=30).json()
    outs = [tuple(m["output_ids"]) for m in many]
    assert len(set(outs)) == 4, outs
    assert outs[0] == tuple(one["output_ids"])
    assert outs == [tuple(m["output_ids"]) for m in again]  # still reproducible


def test_zero_new_tokens_returns_the_prompts_routes(two_servers):
    url = two_servers[0].url
    prompt = [7, 3, 9, 4, 2]
    info = httpx.get(url + "/model_info", timeout=10).json()
    body = {"input_ids": prompt, "return_routed_experts": True}
    zero = httpx.post(url + "/generate", json={**body, "sampling_params": {"max_new_tokens": 0}}, timeout=30).json()
    one = httpx.post(url + "/generate", json={**body, "sampling_params": {"max_new_tokens": 1, "temperature": 0}},
                     timeout=30).json()
    dec = [routed_experts_codec.decode(x["meta_info"]["routed_experts"], info["num_hidden_layers"],
                                       info["num_experts_per_tok"], info["moe_layer_ids"]) for x in (zero, one)]
    assert zero["output_ids"] == [] and dec[0].shape[0] == len(prompt) - 1
    assert torch.equal(dec[0], dec[1][: len(prompt) - 1])  # SGLang: prompt + completion - 1 rows


def test_client_that_hangs_up_leaves_nothing_queued(two_servers):
    url = two_servers[1].url
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"input_ids": [5, 6, 7], "sampling_params": {**LONG, "n": 100}}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(1.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        st = httpx.get(url + "/server_info", timeout=10).json()["internal_states"][0]
        if st["num_running_reqs"] == 0 and st["num_waiting_reqs"] == 0:
            break
        time.sleep(0.1)
    assert st["num_running_reqs"] == 0 and st["num_waiting_reqs"] == 0, st


def test_control_call_that_timed_out_never_takes_effect(served, tiny_ckpts):
    srv = served(ServerOptions(control_timeout_s=1.0))
    forward = srv.engine.model.forward

    def slow(*a, **kw):  # 300 steps take >= 3 s, well past the 1 s control deadline
        time.sleep(0.01)
        return forward(*a, **kw)

    srv.engine.model.forward = slow
    out: list = []
    t = _post_async(srv.url, {"input_ids": [5, 6], "sampling_params": {**LONG, "max_new_tokens": 300}}, out)
    time.sleep(0.3)
    # a weight update on an unpaused engine waits for running requests (SGLang's writer lock)
    r = httpx.post(srv.url + "/update_weight_version", json={"new_version": "late", "abort_all_requests": False},
                   timeout=30)
    assert r.status_code == 200  # runs between two steps: never blocked
    from moe_rl.weights.payload import encode_safetensors

    w = srv.engine.model.get_parameter("model.layers.0.self_attn.q_proj.weight")
    before = w.detach().clone()
    payload = encode_safetensors([("model.layers.0.self_attn.q_proj.weight", torch.zeros_like(w))])
    r = httpx.post(srv.url + "/update_weights_from_tensor", json={
        "serialized_named_tensors": [payload], "load_format": "safetensors", "weight_version": "v-too-late"},
        timeout=30)
    assert r.status_code == 504 and "cancelled, nothing changed" in r.text, r.text
    t.join(timeout=60)
    assert out and out[0].status_code == 200
    time.sleep(0.3)  # the engine is idle now: a cancelled call would have run here
    assert torch.equal(w.detach(), before) and srv.engine.weight_version == "late"


def test_unreachable_master_cannot_exhaust_the_server(served):
    srv = served(ServerOptions(join_timeout_s=3.0, max_joins=2))
    dead = free_port()  # nothing listens there
    body = {"master_address": "127.0.0.1", "master_port": dead, "rank_offset": 1, "world_size": 2}
    out: list = []
    threads = []
    for i in range(2):
        def run(i=i):
            out.append(httpx.post(srv.url + "/init_weights_update_group", json={**body, "group_name": f"g{i}"},
                                  timeout=30))
        threads.append(threading.Thread(target=run, daemon=True))
        threads[-1].start()
    time.sleep(0.5)
    t0 = time.monotonic()
    r = httpx.post(srv.url + "/init_weights_update_group", json={**body, "group_name": "g9"}, timeout=30)
    assert r.status_code == 503 and "already running" in r.text, r.text
    assert httpx.post(srv.url + "/pause_generation", json={}, timeout=30).status_code == 200
    assert httpx.post(srv.url + "/continue_generation", json={}, timeout=30).status_code == 200
    assert httpx.post(srv.url + "/generate", json={"input_ids": [5], "sampling_params": {"max_new_tokens": 2}},
                      timeout=30).status_code == 200
    assert time.monotonic() - t0 < 3.0  # none of it waited on the joins
    for t in threads:
        t.join(timeout=30)
    assert len(out) == 2 and all(x.status_code == 400 and "Failed to init group" in x.text for x in out)


def test_announced_weights_are_bounded_by_the_model(served):
    srv = served()
    from moe_rl.rollout.broadcast_group import WeightBroadcastGroup

    port = free_port()
    fut: list = []
    t = threading.Thread(target=lambda: fut.append(httpx.post(srv.url + "/init_weights_update_group", json={
        "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2}, timeout=60)))
    t.start()
    trainer = WeightBroadcastGroup("127.0.0.1", port, 0, 2, timeout_s=30)
    t.join(timeout=60)
    assert fut[0].status_code == 200, fut[0].text
    name = "model.layers.0.self_attn.q_proj.weight"
    shape = list(srv.engine.model.get_parameter(name).shape)
    cases = [
        ({"names": [name], "dtypes": ["float32"], "shapes": [[1 << 20, 1 << 20]]}, "does not match"),
        ({"names": ["lm_head.bogus"], "dtypes": ["float32"], "shapes": [[1 << 30]]}, "no such weight"),
        ({"names": [name, name], "dtypes": ["float32"] * 2, "shapes": [shape] * 2}, "announced twice"),
        ({"names": [name], "dtypes": ["float32"], "shapes": [[-1, 4]]}, "does not match"),
        ({"names": [name], "dtypes": ["complex1024"], "shapes": [shape]}, "unknown dtype"),
    ]
    for body, msg in cases:
        r = httpx.post(srv.url + "/update_weights_from_distributed", json=body, timeout=30)
        assert r.status_code == 400 and msg in r.text, (body, r.text)
    threads_before = threading.active_count()
    r = httpx.post(srv.url + "/destroy_weights_update_group", json={}, timeout=30)
    assert r.status_code == 200 and "weight_update_group" not in srv.app.state.ctx.groups
    trainer.close()
    assert threading.active_count() <= threads_before


def test_memory_release_frees_the_kv_cache_and_it_comes_back(served):
    srv = served()
    gen = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 3}}
    kv = lambda: httpx.get(srv.url + "/server_info", timeout=10).json()["internal_states"][0]["kv_cache_bytes"]
    assert httpx.post(srv.url + "/generate", json=gen, timeout=30).status_code == 200
    held = kv()
    assert held > 0
    assert httpx.post(srv.url + "/release_memory_occupation", json={"tags": ["kv_cache"]}, timeout=30).status_code == 200
    assert kv() == 0
    assert httpx.post(srv.url + "/resume_memory_occupation", json={"tags": ["kv_cache"]}, timeout=30).status_code == 200
    assert httpx.post(srv.url + "/generate", json=gen, timeout=30).status_code == 200
    assert kv() == held


def test_api_key_and_bind_policy(tiny_ckpts, tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "x", "--host", "0.0.0.0"])  # no key, beyond loopback
    assert parse_args(["--model-path", "x", "--host", "0.0.0.0", "--api-key", "k"]).api_key == "k"
    srv = InProcessServer(_engine(tiny_ckpts["v0"]), ServerOptions(api_key="s3cret"))
    try:
        gen = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}
        assert httpx.post(srv.url + "/generate", json=gen, timeout=30).status_code == 401
        assert httpx.post(srv.url + "/generate", json=gen, timeout=30,
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(srv.url + "/pause_generation", json={}, timeout=30).status_code == 401
        assert httpx.post(srv.url + "/generate", json=gen, timeout=30,
                          headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/health", timeout=30).status_code == 200  # probes stay open
        assert httpx.get(srv.url + "/metrics", timeout=30).status_code == 404  # open, but off without the flag
    finally:
        srv.close()


def test_server_main_stops_on_the_tokenizers_eos(tiny_ckpts, tmp_path, monkeypatch):
    """``server.main`` gives the engine the checkpoint's tokenizer, so a sample also stops on
    the tokenizer's EOS (SGLang: ``token_id == tokenizer.eos_token_id``) where the config's EOS
    (2) differs; ``ignore_eos`` turns it off. The expected tokens are transformers' greedy ones.
    uvicorn's serving loop is replaced by requests through the app main built."""
    import shutil

    import transformers as tf
    import uvicorn
    from fastapi.testclient import TestClient

    from moe_rl.data.tokenizer import build_tokenizer
    from moe_rl.rollout.embedded import server as server_mod

    d = tmp_path / "m"
    shutil.copytree(tiny_ckpts["v0"], d)
    prompt = [9, 41, 7, 88]
    with torch.no_grad():
        free = tf.AutoModelForCausalLM.from_pretrained(str(d)).generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
            pad_token_id=0)[0, len(prompt):].tolist()
    eos = next(t for t in free if t > 3)  # a plain token the model emits
    tok = build_tokenizer(512)
    tok.eos_token = tok.convert_ids_to_tokens(eos)
    tok.save_pretrained(str(d))
    replies = {}

    def serve(self):
        with TestClient(self.config.app) as client:
            for key, extra in (("stop", {}), ("ignore", {"ignore_eos": True})):
                replies[key] = client.post("/generate", json={"input_ids": prompt, "sampling_params": {
                    "max_new_tokens": 8, "temperature": 0, **extra}}).json()

    monkeypatch.setattr(uvicorn.Server, "run", serve)
    with pytest.raises(SystemExit) as ex:
        server_mod.main(["--model-path", str(d), "--port", str(free_port()), "--num-threads", "1"])
    assert ex.value.code == 0
    stop, ignore = replies["stop"], replies["ignore"]
    assert stop["output_ids"] == free[: free.index(eos) + 1]
    assert stop["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    assert ignore["output_ids"] == free and ignore["meta_info"]["finish_reason"]["type"] == "length"


def test_sglang_command_line_is_accepted():
    from moe_rl.rollout.config import SGLangConfig
    from moe_rl.rollout.sglang_backend import launch_command

    argv = launch_command(SGLangConfig(model_path="/ckpt", random_seed=3)).argv
    assert argv[1:3] == ["-m", "sglang.launch_server"]
    a = parse_args(argv[3:])
    assert a.model_path == "/ckpt" and a.random_seed == 3
    a = parse_args(["--model-path", "/m", "--max-running-requests", "7", "--context-length", "64"])
    assert (a.max_running, a.context_length) == (7, 64)
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "/m", "--tp-size", "2"])
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "/m", "--no-such-flag"])


def test_sigterm_ends_the_server_promptly(tiny_ckpts, tmp_path):
    srv = start_embedded(tiny_ckpts["v0"], tmp_path, name="term")
    try:
        srv.wait_healthy()
        out: list = []
        t = _post_async(srv.url, {"input_ids": [5, 6], "sampling_params": {**LONG, "n": 64}}, out)
        time.sleep(1.0)
        t0 = time.monotonic()
        os.killpg(srv.proc.pid, signal.SIGTERM)
        srv.proc.wait(timeout=15)
        assert time.monotonic() - t0 < 8, "server took too long to exit on SIGTERM"
        t.join(timeout=10)
        assert out and (isinstance(out[0], httpx.HTTPError) or out[0].status_code == 503), out
    finally:
        srv.kill()
