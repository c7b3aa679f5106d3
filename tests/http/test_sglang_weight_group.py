"""The distributed weight sync against SGLang 0.5.23's own code, without a GPU.

The stand-in engine here is assembled from the installed sglang wheel's source (it cannot be
imported whole on CPU; its functions are taken out by name and run as they are):

* every request body is decoded strictly against SGLang's request structs
  (``sglang/srt/managers/io_struct.py``: ``InitWeightsUpdateGroupReqInput``,
  ``UpdateWeightsFromDistributedReqInput``, ...), with unknown fields refused, so the trainer
  sends only what SGLang defines, with SGLang's types;
* the weight-update session is enforced as SGLang's scheduler enforces it (an update outside
  ``/begin_weight_update`` ... ``/end_weight_update`` fails);
* each engine TP rank is its own process that joins the group with SGLang's
  ``init_custom_process_group`` (``sglang/srt/utils/common.py``) at ``rank_offset + tp_rank``
  and receives every bucket with SGLang's ``receive_weights_from_distributed``
  (``sglang/srt/model_executor/model_runner_components/weight_updater.py``), over gloo.

The trainer side is this process as a whole training job (one rank), pushing an HF
checkpoint through ``WeightSync`` with the distributed transport to two engines of TP 2.

The last tests turn it round: the embedded server receives what a trainer sends as SGLang
would (SGLang's own ``FlattenedTensorBucket`` packs the ``flattened_bucket`` format), and a
receive that fails, a refused bucket, or a join that cannot complete each get a clear answer
in time, with the group closed where its members fell out of step.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import multiprocessing as mp
import os
import threading
import time
import typing
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

msgspec = pytest.importorskip("msgspec")

SPEC = importlib.util.find_spec("sglang")
if SPEC is None or not SPEC.submodule_search_locations:
    pytest.skip("sglang wheel not installed (pip install --no-deps sglang==0.5.23 msgspec)", allow_module_level=True)
SGL = os.path.join(list(SPEC.submodule_search_locations)[0], "srt")
IO_STRUCT = os.path.join(SGL, "managers", "io_struct.py")
COMMON = os.path.join(SGL, "utils", "common.py")
UPDATER = os.path.join(SGL, "model_executor", "model_runner_components", "weight_updater.py")

# the request struct of each endpoint the weight sync calls with a JSON body
ENDPOINT_STRUCT = {
    "/pause_generation": "PauseGenerationReqInput",
    "/continue_generation": "ContinueGenerationReqInput",
    "/begin_weight_update": "BeginWeightUpdateReqInput",
    "/end_weight_update": "EndWeightUpdateReqInput",
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/update_weight_version": "UpdateWeightVersionReqInput",
}


def _source_of(path: str, names: set[str]) -> dict[str, str]:
    tree = ast.parse(open(path).read())
    text = open(path).read()
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in names and node.name not in found:
            found[node.name] = ast.get_source_segment(text, node)
    missing = names - found.keys()
    assert not missing, f"{path} no longer defines {missing}"
    return found


def sglang_structs() -> dict[str, type]:
    """SGLang's request structs, their field declarations run as written, on a strict base
    (SGLang's own base is a tagged array-like IPC struct; HTTP bodies are plain objects)."""

    class BaseReq(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
        rid: typing.Optional[str] = None

    import sys
    import types

    mod = types.ModuleType("_sglang_io_struct")  # string annotations resolve in the class's module
    sys.modules[mod.__name__] = mod
    ns = mod.__dict__
    ns.update({"BaseReq": BaseReq, "msgspec": msgspec, **{n: getattr(typing, n) for n in typing.__all__}})
    out = {}
    for name, src in _source_of(IO_STRUCT, set(ENDPOINT_STRUCT.values())).items():
        exec(src, ns)  # noqa: S102 - the installed sglang wheel's own declarations
        out[name] = ns[name]
    return out


def sglang_group_functions() -> dict[str, typing.Any]:
    """SGLang's ``init_custom_process_group``, ``receive_weights_from_distributed`` and its
    ``flattened_bucket`` receive (over SGLang's own ``FlattenedTensorBucket``)."""
    ns = {"torch": torch, "Optional": typing.Optional, "FlattenedTensorBucket": sglang_flattened_tensor_bucket(),
          "torch_release": tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])}
    srcs = {**_source_of(COMMON, {"init_custom_process_group"}),
            **_source_of(UPDATER, {"receive_weights_from_distributed", "_receive_bucketed_weights_from_distributed"})}
    for src in srcs.values():
        exec(src.replace("self: WeightUpdater", "self"), ns)  # noqa: S102 - sglang's own code
    return {k: ns[k] for k in srcs}


def tp_rank_main(conn, address: str, port: int, rank: int, world: int, group_name: str, backend: str) -> None:
    """One SGLang TP rank (its own process, as SGLang's schedulers are): join, then receive
    each announced bucket and send what arrived back to the test."""
    import types

    fns = sglang_group_functions()
    try:
        pg = fns["init_custom_process_group"](backend=backend, init_method=f"tcp://{address}:{port}",
                                              world_size=world, rank=rank, group_name=group_name)
    except Exception as e:  # noqa: BLE001 - reported to the HTTP front
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", rank))
    runner = types.SimpleNamespace(device="cpu", _model_update_group={group_name: pg})
    runner._receive_bucketed_weights_from_distributed = types.MethodType(
        fns["_receive_bucketed_weights_from_distributed"], runner)
    while True:
        msg = conn.recv()
        if msg is None:
            break
        names, dtypes, shapes, load_format = msg
        weights = fns["receive_weights_from_distributed"](runner, names=names, dtypes=dtypes, shapes=shapes,
                                                         group_name=group_name, load_format=load_format)
        conn.send([(n, t.clone()) for n, t in weights])
    torch.distributed.destroy_process_group(pg)


class FakeSGLang:
    """An HTTP front with SGLang's weight-update rules over ``tp_size`` rank processes."""

    def __init__(self, tp_size: int, structs: dict[str, type]) -> None:
        self.tp_size, self.structs = tp_size, structs
        self.calls: list[tuple[str, dict]] = []
        self.received: dict[str, torch.Tensor] = {}
        self.session = False
        self.version = "0"
        self.ranks: list = []
        self.lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _reply(self, code: int, body) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/model_info":
                    return self._reply(200, {"weight_version": front.version, "model_path": "fake"})
                return self._reply(404, {"detail": "Not Found"})  # /weight_sync_info among them

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                code, body = front.handle(self.path, json.loads(raw) if raw else None)
                self._reply(code, body)

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def handle(self, path: str, body):
        self.calls.append((path, body))
        if path == "/flush_cache":
            return 200, "Cache flushed."
        struct = ENDPOINT_STRUCT.get(path)
        if struct is None:
            return 404, {"detail": "Not Found"}
        try:
            req = msgspec.convert(body or {}, self.structs[struct])
        except msgspec.ValidationError as e:
            return 422, {"detail": f"{struct}: {e}"}
        with self.lock:
            return self._apply(path, req)

    def _apply(self, path: str, req):
        ok = {"success": True, "message": "Success"}
        if path == "/begin_weight_update":
            if self.session:
                return 400, {"success": False, "message": "a weight-update session is already open"}
            self.session = True
        elif path == "/end_weight_update":
            if not self.session:
                return 400, {"success": False, "message": "no weight-update session is open"}
            self.session = False
        elif path == "/init_weights_update_group":
            ctx = mp.get_context("spawn")
            for tp_rank in range(self.tp_size):
                mine, theirs = ctx.Pipe()
                p = ctx.Process(target=tp_rank_main, daemon=True,
                                args=(theirs, req.master_address, req.master_port, req.rank_offset + tp_rank,
                                      req.world_size, req.group_name, req.backend))
                p.start()
                self.ranks.append((p, mine))
            answers = [conn.recv() if conn.poll(120) else ("error", "no answer") for _, conn in self.ranks]
            bad = [a[1] for a in answers if a[0] != "ok"]
            if bad:
                return 400, {"success": False, "message": f"Failed to initialize custom process group: {bad}"}
        elif path == "/update_weights_from_distributed":
            if not self.session:  # SGLang's scheduler, 0.5.23
                return 400, {"success": False, "message": "update_weights_from_distributed must run between "
                                                          "begin_weight_update() and end_weight_update()"}
            for _, conn in self.ranks:
                conn.send((req.names, req.dtypes, req.shapes, req.load_format))
            got = [conn.recv() for _, conn in self.ranks]
            for named in got[1:]:  # every TP rank received the same tensors
                assert all(torch.equal(a[1], b[1]) and a[0] == b[0] for a, b in zip(got[0], named))
            self.received.update(dict(got[0]))
            if req.weight_version is not None:
                self.version = req.weight_version
        elif path == "/update_weight_version":
            self.version = req.new_version
        elif path == "/destroy_weights_update_group":
            for p, conn in self.ranks:
                conn.send(None)
                p.join(timeout=60)
            self.ranks = []
        return 200, ok

    def close(self) -> None:
        for p, conn in self.ranks:
            conn.send(None)
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture(scope="module")
def structs():
    return sglang_structs()


def test_the_schemas_are_strict(structs):
    """The reference itself: SGLang's structs as loaded here refuse what SGLang refuses."""
    Init, Update = structs["InitWeightsUpdateGroupReqInput"], structs["UpdateWeightsFromDistributedReqInput"]
    good = {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 1, "world_size": 2}
    assert msgspec.convert(good, Init).group_name == "weight_update_group"
    assert msgspec.convert(good, Init).backend == "nccl"
    for bad in ({k: v for k, v in good.items() if k != "rank_offset"}, {**good, "master_port": "1"},
                {**good, "stage_id": "x"}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, Init)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"names": ["a"], "dtypes": ["float32"], "shapes": [[2, "3"]]}, Update)


def test_distributed_sync_into_sglang_ranks(structs, tiny_ckpts, tmp_path):
    """Two engines of TP 2: the group is trainer rank 0 + ranks 1-2 (engine 0) and 3-4
    (engine 1); every call passes SGLang's schema; every update sits in a session; every
    engine rank receives exactly the checkpoint's tensors, over two syncs, each bucket as one
    flattened broadcast read by SGLang's own receive code (``weights.flatten_buckets``)."""
    from moe_rl.models.hf_checkpoint import HFCheckpoint
    from moe_rl.parallel import ParallelConfig, ParallelDims
    from moe_rl.rollout.client import RolloutClient
    from moe_rl.rollout.config import ClientConfig
    from moe_rl.weights.config import WeightSyncConfig
    from moe_rl.weights.export import buckets_from_hf
    from moe_rl.weights.plan import checkpoint_shapes, plan_export
    from moe_rl.weights.sync import WeightSync

    engines = [FakeSGLang(2, structs) for _ in range(2)]
    sync = None
    try:
        cfg = WeightSyncConfig(transport="distributed", bucket_bytes=400 << 10, probe=False, engine_ranks=2,
                               timeout_s=120)
        client = RolloutClient(ClientConfig(server_urls=[e.url for e in engines], control_timeout_s=120))
        sync = WeightSync(cfg, client, None, None)
        assert not sync.staging and not sync.verify and sync.session
        inits = [b for e in engines for p, b in e.calls if p == "/init_weights_update_group"]
        assert [(b["rank_offset"], b["world_size"], b["backend"]) for b in inits] == [(1, 5, "gloo"), (3, 5, "gloo")]
        for version, ckpt_dir in (("1", tiny_ckpts["v1"]), ("2", tiny_ckpts["v0"])):
            with HFCheckpoint(ckpt_dir) as ckpt:
                sync.plan = plan_export(ckpt.config(), checkpoint_shapes(ckpt_dir),
                                        ParallelDims.build(ParallelConfig(), 1), bucket_bytes=cfg.bucket_bytes)
                m = sync.sync(None, version, stream=buckets_from_hf(sync.plan, ckpt.get))
                assert m["weights/buckets"] > 1
                for e in engines:
                    assert e.version == version and not e.session
                    assert e.received.keys() == set(ckpt.keys())
                    assert all(torch.equal(e.received[n], ckpt.get(n)) for n in ckpt.keys())
                    e.received.clear()
        sync.close()
        sync = None
        for e in engines:
            paths = [p for p, _ in e.calls]
            assert paths[-1] == "/destroy_weights_update_group" and not e.ranks
            # each sync: pause, flush, begin, buckets, end, version, continue
            one = paths[paths.index("/pause_generation"):paths.index("/continue_generation") + 1]
            assert one[:3] == ["/pause_generation", "/flush_cache", "/begin_weight_update"], one
            assert one[-3:] == ["/end_weight_update", "/update_weight_version", "/continue_generation"], one
            assert set(one[3:-3]) == {"/update_weights_from_distributed"}
            bodies = [b for p, b in e.calls if p == "/update_weights_from_distributed"]
            assert all(set(b) == {"names", "dtypes", "shapes", "group_name", "load_format"} for b in bodies), bodies[0]
            assert {b["load_format"] for b in bodies} == {"flattened_bucket"}  # received by SGLang's own code
    finally:
        if sync is not None:
            sync.close()
        for e in engines:
            e.close()


# ---------------------------------------------------------------------------------------------
# The embedded server's side of the group: SGLang's receive formats, failures and deadlines.

TENSOR_BUCKET = os.path.join(SGL, "weight_sync", "tensor_bucket.py")
Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"
QN = "model.layers.0.self_attn.q_norm.weight"


def sglang_flattened_tensor_bucket() -> type:
    """SGLang's ``FlattenedTensorBucket``, the installed wheel's file run as it is (its package
    cannot be imported on CPU)."""
    import sys

    spec = importlib.util.spec_from_file_location("_sglang_tensor_bucket", TENSOR_BUCKET)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod.FlattenedTensorBucket


@pytest.fixture
def served(tiny_ckpts):
    """``served(**server_options)``: an embedded server in this process over the tiny model."""
    from embedded_servers import InProcessServer

    from moe_rl.rollout.config import EmbeddedEngineConfig
    from moe_rl.rollout.embedded.engine import EmbeddedEngine
    from moe_rl.rollout.embedded.http_context import ServerOptions

    servers = []

    def make(**options):
        engine = EmbeddedEngine(EmbeddedEngineConfig(model_path=tiny_ckpts["v0"], max_running=4))
        engine.start()
        servers.append(InProcessServer(engine, ServerOptions(**options)))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def _post(srv, path: str, body: dict, timeout: float = 60):
    import httpx

    return httpx.post(srv.url + path, json=body, timeout=timeout)


def _join(srv, timeout_s: float = 30):
    """This process as the trainer (rank 0) and the server (rank 1) join a group of two."""
    from embedded_servers import free_port

    from moe_rl.rollout.broadcast_group import WeightBroadcastGroup

    port = free_port()
    out: list = []
    t = threading.Thread(target=lambda: out.append(_post(srv, "/init_weights_update_group", {
        "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2, "backend": "gloo"})))
    t.start()
    trainer = WeightBroadcastGroup("127.0.0.1", port, 0, 2, timeout_s=timeout_s)
    t.join(timeout=60)
    assert out and out[0].status_code == 200, out and out[0].text
    return trainer


def _announce(named, **extra) -> dict:
    return {"names": [n for n, _ in named], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
            "shapes": [list(t.shape) for _, t in named], **extra}


def _param(srv, name: str) -> torch.Tensor:
    return srv.engine.model.get_parameter(name).detach().clone()


def _update_in_thread(srv, body: dict) -> tuple[threading.Thread, list]:
    out: list = []
    t = threading.Thread(target=lambda: out.append(_post(srv, "/update_weights_from_distributed", body)))
    t.start()
    return t, out


def test_flattened_bucket_is_received_as_sglang_packs_it(served):
    """``load_format: "flattened_bucket"``: one broadcast of SGLang's packed uint8 tensor (mixed
    dtypes, back to back); a load_format the engine does not implement is refused before
    anything is received, naming it, instead of waiting for broadcasts that never come."""
    srv = served(join_timeout_s=20)
    trainer = _join(srv)
    try:
        g = torch.Generator().manual_seed(3)
        named = [(Q, torch.randn(64, 64, generator=g)), (QN, torch.randn(16, generator=g).bfloat16()),
                 (K, torch.randn(32, 64, generator=g))]
        bucket = sglang_flattened_tensor_bucket()(named_tensors=named)
        t, out = _update_in_thread(srv, _announce(named, load_format="flattened_bucket", weight_version="f1"))
        trainer.broadcast([bucket.get_flattened_tensor()])
        t.join(timeout=30)
        assert out[0].status_code == 200 and out[0].json()["success"] is True, out[0].text
        for name, want in named:
            assert torch.equal(_param(srv, name), want.float()), name
        assert srv.engine.weight_version == "f1"

        before = _param(srv, Q)
        t0 = time.monotonic()
        r = _post(srv, "/update_weights_from_distributed", _announce(named[:1], load_format="bogus",
                                                                     weight_version="f2"))
        assert time.monotonic() - t0 < 5
        assert r.status_code == 400 and r.json()["success"] is False, r.text
        assert "load_format 'bogus' is not accepted" in r.json()["message"], r.text
        assert torch.equal(_param(srv, Q), before) and srv.engine.weight_version == "f1"
    finally:
        trainer.close()


def test_failed_receive_is_sglangs_400_and_closes_the_group(served):
    """A broadcast that fails (here: rank 0 never sends it, so it times out) is SGLang's
    failed update, 400 ``Failed to receive weights: ...``, not a 500; weights and version stay;
    the group is closed, so the next call says so at once and rank 0's next broadcast fails
    fast; a new join works."""
    srv = served(join_timeout_s=2)
    trainer = _join(srv)
    named = [(Q, torch.full((64, 64), 0.5))]
    before = _param(srv, Q)
    try:
        r = _post(srv, "/update_weights_from_distributed", _announce(named, weight_version="lost"))
        assert r.status_code == 400, r.text
        assert r.json()["success"] is False and r.json()["message"].startswith("Failed to receive weights: ")
        assert "Timed out" in r.json()["message"] and "join a new one" in r.json()["message"], r.text
        assert torch.equal(_param(srv, Q), before) and srv.engine.weight_version == "default"

        t0 = time.monotonic()
        r = _post(srv, "/update_weights_from_distributed", _announce(named, weight_version="next"))
        assert r.status_code == 400 and "is closed, its members out of step" in r.json()["message"], r.text
        assert "a broadcast failed" in r.json()["message"]
        with pytest.raises(RuntimeError):
            trainer.broadcast([named[0][1]])
        assert time.monotonic() - t0 < 5 and srv.engine.weight_version == "default"  # not the trainer's 30 s
    finally:
        trainer.close()
    trainer = _join(srv)  # a broken group may be joined anew under its name
    try:
        t, out = _update_in_thread(srv, _announce(named, weight_version="again"))
        trainer.broadcast([named[0][1]])
        t.join(timeout=30)
        assert out[0].status_code == 200, out[0].text
        assert torch.equal(_param(srv, Q), named[0][1]) and srv.engine.weight_version == "again"
    finally:
        trainer.close()


def test_refused_bucket_closes_the_group(served):
    """A bucket refused before it is received leaves rank 0's broadcast of it without a
    receiver: the reply says the group is now out of step and closed, and rank 0's broadcast
    fails at once instead of waiting for its timeout (30 s here)."""
    srv = served(join_timeout_s=30)
    trainer = _join(srv)
    try:
        bad = _announce([(Q, torch.zeros(64, 64))])
        bad["shapes"] = [[64, 65]]
        t0 = time.monotonic()
        r = _post(srv, "/update_weights_from_distributed", bad)
        assert r.status_code == 400 and "does not match" in r.json()["message"], r.text
        assert "out of step and now closed" in r.json()["message"], r.text
        with pytest.raises(RuntimeError):
            trainer.broadcast([torch.zeros(64, 65)])
        assert time.monotonic() - t0 < 5
        r = _post(srv, "/update_weights_from_distributed", _announce([(Q, torch.zeros(64, 64))]))
        assert r.status_code == 400 and "a bucket was refused" in r.json()["message"], r.text
        assert srv.engine.weight_version == "default"
    finally:
        trainer.close()


def test_join_gives_up_at_its_timeout_and_does_not_block_disk_updates(served, tiny_ckpts):
    """A join whose rank 0 never listens answers at ``join_timeout_s`` (torch's store client
    alone retries past it), naming the address and the seconds; while joins wait, a load from
    disk is not refused for want of a worker."""
    from embedded_servers import free_port

    srv = served(join_timeout_s=1.5, max_joins=2, weight_roots=[os.path.dirname(tiny_ckpts["v1"])])
    dead = free_port()
    body = {"master_address": "127.0.0.1", "master_port": dead, "rank_offset": 1, "world_size": 2,
            "backend": "gloo"}
    t0 = time.monotonic()
    r = _post(srv, "/init_weights_update_group", body)
    took = time.monotonic() - t0
    assert r.status_code == 400 and r.json()["success"] is False, r.text
    assert f"127.0.0.1:{dead}" in r.json()["message"] and "1.5s" in r.json()["message"], r.text
    assert 1.4 < took < 3.0, took  # torch alone: ~1.5 s more

    joins = [threading.Thread(target=_post, args=(srv, "/init_weights_update_group", {**body, "group_name": f"g{i}"}))
             for i in range(2)]
    for t in joins:
        t.start()
    time.sleep(0.3)
    r = _post(srv, "/update_weights_from_disk", {"model_path": tiny_ckpts["v1"], "weight_version": "disk"})
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert srv.engine.weight_version == "disk"
    for t in joins:
        t.join(timeout=30)
