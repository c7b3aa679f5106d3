"""Embedded SGLang-protocol servers as subprocesses on 127.0.0.1, for the HTTP tests."""


from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

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


