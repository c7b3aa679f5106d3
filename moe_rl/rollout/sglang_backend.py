"""Launch, health-check, register and tear down real SGLang servers (and sglang-router).

Flag names are sglang 0.5.23's (``python -m sglang.launch_server --help``):
``--ep-size`` (``--enable-ep-moe`` no longer exists),
``--attn-dp-size`` (not ``--enable-dp-attention``), ``--enable-return-routed-experts``.
Plan as data, then execute: :func:`launch_commands` is pure and unit-tested;
:class:`SGLangServers` runs the plan (each server in its own process group, so teardown
kills the scheduler/detokenizer children too).

Under Slurm each server is one task, which becomes the server process (the sbatch templates
in ``slurm/``)::

    srun --ntasks-per-node=S python -m moe_rl.rollout.sglang_backend serve CONFIG.yaml [key=value ...]

loads the run's config and execs server ``--index`` (default ``$SLURM_LOCALID``) of
``rollout.sglang``: its port, GPUs and flags are the ones :func:`launch_command` plans.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time

import httpx

from moe_rl.rollout.config import SGLangConfig


@dataclasses.dataclass
class LaunchSpec:
    """One server to start: its argv, URL and the GPUs it owns on its node (every replica's)."""

    argv: list[str]
    url: str
    gpu_ids: list[int]


def gpus_per_server(cfg: SGLangConfig) -> int:
    """GPUs one server occupies on each of its nodes: ``dp_size * tp_size / nnodes``.

    SGLang 0.5.23 (``managers/data_parallel_controller.py``) starts data-parallel replica r
    of a server on GPUs ``base_gpu_id + r*tp_size + tp_rank`` (pp_size 1, gpu_id_step 1), so a
    dp2 x tp4 server owns 8 GPUs, not 4. Attention DP stays inside the tp_size GPUs."""
    return cfg.dp_size * cfg.tp_size // cfg.nnodes


def server_gpus(cfg: SGLangConfig, index: int = 0) -> list[int]:
    """GPU indices (within the node's visible devices) that server ``index`` occupies on its node:
    consecutive servers get adjacent, non-overlapping ranges."""
    n = gpus_per_server(cfg)
    base = cfg.base_gpu_id + index * n
    return list(range(base, base + n))


def launch_command(cfg: SGLangConfig, index: int = 0) -> LaunchSpec:
    """The ``python -m sglang.launch_server`` argv of server ``index`` (pure)."""
    if not cfg.model_path:
        raise ValueError("sglang.model_path is empty")
    if not 0 <= index < cfg.num_servers:
        raise ValueError(f"server index ({index}) must be in [0, num_servers={cfg.num_servers})")
    port = cfg.base_port + index
    gpu_ids = server_gpus(cfg, index)
    base_gpu = gpu_ids[0]
    a = [cfg.python, "-m", cfg.module,
         "--model-path", cfg.model_path,
         "--host", cfg.host, "--port", str(port),
         "--tp-size", str(cfg.tp_size), "--dp-size", str(cfg.dp_size), "--ep-size", str(cfg.ep_size),
         "--mem-fraction-static", str(cfg.mem_fraction_static),
         "--weight-version", cfg.weight_version, "--base-gpu-id", str(base_gpu)]
    if cfg.trust_remote_code:
        a.append("--trust-remote-code")
    if cfg.api_key:
        a += ["--api-key", cfg.api_key]
    if cfg.attn_dp_size > 1:
        a += ["--attn-dp-size", str(cfg.attn_dp_size)]
    if cfg.enable_memory_saver:
        a.append("--enable-memory-saver")
    if cfg.enable_weights_cpu_backup:
        a.append("--enable-weights-cpu-backup")
    if cfg.enable_return_routed_experts:
        a.append("--enable-return-routed-experts")
    if cfg.skip_server_warmup:
        a.append("--skip-server-warmup")
    if cfg.enable_metrics:
        a.append("--enable-metrics")
    if cfg.random_seed is not None:
        a += ["--random-seed", str(cfg.random_seed)]
    if cfg.nnodes > 1:
        a += ["--nnodes", str(cfg.nnodes), "--node-rank", str(cfg.node_rank), "--dist-init-addr", cfg.dist_init_addr]
    a += list(cfg.extra_args)
    return LaunchSpec(argv=a, url=f"http://{cfg.host}:{port}", gpu_ids=gpu_ids)


def launch_commands(cfg: SGLangConfig) -> list[LaunchSpec]:
    return [launch_command(cfg, i) for i in range(cfg.num_servers)]


def router_command(worker_urls: list[str], *, port: int, host: str = "127.0.0.1", python: str = "python",
                   policy: str = "round_robin", prometheus_port: int | None = None) -> list[str]:
    """``sglang_router.launch_router`` argv (0.3.2); both hosts set, they default to 0.0.0.0."""
    return [python, "-m", "sglang_router.launch_router", "--host", host, "--port", str(port),
            "--prometheus-host", host, "--prometheus-port", str(prometheus_port or port + 1),
            "--worker-urls", *worker_urls, "--policy", policy,
            "--health-check-interval-secs", "5", "--worker-startup-check-interval", "1"]


def wait_healthy(urls: list[str], *, deadline_s: float, procs: list[subprocess.Popen] | None = None,
                 path: str = "/health") -> None:
    """Poll ``path`` until every URL answers 200; raise naming the laggards at the deadline."""
    end = time.monotonic() + deadline_s
    pending = list(urls)
    while pending:
        for p in procs or []:
            if p.poll() is not None:
                raise RuntimeError(f"server process {p.args[:4]}... exited with {p.returncode} during startup")
        still = []
        for u in pending:
            try:
                if httpx.get(u + path, timeout=5).status_code == 200:
                    continue
            except httpx.HTTPError:
                pass
            still.append(u)
        pending = still
        if pending and time.monotonic() > end:
            raise TimeoutError(f"not healthy after {deadline_s:.0f}s: {pending}")
        if pending:
            time.sleep(1.0)


def register_with_router(router_url: str, worker_url: str, *, timeout_s: float = 60.0) -> str:
    """``POST /workers`` (0.3.2; the legacy /add_worker is 404), then poll until listed; -> worker id."""
    r = httpx.post(router_url + "/workers", json={"url": worker_url}, timeout=30)
    if r.status_code not in (200, 202):
        raise RuntimeError(f"router refused {worker_url}: HTTP {r.status_code} {r.text[:300]}")
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        workers = httpx.get(router_url + "/workers", timeout=30).json()
        for w in workers.get("workers", workers if isinstance(workers, list) else []):
            if w.get("url") == worker_url:
                return str(w.get("id"))
        time.sleep(0.5)
    raise TimeoutError(f"{worker_url} not listed by the router after {timeout_s}s")


class SGLangServers:
    """Start the planned servers (+ router), wait for health, kill them all on :meth:`stop`."""

    def __init__(self, cfg: SGLangConfig, log_dir: str) -> None:
        self.cfg = cfg
        self.log_dir = log_dir
        self.specs = launch_commands(cfg)
        self.procs: list[subprocess.Popen] = []
        self.router_url = ""

    def start(self) -> list[str]:
        os.makedirs(self.log_dir, exist_ok=True)
        try:
            for i, spec in enumerate(self.specs):
                env = dict(os.environ)
                if "CUDA_VISIBLE_DEVICES" not in env:
                    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(spec.gpu_ids[-1] + 1))
                self.procs.append(self._popen(spec.argv, f"sglang-{i}.log", env=env))
            urls = [s.url for s in self.specs]
            wait_healthy(urls, deadline_s=self.cfg.startup_timeout_s, procs=self.procs)
            if self.cfg.router_port:
                argv = router_command(urls, port=self.cfg.router_port, host=self.cfg.host, python=self.cfg.python)
                self.procs.append(self._popen(argv, "router.log"))
                self.router_url = f"http://{self.cfg.host}:{self.cfg.router_port}"
                wait_healthy([self.router_url], deadline_s=120, procs=self.procs[-1:])
            return urls
        except BaseException:
            self.stop()
            raise

    def _popen(self, argv: list[str], log_name: str, env: dict | None = None) -> subprocess.Popen:
        """Start ``argv`` in a session of its own, stdout and stderr to ``log_dir/log_name``.
        The child writes through its own copy of the descriptor; ours is closed at once, so
        no server (started, failed or stopped) leaves an open log file in this process."""
        with open(os.path.join(self.log_dir, log_name), "w") as log:
            return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def stop(self, grace_s: float = 20.0) -> None:
        """Kill every server: SIGTERM to its process group, SIGKILL after ``grace_s``."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=10)
        self.procs = []


def serve(argv: list[str]) -> int:
    """``serve [--index I] [--print] [CONFIG.yaml] [key=value ...]``: exec server I of the run's
    ``rollout.sglang`` (the process becomes the server), or print its argv with ``--print``."""
    from moe_rl.config import ConfigError, load_config
    from moe_rl.config.run import RunConfig

    ap = argparse.ArgumentParser(prog="python -m moe_rl.rollout.sglang_backend serve")
    ap.add_argument("--index", type=int, default=int(os.environ.get("SLURM_LOCALID", "0")),
                    help="server index on this node (default: $SLURM_LOCALID, one Slurm task per server)")
    ap.add_argument("--print", action="store_true", help="print the argv, start nothing")
    ap.add_argument("args", nargs="*", help="CONFIG.yaml, then dotted key=value overrides")
    a = ap.parse_args(argv)
    path = a.args[0] if a.args and "=" not in a.args[0] else None
    try:
        cfg = load_config(RunConfig, path, a.args[1:] if path else a.args).rollout.sglang
        if cfg.nnodes > 1 and "SLURM_NODEID" in os.environ:  # one task per node of a multi-node server
            cfg = dataclasses.replace(cfg, node_rank=int(os.environ["SLURM_NODEID"]))
        spec = launch_command(cfg, a.index)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    if a.print:
        print(" ".join(spec.argv))
        return 0
    env = dict(os.environ)
    if "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(spec.gpu_ids[-1] + 1))
    print(f"[sglang_backend] server {a.index} on {os.uname().nodename}: {spec.url}, GPUs {spec.gpu_ids}",
          file=sys.stderr, flush=True)
    os.execvpe(spec.argv[0], spec.argv, env)
    return 1  # not reached


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        print("usage: python -m moe_rl.rollout.sglang_backend serve [--index I] [--print] CONFIG.yaml [key=value ...]",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(serve(sys.argv[2:]))
