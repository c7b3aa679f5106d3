"""Real servers on 127.0.0.1 for the HTTP tests: start, wait for /health, kill the process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    def __init__(self, argv: list[str], url: str, log_path: str) -> None:
        self.url = url
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_healthy(self, deadline_s: float = 90.0, path: str = "/health") -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.url} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.url} not healthy after {deadline_s}s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-3000:]

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


def start_embedded(model_dir: str, log_dir, *, max_running: int = 4, name: str = "srv") -> ServerProc:
    port = free_port()
    argv = [sys.executable, "-m", "moe_rl.rollout.embedded.server", "--model", str(model_dir), "--port",
            str(port), "--max-running", str(max_running), "--num-threads", "1"]
    return ServerProc(argv, f"http://127.0.0.1:{port}", os.path.join(str(log_dir), f"{name}-{port}.log"))


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """The tiny qwen3_moe checkpoint (seed 0) and a second one with other weights (seed 1)."""
    from moe_rl.models.tiny import save_tiny_hf

    root = tmp_path_factory.mktemp("ckpt")
    return {"v0": save_tiny_hf("qwen3_moe", root / "v0", seed=0), "v1": save_tiny_hf("qwen3_moe", root / "v1", seed=1)}


@pytest.fixture(scope="module")
def two_servers(tiny_ckpts, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    servers = [start_embedded(tiny_ckpts["v0"], logs, name=f"s{i}") for i in range(2)]
    try:
        for s in servers:
            s.wait_healthy()
        yield servers
    finally:
        for s in servers:
            s.kill()
