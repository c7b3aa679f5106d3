"""Stages 2, 7 and 8 of the loop against engine servers over HTTP (SGLang's protocol): the
``async`` mode, the ``sync`` mode when the engines are servers, and every run with
``rollout.backend=sglang``.

Which servers (rank 0 decides; every rank gets the URLs):
- ``rollout.client.server_urls`` set: those servers, started by someone else. Their weights
  are unknown to the run, so the first thing it does is a weight sync (version 0).
- else ``rollout.backend=sglang``: real SGLang servers launched by ``rollout/sglang_backend.py``
  from the policy's HF directory, ``--weight-version 0``, logs under ``<output_dir>/sglang``.
  A missing ``sglang`` package is a clear error before any work (:func:`check_sglang_installed`).
- else: the embedded engine as its own server process on a free loopback port.
Generation, weight sync and memory release are the same calls for all three: the embedded
server speaks SGLang's protocol, so it stands in for SGLang in the CPU tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from moe_rl.config.run import RunConfig
from moe_rl.rollout.in_process import check_stop_tokenizer, keeps_routes, without_routes
from moe_rl.rollout.requests import make_requests
from moe_rl.rollout.types import Sample

if TYPE_CHECKING:
    from moe_rl.train.trainer import Trainer


class ServerRollout:
    """Stages 2, 7 and 8 against engine servers over HTTP (the module docstring says which
    servers; the ones rank 0 started are stopped by :meth:`close`). Rank 0 drives generation through the
    ``RolloutClient`` (in a background thread for a prefetched batch) and broadcasts the
    samples; weight sync is ``moe_rl.weights.sync.WeightSync`` (every rank takes part in the
    export, rank 0 pauses, commits and resumes the engines). Before a sync the prefetched
    generation is waited for, so every group is one weight version. In sync mode on GPUs
    the engines release their memory during training (``offloaded``)."""

    def __init__(self, cfg: RunConfig, hf_dir: str, plan, trainer: Trainer, *, show_progress: bool) -> None:
        import concurrent.futures as cf

        from moe_rl.rollout.client import RolloutClient, RoutingLayout
        from moe_rl.weights.sync import WeightSync

        self.cfg, self.trainer, self.show_progress = cfg, trainer, show_progress
        self.stop_servers: Optional[Callable[[], None]] = None
        external = list(cfg.rollout.client.server_urls)
        box: List[Any] = [external or None, None]
        if not external and dist.get_rank() == 0:
            try:
                self.stop_servers, box[0] = start_servers(cfg, hf_dir)
            except Exception as e:  # noqa: BLE001 - every rank raises it
                box[1] = f"starting the rollout servers: {type(e).__name__}: {e}"
        dist.broadcast_object_list(box, src=0)
        if box[1]:
            raise RuntimeError(box[1])
        # routes only when routing reads them (R3, capture's rollout->old drift), and as the MoE
        # layout of the trainer's model (a real SGLang's /model_info does not describe it)
        self.keep_routes = keeps_routes(cfg, trainer.built.hf_config) and cfg.rollout.client.return_routed_experts
        client_cfg = dataclasses.replace(cfg.rollout.client, server_urls=box[0],
                                         return_routed_experts=self.keep_routes)
        layout = RoutingLayout.from_hf_config(trainer.built.hf_config) if self.keep_routes else None
        self.client = RolloutClient(client_cfg, layout)
        try:
            self.sync = WeightSync(weight_sync_config(cfg), self.client, plan, trainer.groups, hf_dir=hf_dir)
        except BaseException:
            if self.stop_servers is not None:  # no server outlives a run that could not start
                self.stop_servers()
            raise
        self.pool = cf.ThreadPoolExecutor(1, thread_name_prefix="prefetch") if dist.get_rank() == 0 else None
        self.pending: Optional[tuple] = None  # (step, future on rank 0)
        self.last_sync: Dict[str, float] = {}
        if external:  # servers of unknown weights: make them the policy's, as version 0
            self.sync_weights(0)

    def _generate_rank0(self, step: int, rnd: int, prompts) -> List[Sample]:
        return self._client_samples(make_requests(self.cfg, step, rnd, prompts), self.keep_routes)

    def _client_samples(self, reqs, keep_routes: bool) -> List[Sample]:
        """Rank 0: the servers' samples of ``reqs`` (their routes dropped unless kept)."""
        samples = self.client.generate(reqs)
        return samples if keep_routes else without_routes(samples)

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

    def run_requests(self, reqs, desc: str, *, keep_routes: bool | None = None) -> List[Sample]:
        """Every request's samples on every rank, in request order (collective: rank 0 sends them
        to the servers and broadcasts the samples). Not for the step's own batch, which may be
        in flight already (:meth:`generate`)."""
        box: List[Any] = [None]
        if dist.get_rank() == 0:
            box[0] = self._client_samples(reqs, self.keep_routes if keep_routes is None else keep_routes)
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
        try:
            self.sync.close()
        finally:
            if self.stop_servers is not None:
                self.stop_servers()


def weight_sync_config(cfg: RunConfig):
    """``cfg.weights`` with the ranks each engine joins a weight-update group with: an SGLang
    server's TP ranks (``rollout.sglang.tp_size``), one for the embedded engine."""
    w, s = cfg.weights, cfg.rollout.sglang
    if cfg.rollout.backend != "sglang":
        return w
    if w.engine_ranks not in (1, s.tp_size):
        raise ValueError(f"weights.engine_ranks ({w.engine_ranks}) must equal rollout.sglang.tp_size ({s.tp_size}): "
                         "every TP rank of an SGLang server joins the weight-update group")
    if w.transport == "distributed" and s.dp_size > 1:
        raise ValueError(f"weights.transport 'distributed' with rollout.sglang.dp_size ({s.dp_size}) > 1: SGLang "
                         "0.5.23 refuses update_weights_from_distributed with data-parallel replicas (its replicas "
                         "would join with the same ranks); use num_servers for replicas, or the tensor/disk transport")
    return dataclasses.replace(w, engine_ranks=s.tp_size)


def start_servers(cfg: RunConfig, hf_dir: str) -> Tuple[Callable[[], None], List[str]]:
    """Rank 0: start the servers the config asks for and wait until they answer; returns a
    function that stops them all and their URLs."""
    if cfg.rollout.backend == "sglang":
        from moe_rl.rollout.sglang_backend import SGLangServers

        s = cfg.rollout.sglang
        check_sglang_installed(s.python)
        servers = SGLangServers(dataclasses.replace(s, model_path=s.model_path or hf_dir, weight_version="0"),
                                os.path.join(cfg.output_dir, "sglang"))
        return servers.stop, servers.start()
    proc, url = start_engine_server(cfg, hf_dir)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # it is going away either way
            proc.kill()

    return stop, [url]


def check_sglang_installed(python: str) -> None:
    """ValueError unless ``python`` (``rollout.sglang.python``) can import sglang; looks the
    package up without importing it (an import takes seconds)."""
    probe = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('sglang') else 3)"
    try:
        rc = subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ValueError(f"rollout.sglang.python ({python!r}) cannot be run: {e}") from None
    if rc != 0:
        raise ValueError(f"rollout.backend=sglang: {python!r} has no sglang package (install the sglang extra: "
                         f"pip install 'moe_rl[sglang]', or point rollout.sglang.python at an interpreter "
                         f"that has sglang==0.5.23; or give running servers in rollout.client.server_urls)")


def _hf_config(path: str):
    import transformers

    return transformers.AutoConfig.from_pretrained(path)


def start_engine_server(cfg: RunConfig, hf_dir: str):
    """The embedded engine as its own server process on a free loopback port; waits for
    ``/health`` (``rollout.sglang.startup_timeout_s``) and returns (process, URL)."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    e = cfg.rollout.embedded
    check_stop_tokenizer(cfg, e.model_path or hf_dir)  # else every request would be refused
    cmd = [sys.executable, "-m", "moe_rl.rollout.embedded.server", "--model", e.model_path or hf_dir,
           "--host", "127.0.0.1", "--port", str(port), "--max-running", str(e.max_running),
           "--weight-version", "0", "--dtype", e.dtype, "--num-threads", str(e.num_threads or 1)]
    if not (e.capture_routed_experts and keeps_routes(cfg, _hf_config(e.model_path or hf_dir))):
        cmd.append("--no-routed-experts")  # capture costs the engine time; only when routing reads the routes
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
