"""Stages 2, 7 and 8 of the loop against engine servers over HTTP (SGLang's protocol): the
``async`` mode, and the ``sync`` mode when the engines are servers."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
import torch.distributed as dist

from moe_rl.config.run import RunConfig
from moe_rl.rollout.requests import make_requests
from moe_rl.rollout.types import Sample

if TYPE_CHECKING:
    from moe_rl.train.trainer import Trainer


class ServerRollout:
    """Stages 2, 7 and 8 against engine servers over HTTP (SGLang's protocol): the async mode,
    and the sync mode when ``rollout.client.server_urls`` names servers.

    With no URLs, rank 0 starts the embedded engine as its own server process on a free
    loopback port (and stops it at the end). Rank 0 drives generation through the
    ``RolloutClient`` (in a background thread for a prefetched batch) and broadcasts the
    samples; weight sync is ``moe_rl.weights.sync.WeightSync`` (every rank takes part in the
    export, rank 0 pauses, commits and resumes the engines). Before a sync the prefetched
    generation is waited for, so every group is one weight version. In sync mode on GPUs
    the engines release their memory during training (``offloaded``)."""

    def __init__(self, cfg: RunConfig, hf_dir: str, plan, trainer: Trainer, *, show_progress: bool) -> None:
        import concurrent.futures as cf

        from moe_rl.rollout.client import RolloutClient
        from moe_rl.weights.sync import WeightSync

        self.cfg, self.trainer, self.show_progress = cfg, trainer, show_progress
        self.server = None
        urls = list(cfg.rollout.client.server_urls)
        if not urls and dist.get_rank() == 0:
            self.server, url = start_engine_server(cfg, hf_dir)
            urls = [url]
        box = [urls]
        dist.broadcast_object_list(box, src=0)
        client_cfg = dataclasses.replace(cfg.rollout.client, server_urls=box[0], return_routed_experts=False)
        self.client = RolloutClient(client_cfg)
        self.sync = WeightSync(cfg.weights, self.client, plan, trainer.groups, hf_dir=hf_dir)
        self.pool = cf.ThreadPoolExecutor(1, thread_name_prefix="prefetch") if dist.get_rank() == 0 else None
        self.pending: Optional[tuple] = None  # (step, future on rank 0)
        self.last_sync: Dict[str, float] = {}

    def _generate_rank0(self, step: int, rnd: int, prompts) -> List[Sample]:
        reqs = make_requests(self.cfg, step, rnd, prompts)
        return [dataclasses.replace(s, routed_experts_TLK=None) for s in self.client.generate(reqs)]

    def generate(self, step: int, rnd: int, prompts) -> List[Sample]:
        box: List[Any] = [None]
        if dist.get_rank() == 0:
            if self.pending is not None and self.pending[0] == step and rnd == 0:
                box[0] = self.pending[1].result()
            else:
                box[0] = self._generate_rank0(step, rnd, prompts)
        if self.pending is not None and self.pending[0] == step:
            self.pending = None
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def prefetch(self, step: int, prompts) -> None:
        fut = self.pool.submit(self._generate_rank0, step, 0, prompts) if self.pool is not None else None
        self.pending = (step, fut)

    def sync_weights(self, version: int) -> None:
        if self.pending is not None and self.pool is not None:
            self.pending[1].exception()  # wait: the batch in flight keeps the version it started with
        self.last_sync = self.sync.sync(self.trainer.built, version)

    @contextlib.contextmanager
    def offloaded(self):
        colocated = self.cfg.loop.mode == "sync" and torch.cuda.is_available()
        if colocated and dist.get_rank() == 0:
            self.client.release_memory_occupation()
        try:
            yield
        finally:
            if colocated and dist.get_rank() == 0:
                self.client.resume_memory_occupation()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.sync.close()
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(timeout=10)
            except Exception:  # noqa: BLE001 - it is going away either way
                self.server.kill()


def start_engine_server(cfg: RunConfig, hf_dir: str):
    """The embedded engine as its own server process on a free loopback port; waits for
    ``/health`` (``rollout.sglang.startup_timeout_s``) and returns (process, URL)."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    e = cfg.rollout.embedded
    cmd = [sys.executable, "-m", "moe_rl.rollout.embedded.server", "--model", e.model_path or hf_dir,
           "--host", "127.0.0.1", "--port", str(port), "--max-running", str(e.max_running),
           "--weight-version", "0", "--dtype", e.dtype, "--no-routed-experts",
           "--num-threads", str(e.num_threads or 1)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + cfg.rollout.sglang.startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the engine server exited with code {proc.returncode} before answering: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the engine server did not answer {url}/health within {cfg.rollout.sglang.startup_timeout_s} s")
