"""Two embedded servers as real subprocesses on 127.0.0.1, driven over HTTP by the client.

Greedy outputs are checked against ``transformers`` ``generate`` on the same weights, so a
sample's tokens prove which weights (which version) produced it. Tests run in file order
and share the two servers; the last one kills a server.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time

import httpx
import pytest
import torch
import transformers as tf

from moe_rl.rollout import routed_experts_codec
from moe_rl.rollout.broadcast_group import WeightBroadcastGroup
from moe_rl.rollout.client import RolloutClient
from moe_rl.rollout.config import ClientConfig
from moe_rl.rollout.embedded.weight_update import model_tensors
from moe_rl.rollout.types import FinishReason, RolloutRequest, SamplingParams
from moe_rl.weights.payload import encode_safetensors

from embedded_servers import free_port


@pytest.fixture(scope="module")
def hf(tiny_ckpts):
    return {k: tf.AutoModelForCausalLM.from_pretrained(d).eval() for k, d in tiny_ckpts.items()}


def greedy_ref(model, prompt, n_new):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(k, seed=0, lo=3, hi=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)]


GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


def post(url, path, body=None, **kw):
    return httpx.post(url + path, json=body, timeout=60, **kw)


def test_batch_and_n_are_prompt_major(two_servers, hf):
    url = two_servers[0].url
    ps = prompts(3, seed=1)
    r = post(url, "/generate", {"input_ids": ps, "sampling_params": {**GREEDY, "n": 2}, "return_logprob": True})
    assert r.status_code == 200, r.text
    items = r.json()
    assert len(items) == 6
    for i, p in enumerate(ps):
        ref = greedy_ref(hf["v0"], p, 6)
        for j in range(2):
            it = items[i * 2 + j]
            assert it["meta_info"]["prompt_tokens"] == len(p)
            assert it["output_ids"] == ref
            assert [x[1] for x in it["meta_info"]["output_token_logprobs"]] == ref
            assert it["meta_info"]["weight_version"] == "default"
            assert it["meta_info"]["weight_versions"] == [{"version": "default", "start": 0, "end": 6}]
            assert "text" not in it  # no tokenizer: SGLang's --skip-tokenizer-init replies
    # no tokenizer: return_text_in_logprobs leaves the text element null, as SGLang does
    r = post(url, "/generate", {"input_ids": ps[0], "sampling_params": GREEDY, "return_logprob": True,
                                "return_text_in_logprobs": True}).json()
    assert [x[2] for x in r["meta_info"]["output_token_logprobs"]] == [None] * 6
    # single prompt, n=1: one object; batch with a str rid: rid_i
    one = post(url, "/generate", {"input_ids": ps[0], "sampling_params": GREEDY, "rid": "abc"}).json()
    assert isinstance(one, dict) and one["meta_info"]["id"] == "abc"
    many = post(url, "/generate", {"input_ids": ps[:2], "sampling_params": GREEDY, "rid": "q"}).json()
    assert [m["meta_info"]["id"] for m in many] == ["q_0", "q_1"]
    # per-prompt sampling_params list
    lst = post(url, "/generate", {"input_ids": ps[:2], "sampling_params": [
        {**GREEDY, "max_new_tokens": 2}, {**GREEDY, "max_new_tokens": 4}]}).json()
    assert [len(m["output_ids"]) for m in lst] == [2, 4]


def test_client_samples_logprobs_and_routes(two_servers, hf):
    client = RolloutClient(ClientConfig(server_urls=[s.url for s in two_servers], max_concurrency=4))
    reqs = [RolloutRequest(p, SamplingParams(max_new_tokens=5, temperature=0.8, ignore_eos=True, n=3), group_id=10 + i)
            for i, p in enumerate(prompts(4, seed=2))]
    samples = client.generate(reqs)
    assert [(s.group_id, s.sample_index) for s in samples] == [(10 + i, j) for i in range(4) for j in range(3)]
    model = hf["v0"]
    for s in samples:
        P = len(s.prompt_ids)
        with torch.no_grad():
            out = model(torch.tensor([s.prompt_ids + s.response_ids]), output_router_logits=True)
        lp = torch.log_softmax(out.logits[0].float() / 0.8, -1)[P - 1:-1]
        ref = lp.gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(s.rollout_logprobs_T, ref, atol=1e-5, rtol=0)
        N = P + len(s.response_ids) - 1  # prompt + response - 1 rows
        ref_NLK = torch.stack([rl[:N].softmax(-1).topk(2, -1).indices for rl in out.router_logits], 1)
        assert torch.equal(s.routed_experts_NLK.long().sort(-1).values, ref_NLK.sort(-1).values)
    # both servers took traffic (least-loaded balancing)
    counts = [httpx.get(s.url + "/server_info").json()["internal_states"][0]["num_generate_requests"]
              for s in two_servers]
    assert all(c > 0 for c in counts), counts


def _serialize(named):
    return encode_safetensors(named)


def _pickled(named):
    buf = io.BytesIO()
    torch.save(named, buf)
    return base64.b64encode(buf.getvalue()).decode()


BAD_GENERATE = [
    ({"input_ids": [5, 6], "sampling_params": {"bogus": 1}}, "unknown field `bogus`"),
    ({"input_ids": [], "sampling_params": GREEDY}, "empty"),
    ({"input_ids": [[5], []], "sampling_params": GREEDY}, "empty"),
    ({"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 10**6}}, "exceeds the context length"),
    ({"input_ids": [5, 6], "sampling_params": {"temperature": -1}}, "temperature"),
    ({"input_ids": [5, 6], "sampling_params": {"n": 2}, "rid": ["a", "b"]}, "rid"),
    ({"input_ids": [5, 100000]}, "outside the vocabulary"),
    ({"text": "hello"}, "tokenizer"),
    ({"input_ids": [5], "sampling_params": {"regex": "a+"}}, "not supported"),
    ({"input_ids": [5], "sampling_params": {"stop_regex": "a+"}}, "not supported"),
    # stop strings need a tokenizer (SGLang: unavailable with skip_tokenizer_init)
    ({"input_ids": [5, 6], "sampling_params": {"stop": "x"}}, "sampling_params.stop"),
    ({"input_ids": [5, 6], "sampling_params": {"stop": ["x", "y"]}}, "needs a tokenizer"),
]

# Bodies SGLang's FastAPI/pydantic parse refuses: 400 with its ErrorResponse shape.
SCHEMA_ERRORS = [
    ("/generate", b'{"input_ids": [5, 6', "malformed JSON"),
    ("/generate", b"[1, 2]", "JSON object"),
    ("/generate", b"null", "JSON object"),
    ("/generate", b"", "Field required"),
    ("/generate", b'{"input_ids": ["a"]}', "input_ids"),
    ("/generate", b'{"input_ids": [5, 1.5]}', "input_ids"),
    ("/generate", b'{"input_ids": [5, true]}', "input_ids"),
    ("/generate", b'{"input_ids": [[5], 6]}', "input_ids[1]"),
    ("/generate", b'{"input_ids": 5}', "input_ids"),
    ("/generate", b'{"text": 5}', "text"),
    ("/generate", b'{"input_ids": [5], "rid": 7}', "rid"),
    ("/generate", b'{"input_ids": [5], "sampling_params": 5}', "sampling_params"),
    ("/generate", b'{"input_ids": [[5], [6]], "sampling_params": [{}, 3]}', "sampling_params[1]"),
    ("/update_weights_from_disk", b"{}", "model_path: Field required"),
    ("/update_weights_from_disk", b"", "Field required"),
    ("/update_weights_from_disk", b'{"model_path": 3}', "model_path"),
    ("/update_weights_from_disk", b'{"model_path": "/m", "weight_version": 5}', "weight_version"),
    ("/update_weights_from_disk", b'{"model_path": "/m", "flush_cache": "no"}', "flush_cache"),
    ("/update_weights_from_tensor", b'{"load_format": "safetensors"}', "serialized_named_tensors: Field required"),
    ("/update_weights_from_distributed", b'{"names": ["a"], "dtypes": ["float32"]}', "shapes: Field required"),
    ("/init_weights_update_group", b'{"master_address": "127.0.0.1", "master_port": 1, "world_size": 2}',
     "rank_offset: Field required"),
    ("/init_weights_update_group", b'{"master_address": "a", "master_port": 1, "rank_offset": 1, "world_size": 2, '
                                   b'"group_name": 7}', "group_name"),
    ("/update_weight_version", b"{}", "new_version: Field required"),
    ("/pause_generation", b'{"mode": "sideways"}', "mode"),
    ("/pause_generation", b"[]", "JSON object"),
    ("/release_memory_occupation", b'{"tags": "kv_cache"}', "tags"),
]


def test_bad_input_is_400_and_changes_nothing(two_servers, hf, tiny_ckpts, tmp_path):
    url = two_servers[1].url
    p = prompts(1, seed=3)[0]
    before = post(url, "/generate", {"input_ids": p, "sampling_params": GREEDY}).json()["output_ids"]
    for body, msg in BAD_GENERATE:
        r = post(url, "/generate", body)
        assert r.status_code == 400 and msg in r.text, (body, r.status_code, r.text)
        assert r.headers["X-Weight-Version"] == "default"
    for path, raw, msg in SCHEMA_ERRORS:
        r = httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=10)
        body = r.json()
        assert r.status_code == 400 and msg in body.get("message", ""), (path, raw, r.text)
        assert {k: body[k] for k in ("object", "type", "param", "code")} == {
            "object": "error", "type": "Bad Request", "param": None, "code": 400}, (path, raw, body)
    # the other two gates keep their shapes: schema contract {"error": str}, request {"error": {"message"}}
    r = post(url, "/generate", {"input_ids": [5], "sampling_params": {"bogus": 1}})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    r = post(url, "/generate", {"input_ids": [5, 100000]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]

    sd = model_tensors(hf["v1"])
    good_name = "model.layers.0.self_attn.q_proj.weight"
    bad_updates = [
        # wrong shape on the last tensor: the first (valid) one must not be applied either
        ([(good_name, sd[good_name]), ("model.layers.1.self_attn.k_proj.weight", torch.zeros(3, 3))], "shape"),
        ([(good_name, sd[good_name].to(torch.int64))], "dtype"),
        ([("model.layers.9.nonexistent.weight", torch.zeros(2))], "no such weight"),
        ([(good_name, torch.full_like(sd[good_name], float("nan")))], "NaN"),
        ([("model.layers.0.mlp.experts.99.gate_proj.weight", torch.zeros(64, 64))], "no such weight"),
    ]
    for named, msg in bad_updates:
        r = post(url, "/update_weights_from_tensor", {"serialized_named_tensors": [_serialize(named)],
                                                      "load_format": "safetensors", "weight_version": "bad"})
        assert r.status_code == 400 and r.json()["success"] is False and msg in r.json()["message"], r.text
    # every refused update is SGLang's failed update, {"success": false, "message"} (the disk
    # call adds num_paused_requests), naming the problem
    blob = _serialize([(good_name, sd[good_name])])
    group = {"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1, "world_size": 2}
    refused = [
        ("/update_weights_from_disk", {"model_path": ""}, "model_path is the empty string"),
        ("/update_weights_from_disk", {"model_path": tiny_ckpts["v1"], "weight_version": ""},
         "weight_version must be a non-empty string"),
        ("/update_weights_from_tensor", {"serialized_named_tensors": [blob, blob], "load_format": "safetensors"},
         "a list of one base64 string"),
        ("/update_weights_from_tensor", {"serialized_named_tensors": [blob], "load_format": "safetensors",
                                         "weight_version": ""}, "weight_version must be a non-empty string"),
        ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]],
                                              "group_name": "nope"}, "no weight update group 'nope'"),
        ("/init_weights_update_group", {**group, "master_port": 70000}, "master_port (70000) must be in (0, 65536)"),
        ("/init_weights_update_group", {**group, "rank_offset": 0}, "rank_offset (0) in (0, world_size=2)"),
        ("/init_weights_update_group", {**group, "rank_offset": 2}, "rank_offset (2) in (0, world_size=2)"),
        ("/init_weights_update_group", {**group, "group_name": ""}, "group_name is the empty string"),
        ("/destroy_weights_update_group", {"group_name": "nope"}, "no group 'nope'"),
    ]
    for path, body, msg in refused:
        r = post(url, path, body)
        keys = {"success", "message", "weight_version"} | ({"num_paused_requests"} if path.endswith("disk") else set())
        assert r.status_code == 400 and set(r.json()) == keys, (path, r.text)
        assert r.json()["success"] is False and msg in r.json()["message"], (path, r.text)
    r = post(url, "/update_weights_from_tensor", {"serialized_named_tensors": ["!!notbase64"],
                                                  "load_format": "safetensors"})
    assert r.status_code == 400 and "not base64" in r.json()["message"]
    # a pickle is never unpickled: refused by its load_format, or as not safetensors
    pickled = _pickled([(good_name, sd[good_name])])
    for fmt, msg in [(None, "load_format None is not accepted"), ("flattened_bucket", "is not accepted"),
                     ("safetensors", "not a safetensors payload")]:
        body = {"serialized_named_tensors": [pickled], "weight_version": "bad"}
        if fmt is not None:
            body["load_format"] = fmt
        r = post(url, "/update_weights_from_tensor", body)
        assert r.status_code == 400 and msg in r.json()["message"], r.text
    root = os.path.dirname(tiny_ckpts["v0"])  # the server's default weight root
    r = post(url, "/update_weights_from_disk", {"model_path": os.path.join(root, "missing")})
    assert r.status_code == 400 and "not a directory" in r.json()["message"]
    # outside the weight roots: refused before anything is read, even when the path exists
    r = post(url, "/update_weights_from_disk", {"model_path": str(tmp_path)})
    assert r.status_code == 400 and "outside the server's weight roots" in r.json()["message"]
    os.symlink(tmp_path, os.path.join(root, "escape"))
    r = post(url, "/update_weights_from_disk", {"model_path": os.path.join(root, "escape")})
    assert r.status_code == 400 and "outside the server's weight roots" in r.json()["message"]
    from moe_rl.models.tiny import save_tiny_hf

    other = save_tiny_hf("qwen3_moe", os.path.join(root, "wide"), seed=1, hidden_size=96)
    r = post(url, "/update_weights_from_disk", {"model_path": other, "weight_version": "bad"})
    assert r.status_code == 400 and "shape" in r.json()["message"], r.text
    r = post(url, "/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float32"], "shapes": [[1]]})
    assert r.status_code == 400 and r.json()["success"] is False and "init_weights_update_group" in r.text
    # no update took: the served model is still the startup one; its tokenizer path is that too
    # (SGLang's default, even without a tokenizer)
    info = httpx.get(url + "/model_info", timeout=10).json()
    assert info["model_path"] == info["served_model_name"] == info["tokenizer_path"] == tiny_ckpts["v0"]
    assert httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"] == tiny_ckpts["v0"]
    # still serving, same weights, same version
    after = post(url, "/generate", {"input_ids": p, "sampling_params": GREEDY}).json()
    assert after["output_ids"] == before == greedy_ref(hf["v0"], p, 6)
    assert after["meta_info"]["weight_version"] == "default"


def test_weight_sync_during_rollout(two_servers, hf, tiny_ckpts):
    """pause -> flush -> update -> continue while the client is mid-rollout: aborted samples
    come back as abort and are retried; every sample's tokens match the weights of the
    version it reports."""
    client = RolloutClient(ClientConfig(server_urls=[s.url for s in two_servers], max_concurrency=8,
                                        return_routed_experts=False))
    ps = prompts(12, seed=4)
    reqs = [RolloutRequest(p, SamplingParams(max_new_tokens=80, temperature=0.0, ignore_eos=True, n=2), group_id=i)
            for i, p in enumerate(ps)]
    result: dict = {}
    th = threading.Thread(target=lambda: result.setdefault("samples", client.generate(reqs)))
    th.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until both servers are decoding
        states = [httpx.get(s.url + "/server_info").json()["internal_states"][0] for s in two_servers]
        if all(st["num_running_reqs"] > 0 for st in states):
            break
        time.sleep(0.01)
    else:
        pytest.fail(f"servers never both busy: {states}")
    client.pause()
    client.flush_cache(interval_s=0.2)
    client.update_weights_from_disk(tiny_ckpts["v1"], weight_version="1")
    assert client.weight_versions() == ["1", "1"]
    client.continue_generation()
    th.join(timeout=120)
    assert not th.is_alive()
    samples = result["samples"]
    assert len(samples) == 24 and sorted((s.group_id, s.sample_index) for s in samples) == [
        (g, j) for g in range(12) for j in range(2)]
    assert client.stats["aborted_samples"] > 0
    versions = {s.weight_version for s in samples}
    assert "1" in versions
    refs = {}
    for s in samples:
        assert s.finish_reason is FinishReason.LENGTH and len(s.response_ids) == 80
        key = ({"default": "v0", "1": "v1"}[s.weight_version], s.group_id)
        if key not in refs:
            refs[key] = greedy_ref(hf[key[0]], s.prompt_ids, 80)
        assert s.response_ids == refs[key]
    client.update_weight_version("2")
    assert client.weight_versions() == ["2", "2"]
    r = post(two_servers[0].url, "/generate", {"input_ids": ps[0], "sampling_params": GREEDY})
    assert r.json()["meta_info"]["weight_version"] == "2" and r.headers["X-Weight-Version"] == "2"


def test_update_from_distributed_and_tensor(two_servers, hf):
    """SGLang's broadcast protocol over gloo: the trainer is rank 0; checkpoint (per-expert)
    names and in-memory names are both accepted. Then back to v0 via update_weights_from_tensor."""
    client = RolloutClient(ClientConfig(server_urls=[s.url for s in two_servers], return_routed_experts=False))
    port = free_port()
    futs = client.init_weights_update_group("127.0.0.1", port, backend="gloo")
    group = WeightBroadcastGroup("127.0.0.1", port, 0, 3, timeout_s=60)
    for f in futs:
        f.result(timeout=60)
    # v0 state (servers hold v1 now), sent as checkpoint-format names where experts are fused
    sd0 = model_tensors(hf["v0"])
    named = []
    for name, t in sd0.items():
        if name.endswith("experts.gate_up_proj"):
            pre = name[: -len("gate_up_proj")]
            F = t.shape[1] // 2
            for e in range(t.shape[0]):
                named += [(f"{pre}{e}.gate_proj.weight", t[e, :F].contiguous()),
                          (f"{pre}{e}.up_proj.weight", t[e, F:].contiguous())]
        elif name.endswith("experts.down_proj"):
            pre = name[: -len("down_proj")]
            named += [(f"{pre}{e}.down_proj.weight", t[e].contiguous()) for e in range(t.shape[0])]
        else:
            named.append((name, t))
    client.pause()
    half = len(named) // 2
    for bucket in (named[:half], named[half:]):  # two buckets, version set on the last
        futs = client.update_weights_from_distributed(
            [n for n, _ in bucket], [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            [list(t.shape) for _, t in bucket], weight_version="3" if bucket is not named[:half] else None)
        group.broadcast([t for _, t in bucket])
        for f in futs:
            f.result(timeout=60)
    client.continue_generation()
    assert client.weight_versions() == ["3", "3"]
    p = prompts(1, seed=5)[0]
    for s in two_servers:
        assert post(s.url, "/generate", {"input_ids": p, "sampling_params": GREEDY}).json()["output_ids"] == \
            greedy_ref(hf["v0"], p, 6)
    # update_weights_from_tensor with v1's in-memory tensors, then back
    blob = _serialize(list(model_tensors(hf["v1"]).items()))
    client.update_weights_from_tensor([blob], weight_version="4", load_format="safetensors")
    assert post(two_servers[0].url, "/generate", {"input_ids": p, "sampling_params": GREEDY}).json()[
        "output_ids"] == greedy_ref(hf["v1"], p, 6)
    client.update_weights_from_tensor([_serialize(list(sd0.items()))], weight_version="5", load_format="safetensors")
    # release / resume memory (slime's offload cycle) keeps serving afterwards
    client.flush_cache()
    client.release_memory_occupation()
    client.resume_memory_occupation(["weights"])
    client.resume_memory_occupation(["kv_cache", "cuda_graph"])
    assert post(two_servers[1].url, "/generate", {"input_ids": p, "sampling_params": GREEDY}).json()[
        "output_ids"] == greedy_ref(hf["v0"], p, 6)


def test_server_killed_mid_rollout(two_servers, hf):
    """Kill one server while it holds requests: they are re-sent to the other, none lost."""
    client = RolloutClient(ClientConfig(server_urls=[s.url for s in two_servers], max_concurrency=8,
                                        server_cooldown_s=60, request_timeout_s=30))
    ps = prompts(10, seed=6)
    reqs = [RolloutRequest(p, SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True, n=2), group_id=i)
            for i, p in enumerate(ps)]
    result: dict = {}
    th = threading.Thread(target=lambda: result.setdefault("samples", client.generate(reqs)))
    th.start()
    victim = two_servers[1]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(victim.url + "/server_info").json()["internal_states"][0]["num_running_reqs"] > 0:
            break
        time.sleep(0.05)
    victim.kill(9)
    th.join(timeout=120)
    assert not th.is_alive()
    samples = result["samples"]
    assert sorted((s.group_id, s.sample_index) for s in samples) == [(g, j) for g in range(10) for j in range(2)]
    assert client.stats["server_failures"] > 0
    for s in samples:
        assert s.response_ids == greedy_ref(hf["v0"], s.prompt_ids, 30)
        N = len(s.prompt_ids) + 30 - 1
        assert s.routed_experts_NLK is not None and s.routed_experts_NLK.shape == (N, 4, 2)
    from moe_rl.models import family_for

    assert family_for(hf["v0"].config).moe_layer_ids(hf["v0"].config) == [0, 1, 2, 3]
