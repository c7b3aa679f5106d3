"""SGLang backend without a GPU: the launch command line, and every /generate body the
client sends checked against SGLang 0.5.23's own request schema (``sglang/api/v1/api_types.py``)."""

from __future__ import annotations

import importlib.util
import gc
import os
import sys
import time
import warnings

import pytest

from moe_rl.rollout.client import generate_body
from moe_rl.rollout.config import ClientConfig, RolloutConfig, SGLangConfig
from moe_rl.rollout.sglang_backend import launch_command, launch_commands, router_command
from moe_rl.rollout.types import RolloutRequest, SamplingParams


def _flag(argv, name):
    i = argv.index(name)
    return argv[i + 1]


def test_launch_command_flags():
    cfg = SGLangConfig(model_path="/ckpt", num_servers=2, tp_size=4, ep_size=4, mem_fraction_static=0.6,
                       base_port=31000, weight_version="7", random_seed=3, extra_args=["--log-level", "info"])
    specs = launch_commands(cfg)
    a = specs[1].argv
    assert a[:3] == ["python", "-m", "sglang.launch_server"]
    assert _flag(a, "--model-path") == "/ckpt" and _flag(a, "--port") == "31001"
    assert _flag(a, "--tp-size") == "4" and _flag(a, "--ep-size") == "4" and _flag(a, "--dp-size") == "1"
    assert _flag(a, "--mem-fraction-static") == "0.6" and _flag(a, "--weight-version") == "7"
    assert _flag(a, "--base-gpu-id") == "4" and specs[1].gpu_ids == [4, 5, 6, 7]
    assert _flag(a, "--host") == "127.0.0.1" and specs[1].url == "http://127.0.0.1:31001"
    for f in ("--enable-memory-saver", "--enable-return-routed-experts", "--skip-server-warmup", "--enable-metrics"):
        assert f in a
    assert "--enable-ep-moe" not in a and "--enable-dp-attention" not in a and "--nnodes" not in a
    assert a[-2:] == ["--log-level", "info"]
    multi = launch_command(SGLangConfig(model_path="/c", tp_size=16, ep_size=16, attn_dp_size=16, nnodes=2,
                                        node_rank=1, dist_init_addr="10.0.0.1:5000"))
    assert _flag(multi.argv, "--nnodes") == "2" and _flag(multi.argv, "--node-rank") == "1"
    assert _flag(multi.argv, "--dist-init-addr") == "10.0.0.1:5000" and _flag(multi.argv, "--attn-dp-size") == "16"
    assert multi.gpu_ids == list(range(8))
    r = router_command(["http://a:1", "http://b:2"], port=9000)
    assert _flag(r, "--host") == "127.0.0.1" and _flag(r, "--prometheus-host") == "127.0.0.1"
    assert r[r.index("--worker-urls") + 1:r.index("--worker-urls") + 3] == ["http://a:1", "http://b:2"]


@pytest.mark.parametrize("kw, msg", [
    (dict(tp_size=4, ep_size=3), "ep_size (3) must divide sglang.tp_size (4)"),
    (dict(nnodes=2), "dist_init_addr is required"),
    (dict(mem_fraction_static=1.5), "mem_fraction_static (1.5)"),
    (dict(node_rank=2, nnodes=2, dist_init_addr="h:1"), "node_rank (2)"),
])
def test_sglang_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        SGLangConfig(**kw)


def test_rollout_config_rejects_routes_through_router():
    with pytest.raises(ValueError, match="drops return_routed_experts"):
        RolloutConfig(client=ClientConfig(router_url="http://r:1", return_routed_experts=True))


def _api_types():
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("sglang wheel not installed (pip install --no-deps sglang==0.5.23 msgspec)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "api", "v1", "api_types.py")
    if not os.path.exists(path):
        pytest.skip(f"{path} missing: need sglang 0.5.23's generated api_types.py")
    pytest.importorskip("msgspec", reason="msgspec is needed to load sglang's api_types.py")
    # by file path: importing the sglang package would import torch-heavy modules
    mod_spec = importlib.util.spec_from_file_location("_sglang_api_types", path)
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules["_sglang_api_types"] = mod
    mod_spec.loader.exec_module(mod)
    return mod


def test_client_generate_bodies_pass_sglang_schema():
    api = _api_types()
    reqs = [
        RolloutRequest([5, 6, 7], SamplingParams()),
        RolloutRequest([5], SamplingParams(max_new_tokens=9, temperature=0.0, top_p=0.9, top_k=20, min_p=0.05,
                                           stop_token_ids=[2, 7], ignore_eos=True, n=8, sampling_seed=4)),
    ]
    for r in reqs:
        for n in (1, 3):
            for routes in (False, True):
                body = generate_body(r, n, routes)
                api.GenerateRequest.from_json_value(body)  # raises JsonContractError on a violation
    # the schema is a real gate: it rejects what SGLang rejects
    with pytest.raises(Exception, match="bogus"):
        api.GenerateRequest.from_json_value({"input_ids": [1], "sampling_params": {"bogus": 1}})


def test_embedded_server_rejects_what_sglang_schema_rejects():
    """The embedded server's sampling-key list equals the schema's fields."""
    api = _api_types()
    import msgspec

    from moe_rl.rollout.embedded.protocol import SGLANG_SAMPLING_KEYS

    fields = {f.encode_name for f in msgspec.structs.fields(api.SamplingParams)}
    assert set(SGLANG_SAMPLING_KEYS) == fields


# ------------------------------------------------------------------ process lifecycle (no GPU):
# the planned argv is replaced by a small python child, the rest is SGLangServers' own code.

def _open_fds_under(directory) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)):
            out.append(target)
    return out


def _servers(tmp_path, code, n=2):
    from moe_rl.rollout.sglang_backend import LaunchSpec, SGLangServers

    srv = SGLangServers(SGLangConfig(model_path="/ckpt", num_servers=n, startup_timeout_s=30), str(tmp_path / "logs"))
    srv.specs = [LaunchSpec([sys.executable, "-c", code], f"http://127.0.0.1:{9 + i}", [i]) for i in range(n)]
    return srv


def test_failed_start_leaves_no_log_file_open(tmp_path):
    srv = _servers(tmp_path, "print('server says hi', flush=True); raise SystemExit(3)")
    # the caller keeps the error (and so the traceback's frames) alive, as one that reports it does
    with pytest.raises(RuntimeError, match="exited with 3 during startup") as err:
        srv.start()
    assert _open_fds_under(tmp_path) == [] and srv.procs == [], err
    assert "server says hi" in (tmp_path / "logs" / "sglang-0.log").read_text()


def test_started_servers_hold_no_log_file_open_here(tmp_path, monkeypatch):
    import moe_rl.rollout.sglang_backend as backend

    def healthy_when_logged(urls, *, deadline_s, procs=None, path="/health"):
        end = time.monotonic() + deadline_s
        while any("up" not in (tmp_path / "logs" / f"sglang-{i}.log").read_text() for i in range(len(urls))):
            assert time.monotonic() < end
            time.sleep(0.05)

    monkeypatch.setattr(backend, "wait_healthy", healthy_when_logged)
    srv = _servers(tmp_path, "import time; print('up', flush=True); time.sleep(60)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        srv.start()
        gc.collect()
    # a log file left for the garbage collector to close says so
    assert not [w for w in caught if str(tmp_path) in str(w.message)], [str(w.message) for w in caught]
    try:
        procs = list(srv.procs)
        assert all(p.poll() is None for p in procs)
        assert _open_fds_under(tmp_path) == []  # the children write through their own descriptors
    finally:
        srv.stop(grace_s=5)
    assert all(p.returncode is not None for p in procs) and _open_fds_under(tmp_path) == []


def test_remote_code_is_opt_in_and_the_api_key_reaches_server_and_client():
    a = launch_command(SGLangConfig(model_path="/ckpt")).argv
    assert "--trust-remote-code" not in a and "--api-key" not in a
    a = launch_command(SGLangConfig(model_path="/ckpt", trust_remote_code=True, api_key="k1")).argv
    assert "--trust-remote-code" in a and _flag(a, "--api-key") == "k1"
    rc = RolloutConfig(backend="sglang", sglang=SGLangConfig(model_path="/ckpt", api_key="k1"))
    assert rc.client.api_key == "k1" and "k1" not in repr(rc)
    with pytest.raises(ValueError, match="api_key"):
        RolloutConfig(backend="sglang", sglang=SGLangConfig(api_key="k1"), client=ClientConfig(api_key="k2"))


# ------------------------------------------------------------------ GPU placement, as SGLang 0.5.23 places
# processes (no GPU needed). Reference: its DataParallelController starts replica r's tp rank t on
# GPU base_gpu_id + r * tp_size + (t % tp_per_node) (pp_size 1, gpu_id_step 1), written out here
# independently of sglang_backend's arithmetic.

def _sglang_gpus_of(argv) -> set:
    tp, dp = int(_flag(argv, "--tp-size")), int(_flag(argv, "--dp-size"))
    nnodes = int(_flag(argv, "--nnodes")) if "--nnodes" in argv else 1
    base = int(_flag(argv, "--base-gpu-id"))
    tp_per_node = tp // nnodes
    return {base + r * tp + (t % tp_per_node) for r in range(dp) for t in range(tp_per_node)}


NODE_SHAPES = [  # (config on an 8-GPU node, GPUs each server must own)
    (dict(num_servers=8, tp_size=1), [[i] for i in range(8)]),
    (dict(num_servers=2, tp_size=4, ep_size=4), [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (dict(num_servers=1, tp_size=4, dp_size=2), [list(range(8))]),  # the reported bug: not GPUs 0-3 only
    (dict(num_servers=2, tp_size=2, dp_size=2), [[0, 1, 2, 3], [4, 5, 6, 7]]),
    (dict(num_servers=4, tp_size=1, dp_size=2), [[0, 1], [2, 3], [4, 5], [6, 7]]),
    (dict(num_servers=1, tp_size=8, ep_size=8, attn_dp_size=8), [list(range(8))]),
    (dict(num_servers=1, tp_size=4, dp_size=2, base_gpu_id=0), [list(range(8))]),
    (dict(num_servers=3, tp_size=2, base_gpu_id=2), [[2, 3], [4, 5], [6, 7]]),  # training keeps GPUs 0-1
    (dict(num_servers=1, tp_size=16, ep_size=16, attn_dp_size=16, nnodes=2, node_rank=1,
          dist_init_addr="10.0.0.1:5000"), [list(range(8))]),
]


@pytest.mark.parametrize("kw, expect", NODE_SHAPES)
def test_gpu_placement_of_every_server_matches_sglang(kw, expect):
    specs = launch_commands(SGLangConfig(model_path="/ckpt", **kw))
    assert [s.gpu_ids for s in specs] == expect
    seen = set()
    for s in specs:
        used = _sglang_gpus_of(s.argv)  # where SGLang will really put this server's processes
        assert used == set(s.gpu_ids), (s.argv, s.gpu_ids)
        assert not used & seen, f"servers overlap on GPUs {sorted(used & seen)}"
        assert max(used) < 8
        seen |= used
    # the servers' environment exposes every GPU a replica lands on (SGLang indexes into it)
    visible = list(range(specs[-1].gpu_ids[-1] + 1))
    assert seen <= set(visible)


@pytest.mark.parametrize("kw, msg", [
    (dict(dp_size=2, tp_size=4, attn_dp_size=2), "data-parallel replicas combined with attention data parallelism"),
    (dict(dp_size=2, tp_size=8, nnodes=2, dist_init_addr="h:1"), "does not support multi-node data-parallel"),
    (dict(tp_size=6, nnodes=4, dist_init_addr="h:1"), r"nnodes \(4\) must divide sglang.tp_size \(6\)"),
    (dict(extra_args=["--base-gpu-id", "3"]), "extra_args sets --base-gpu-id"),
    (dict(extra_args=["--gpu-id-step=2"]), "extra_args sets --gpu-id-step"),
])
def test_sglang_config_refuses_what_sglang_refuses(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SGLangConfig(model_path="/ckpt", **kw)


def _sglang_parser():
    """SGLang's own CLI parser when sglang imports fully (a GPU install); else the same parser
    rebuilt from the field declarations in the installed wheel (``srt/arg_groups/fields/*.py``:
    ``--`` + field name with ``_`` -> ``-``, aliases from ``Arg(aliases=...)``, bool fields
    are store_true); else None."""
    import argparse
    import ast
    import glob

    try:
        from sglang.srt.server_args import ServerArgs

        p = argparse.ArgumentParser(exit_on_error=False)
        ServerArgs.add_cli_args(p)
        return p
    except Exception:  # noqa: BLE001 - sglang is installed without its heavy deps here
        pass
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    files = glob.glob(os.path.join(root, "srt", "arg_groups", "fields", "*.py"))
    if not files:
        return None
    p = argparse.ArgumentParser(exit_on_error=False)
    for path in files:
        for node in ast.walk(ast.parse(open(path).read())):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            ann = node.annotation
            if not (isinstance(ann, ast.Subscript) and isinstance(ann.value, ast.Name) and ann.value.id == "A"):
                continue
            parts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
            typ = ast.unparse(parts[0])
            names = ["--" + node.target.id.replace("_", "-")]
            for extra in parts[1:]:
                if isinstance(extra, ast.Call):
                    for k in extra.keywords:
                        if k.arg == "aliases":
                            names += [ast.literal_eval(e) for e in k.value.elts]
            if typ in ("bool", "Optional[bool]"):
                p.add_argument(*names, action="store_true")
            elif typ.startswith(("List[", "list[", "Optional[List", "Optional[list")):
                p.add_argument(*names, nargs="+")
            else:
                p.add_argument(*names, type={"int": int, "float": float}.get(typ, str))
    return p


def test_every_generated_command_line_parses_with_sglangs_flags():
    parser = _sglang_parser()
    configs = [SGLangConfig(model_path="/ckpt", **kw) for kw, _ in NODE_SHAPES]
    configs.append(SGLangConfig(model_path="/ckpt", trust_remote_code=True, api_key="k", random_seed=3,
                                enable_weights_cpu_backup=True, extra_args=["--log-level", "info"]))
    argvs = [s.argv for c in configs for s in launch_commands(c)]
    if parser is None:
        # without the wheel: the flags read from SGLang 0.5.23's field declarations by hand
        known = {"--model-path", "--host", "--port", "--tp-size", "--dp-size", "--ep-size", "--attn-dp-size",
                 "--mem-fraction-static", "--weight-version", "--base-gpu-id", "--trust-remote-code", "--api-key",
                 "--enable-memory-saver", "--enable-weights-cpu-backup", "--enable-return-routed-experts",
                 "--skip-server-warmup", "--enable-metrics", "--random-seed", "--nnodes", "--node-rank",
                 "--dist-init-addr", "--log-level"}
        for a in argvs:
            assert {x for x in a[3:] if x.startswith("--")} <= known, a
        return
    for a in argvs:
        ns = parser.parse_args(a[3:])  # raises on an unknown flag or a bad value
        assert ns.tp_size == int(_flag(a, "--tp-size")) and ns.dp_size == int(_flag(a, "--dp-size"))
        assert ns.base_gpu_id == int(_flag(a, "--base-gpu-id")) and ns.model_path == "/ckpt"
    # the parser is a real gate: it refuses flags SGLang dropped
    with pytest.raises((SystemExit, Exception)):
        parser.parse_args(["--model-path", "/ckpt", "--enable-ep-moe"])


def test_serve_prints_the_planned_server_of_this_slurm_task(monkeypatch, capsys, tmp_path):
    """``serve`` (one Slurm task per server) plans from the run's YAML + overrides: the task's
    SLURM_LOCALID picks the server, SLURM_NODEID the node rank of a multi-node server."""
    from moe_rl.rollout.sglang_backend import serve

    cfg = tmp_path / "run.yaml"
    cfg.write_text("rollout:\n  sglang:\n    num_servers: 2\n    tp_size: 2\n    dp_size: 2\n    base_port: 31000\n")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert serve(["--print", str(cfg), "rollout.sglang.model_path=/m", "rollout.sglang.host=0.0.0.0"]) == 0
    argv = capsys.readouterr().out.split()
    assert _flag(argv, "--port") == "31001" and _flag(argv, "--base-gpu-id") == "4"  # server 1: GPUs 4-7
    assert _flag(argv, "--host") == "0.0.0.0" and _flag(argv, "--model-path") == "/m"
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODEID", "1")
    assert serve(["--print", str(cfg), "rollout.sglang.model_path=/m", "rollout.sglang.num_servers=1",
                  "rollout.sglang.dp_size=1", "rollout.sglang.tp_size=16", "rollout.sglang.nnodes=2",
                  "rollout.sglang.dist_init_addr=n5:30009"]) == 0
    argv = capsys.readouterr().out.split()
    assert _flag(argv, "--node-rank") == "1" and _flag(argv, "--dist-init-addr") == "n5:30009"
    assert serve(["--print", str(cfg), "rollout.sglang.dp_size=2", "rollout.sglang.attn_dp_size=2"]) == 2
    assert "attention data parallelism" in capsys.readouterr().err
