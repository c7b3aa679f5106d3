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


def start_embedded(model_dir: str, log_dir, *, max_running: int = 4, name: str = "srv",
                   extra: tuple[str, ...] = ()) -> ServerProc:
    port = free_port()
    argv = [sys.executable, "-m", "moe_rl.rollout.embedded.server", "--model", str(model_dir), "--port",
            str(port), "--max-running", str(max_running), "--num-threads", "1", *extra]
    return ServerProc(argv, f"http://127.0.0.1:{port}", os.path.join(str(log_dir), f"{name}-{port}.log"))




class InProcessServer:
    """``build_app`` over an engine of this process, served by uvicorn on 127.0.0.1 in a thread
    (for tests that reach into the engine, e.g. to inject a fault into its forward)."""

    def __init__(self, engine, options=None, tokenizer=None) -> None:
        import threading

        import uvicorn

        from moe_rl.rollout.embedded.server import build_app

        self.engine = engine
        self.app = build_app(engine, options, tokenizer=tokenizer)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                    access_log=False, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        end = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > end:
                raise RuntimeError("in-process server did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.engine.stop("test over")
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.app.state.ctx.close()


def post_generate(srv, body: dict, status: int = 200, timeout: float = 120) -> dict:
    """``POST /generate`` to the server ``srv`` (anything with a ``url``); asserts the status."""
    r = httpx.post(srv.url + "/generate", json=body, timeout=timeout)
    assert r.status_code == status, r.text
    return r.json()


def tiny_model_with_tokenizer(directory) -> str:
    """A tiny random Qwen3-MoE (seed 0) with the offline test tokenizer saved beside it."""
    from moe_rl.data.tokenizer import build_tokenizer
    from moe_rl.models.tiny import save_tiny_hf

    path = save_tiny_hf("qwen3_moe", directory, seed=0)
    build_tokenizer(512).save_pretrained(path)
    return path
