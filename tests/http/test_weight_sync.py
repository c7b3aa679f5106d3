"""The weight sync into running embedded servers (in this process, on 127.0.0.1), one
process as the whole training job: an HF checkpoint pushed through each transport; a
corrupted bucket refused by the engine, naming the tensor, with every engine left on its old
weights and version; an engine that fails is named; a pickled payload is never taken.

The sharded trainer's side (export stream at TP/PP/EP layouts, the log-prob probe) runs in
``tests/distributed/test_weights.py``.
"""

from __future__ import annotations

import httpx
import pytest
import torch
import transformers as tf

from moe_rl.models.hf_checkpoint import HFCheckpoint
from moe_rl.parallel import ParallelConfig, ParallelDims
from moe_rl.rollout.client import RolloutClient
from moe_rl.rollout.config import ClientConfig, EmbeddedEngineConfig
from moe_rl.rollout.embedded.engine import EmbeddedEngine
from moe_rl.rollout.embedded.http_context import ServerOptions
from moe_rl.weights.config import WeightSyncConfig
from moe_rl.weights.export import buckets_from_hf
from moe_rl.weights.payload import encode_safetensors
from moe_rl.weights.plan import checkpoint_shapes, plan_export
from moe_rl.weights.sync import WeightSync
from moe_rl.weights.verify import SyncError

from embedded_servers import InProcessServer

PROMPT = [5, 17, 33, 2, 91, 7]
GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
BUCKET = 400 << 10  # a few buckets per sync (each HTTP call costs ~50 ms here)


@pytest.fixture(scope="module")
def refs(tiny_ckpts):
    out = {}
    for k, d in tiny_ckpts.items():
        m = tf.AutoModelForCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            ids = m.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(PROMPT):].tolist()
        out[k] = ids
    return out


@pytest.fixture
def servers(tiny_ckpts, tmp_path):
    made = []

    def make(n=2, path=None):
        for _ in range(n):
            eng = EmbeddedEngine(EmbeddedEngineConfig(model_path=path or tiny_ckpts["v0"], max_running=4))
            eng.start()
            made.append(InProcessServer(eng, ServerOptions(weight_roots=[str(tmp_path)])))
        return made[-n:]

    yield make
    for s in made:
        s.close()


def greedy(url):
    r = httpx.post(url + "/generate", json={"input_ids": PROMPT, "sampling_params": GREEDY}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["output_ids"], r.json()["meta_info"]["weight_version"]


def one_rank_sync(urls, transport, tmp_path, **kw):
    cfg = WeightSyncConfig(transport=transport, bucket_bytes=BUCKET, disk_dir=str(tmp_path / "sync"), probe=False,
                           timeout_s=60, **kw)
    client = RolloutClient(ClientConfig(server_urls=urls, control_timeout_s=60))
    return WeightSync(cfg, client, None, None), client


def push(sync, ckpt_dir, version):
    with HFCheckpoint(ckpt_dir) as ckpt:
        cfg = ckpt.config()
        sync.plan = plan_export(cfg, checkpoint_shapes(ckpt_dir), ParallelDims.build(ParallelConfig(), 1),
                                bucket_bytes=sync.cfg.bucket_bytes)
        return sync.sync(None, version, stream=buckets_from_hf(sync.plan, ckpt.get))


def _corrupt(t):
    t = t.clone()
    t.view(-1)[0] += 1.0
    return t


@pytest.mark.parametrize("transport", ["tensor", "distributed", "distributed-per-tensor", "disk"])
def test_push_over_each_transport_then_a_corrupted_bucket_is_refused(servers, tiny_ckpts, refs, tmp_path,
                                                                     transport, monkeypatch):
    """A checkpoint pushed through the transport reaches both engines (greedy = transformers,
    new version); then a bucket damaged on the way is refused by the engines naming the
    tensor, and both keep serving that version. ``distributed`` sends each bucket as one
    flattened broadcast (SGLang's ``flattened_bucket``), ``distributed-per-tensor`` one
    broadcast per tensor."""
    srv = servers(2)
    urls = [s.url for s in srv]
    flat = transport == "distributed"
    transport = transport.removesuffix("-per-tensor")
    sync, client = one_rank_sync(urls, transport, tmp_path, flatten_buckets=flat)
    assert sync.staging and sync.verify
    from moe_rl.rollout.broadcast_group import WeightBroadcastGroup

    sent = []  # tensors per broadcast call of the sender (the in-process servers receive through the same class)
    real_bcast = WeightBroadcastGroup.broadcast
    monkeypatch.setattr(WeightBroadcastGroup, "broadcast",
                        lambda self, ts: (self.rank == 0 and sent.append(len(ts)), real_bcast(self, ts)))
    m = push(sync, tiny_ckpts["v1"], "1")
    assert m["weights/tensors"] == 135 and m["weights/buckets"] > 1, m
    if transport == "distributed":  # one collective per bucket, or one per tensor
        assert sum(sent) == (m["weights/buckets"] if flat else 135) and len(sent) == m["weights/buckets"], sent
    for u in urls:
        assert greedy(u) == (refs["v1"], "1")
    victim = "model.layers.2.mlp.experts.5.up_proj.weight"
    # damage one tensor after its checksum was taken, on the way to the engines
    if transport == "tensor":
        import moe_rl.weights.transport.tensor as mod

        real = mod.encode_safetensors
        monkeypatch.setattr(mod, "encode_safetensors",
                            lambda named: real([(n, _corrupt(t) if n == victim else t) for n, t in named]))
    elif transport == "distributed" and flat:
        import moe_rl.weights.transport.distributed as mod

        real_flatten = mod.flatten_bucket

        def damaged(self, b, rnd):  # checksums are taken inside; damage the bytes the group then sends
            if victim not in b.names:
                return real(self, b, rnd)
            ptr = b.tensors[b.names.index(victim)].data_ptr()
            monkeypatch.setattr(mod, "flatten_bucket", lambda ts: real_flatten(
                [_corrupt(t) if t.data_ptr() == ptr else t for t in ts]))
            try:
                return real(self, b, rnd)
            finally:
                monkeypatch.setattr(mod, "flatten_bucket", real_flatten)

        real = mod.DistributedTransport._broadcast
        monkeypatch.setattr(mod.DistributedTransport, "_broadcast", damaged)
    elif transport == "distributed":
        import moe_rl.weights.transport.distributed as mod

        real = mod.DistributedTransport._broadcast

        def damaged(self, b, rnd):  # checksums are taken inside; damage what the group then sends
            if victim not in b.names:
                return real(self, b, rnd)
            ptr = b.tensors[b.names.index(victim)].data_ptr()
            send = self.group.broadcast
            self.group.broadcast = lambda ts: send([_corrupt(t) if t.data_ptr() == ptr else t for t in ts])
            try:
                return real(self, b, rnd)
            finally:
                del self.group.broadcast

        monkeypatch.setattr(mod.DistributedTransport, "_broadcast", damaged)
    else:
        import moe_rl.weights.transport.disk as mod

        real = mod.write_safetensors
        monkeypatch.setattr(mod, "write_safetensors",
                            lambda path, named: real(path, [(n, _corrupt(t) if n == victim else t) for n, t in named]))
    try:
        with pytest.raises(SyncError) as e:
            push(sync, tiny_ckpts["v0"], "2")
        msg = str(e.value)
        assert victim in msg and "checksum" in msg and "keeps its old weights and version" in msg, msg
        assert all(u in msg for u in urls), msg
        for u in urls:  # serving again, on the old weights and version; nothing left staged
            assert greedy(u) == (refs["v1"], "1")
        assert all(i["staged"] == {} for i in client.weight_sync_info())
        if transport == "disk":  # published atomically; the failed version's directory was removed
            assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == ["weight_v1"]
    finally:
        sync.close()


def test_the_engine_that_fails_is_named_and_the_others_keep_their_version(servers, tiny_ckpts, refs, tmp_path):
    from moe_rl.models.tiny import save_tiny_hf

    good = servers(1)[0]
    other = servers(1, path=save_tiny_hf("qwen3_moe", tmp_path / "narrow", moe_intermediate_size=32))[0]
    sync, client = one_rank_sync([good.url, other.url], "tensor", tmp_path)
    with pytest.raises(SyncError) as e:
        push(sync, tiny_ckpts["v1"], "8")
    msg = str(e.value)
    assert other.url in msg and "does not match the model's" in msg and "mlp.experts" in msg, msg
    assert f"{good.url}/update" not in msg, msg
    assert greedy(good.url) == (refs["v0"], "default")
    assert client.weight_sync_info()[0]["staged"] == {}


def test_staging_commit_and_discard_rules(servers, tiny_ckpts):
    (srv,) = servers(1)
    url = srv.url
    with HFCheckpoint(tiny_ckpts["v1"]) as ck:
        named = [(n, ck.get(n)) for n in sorted(ck.keys())]

    def stage(part, sid="s1", **extra):
        return httpx.post(url + "/update_weights_from_tensor", json={
            "serialized_named_tensors": [encode_safetensors(part)], "load_format": "safetensors",
            "stage_id": sid, **extra}, timeout=60)

    half = len(named) // 2
    r = stage(named[:half])
    assert r.status_code == 200 and len(r.json()["checksums"]) == half, r.text
    r = stage(named[:1])
    assert r.status_code == 400 and "staged twice" in r.text
    commit = {"stage_id": "s1", "weight_version": "9", "expected_tensors": len(named), "complete": True}
    r = httpx.post(url + "/commit_staged_weights", json=commit, timeout=60)
    assert r.status_code == 400 and f"holds {half} tensors, the commit expects {len(named)}" in r.text
    r = httpx.post(url + "/commit_staged_weights", json={**commit, "expected_tensors": half}, timeout=60)
    assert r.status_code == 400 and "not a whole model" in r.text and "lacks" in r.text
    assert greedy(url)[1] == "default"
    r = stage(named[:2], sid="s2")  # a newer stage replaces the older one
    assert httpx.get(url + "/weight_sync_info", timeout=10).json()["staged"] == {"s2": 2}
    r = stage(named[2:], sid="s2", checksums={n: "00000000" for n, _ in named[2:]})
    assert r.status_code == 400 and "differs from the sender's 00000000" in r.text
    r = httpx.post(url + "/discard_staged_weights", json={}, timeout=10)
    assert r.status_code == 200 and httpx.get(url + "/weight_sync_info", timeout=10).json()["staged"] == {}
    r = httpx.post(url + "/commit_staged_weights", json={**commit, "stage_id": "s2"}, timeout=60)
    assert r.status_code == 400 and "nothing staged" in r.text
    assert greedy(url)[1] == "default"


def test_session_calls_and_backends_as_sglang_answers_them(servers):
    """``/begin_weight_update`` / ``/end_weight_update`` follow SGLang 0.5.23's rules (one open
    session at a time), and a weight-update group over NCCL, which a CPU engine cannot join,
    is refused at once instead of leaving the trainer waiting for a member that never comes."""
    (srv,) = servers(1)

    def post(path, body):
        return httpx.post(srv.url + path, json=body, timeout=30)

    assert post("/begin_weight_update", {}).status_code == 200
    r = post("/begin_weight_update", {})
    assert r.status_code == 400 and "already open" in r.text
    assert post("/end_weight_update", {}).status_code == 200
    r = post("/end_weight_update", {})
    assert r.status_code == 400 and "no weight-update session is open" in r.text
    r = post("/init_weights_update_group", {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1,
                                            "world_size": 2, "backend": "nccl"})
    assert r.status_code == 400 and "gloo only" in r.text
