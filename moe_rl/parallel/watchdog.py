"""Fail fast when a rollout server dies, instead of idling until the walltime.

Who watches what in a job:
- A training rank that dies ends its ``srun`` step at once: the templates run the ranks with
  ``srun --kill-on-bad-exit=1``, so Slurm kills the step's other tasks (torchrun's agent does
  the same on one node). Nothing in Python is needed for that, and nothing here may be: a
  survivor blocked in a gloo/NCCL collective runs no Python code until the collective fails.
- A rollout server is not one of the ranks. :class:`ServerWatch` (a daemon thread on rank 0,
  started by ``moe_rl.launch``) probes every ``rollout.client.server_urls`` entry's ``/health``.
  A server whose port refuses connections ``confirm`` times in a row (its process is gone),
  or that has not answered 200 for ``stall_s``, ends rank 0 with exit code
  :data:`EXIT_SERVER_DIED` and a message naming the server, its host, and the rank, node
  and pid that stopped; the launcher then ends the other ranks.
  Bound from the server's death to rank 0's exit: ``interval_s * confirm`` plus one probe
  (a refused connection answers at once): 6 s with the defaults.
- The sbatch templates also start the servers as their own ``srun`` steps and end the job
  as soon as any step ends early (bash ``wait -n``); they use :func:`wait_healthy` (the
  ``wait`` command below) for the startup health check with a deadline.

    python -m moe_rl.parallel.watchdog wait --deadline-s 900 [--pid PID ...] URL [URL ...]

exits 0 once every URL answers ``/health`` with 200, 1 at the deadline (naming the servers
that did not answer) or as soon as one of the PIDs (the ``srun`` steps running the servers)
has exited.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import threading
import time
from typing import Callable, Optional, Sequence
from urllib.parse import urlsplit

import httpx

EXIT_SERVER_DIED = 4  # rank 0's exit code when a rollout server died (moe_rl.launch's codes: 0, 2, 3, 4)


@dataclasses.dataclass
class WatchdogConfig:
    """How rank 0 watches the rollout servers named in ``rollout.client.server_urls``."""

    enabled: bool = True  # watch the servers at all
    interval_s: float = 2.0  # seconds between two probes of one server
    confirm: int = 3  # refused connections in a row that mean the server's process is gone
    stall_s: float = 300.0  # no 200 from /health for this long also means gone (a hung server)
    probe_timeout_s: float = 10.0  # one /health probe (SGLang's /health runs a 1-token generate)

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.probe_timeout_s <= 0:
            raise ValueError(f"watchdog.interval_s ({self.interval_s}) and probe_timeout_s "
                             f"({self.probe_timeout_s}) must be > 0")
        if self.confirm < 1:
            raise ValueError(f"watchdog.confirm ({self.confirm}) must be >= 1")
        if self.stall_s < self.interval_s * self.confirm:
            raise ValueError(f"watchdog.stall_s ({self.stall_s}) must be >= interval_s * confirm "
                             f"({self.interval_s * self.confirm})")


def host_of(url: str) -> str:
    return urlsplit(url).hostname or url


def whoami() -> str:
    """``rank R on NODE (pid P)``: this process, as a message names it."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return f"rank {rank} on {socket.gethostname()} (pid {os.getpid()})"


def _die(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_SERVER_DIED)


class ServerWatch:
    """Probes each server in a daemon thread; calls ``on_dead(message)`` once, when one is gone.
    The default ``on_dead`` prints the message and ends the process (exit code 4) without
    waiting for the main thread, which may be blocked in a collective or an HTTP call."""

    def __init__(self, urls: Sequence[str], cfg: WatchdogConfig, *,
                 on_dead: Callable[[str], None] = _die, clock: Callable[[], float] = time.monotonic) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self.cfg = cfg
        self.on_dead = on_dead
        self.clock = clock
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def probe(self, url: str) -> tuple[str, str]:
        """("ok" | "refused" | "unhealthy", detail) of one ``GET url/health``."""
        try:
            r = httpx.get(url + "/health", timeout=self.cfg.probe_timeout_s)
        except (httpx.ConnectError, httpx.RemoteProtocolError) as e:
            return "refused", f"{type(e).__name__}: {e}"
        except httpx.HTTPError as e:
            return "unhealthy", f"{type(e).__name__}: {e}"
        if r.status_code == 200:
            return "ok", ""
        return "unhealthy", f"HTTP {r.status_code}"

    def check_once(self, state: dict) -> Optional[str]:
        """One round over every server; the death message of the first one gone, else None.
        ``state`` maps url -> (refused in a row, time of the last 200)."""
        now = self.clock()
        for url in self.urls:
            refused, last_ok = state.get(url, (0, now))
            kind, detail = self.probe(url)
            if kind == "ok":
                state[url] = (0, self.clock())
                continue
            refused = refused + 1 if kind == "refused" else 0
            state[url] = (refused, last_ok)
            silent = self.clock() - last_ok
            if refused >= self.cfg.confirm or silent >= self.cfg.stall_s:
                why = (f"refused {refused} connections in a row" if refused >= self.cfg.confirm
                       else f"has not answered /health with 200 for {silent:.0f} s")
                return (f"[watchdog] rollout server {url} on node {host_of(url)} is gone: it {why} "
                        f"(last: {detail}); ending the job from {whoami()}")
        return None

    def _run(self) -> None:
        state: dict = {}
        while not self._stop.wait(self.cfg.interval_s):
            message = self.check_once(state)
            if message is not None and not self._stop.is_set():
                self.on_dead(message)
                return

    def start(self) -> "ServerWatch":
        self._thread = threading.Thread(target=self._run, name="server-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (before the run shuts its servers down on purpose)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.probe_timeout_s + 1)


def start_for(cfg, rank: int) -> Optional[ServerWatch]:
    """The run's watch (rank 0 only, and only when ``rollout.client.server_urls`` names
    servers); None otherwise. Call :meth:`ServerWatch.stop` before the run ends."""
    wcfg = cfg.watchdog
    urls = list(cfg.rollout.client.server_urls)
    if rank != 0 or not urls or not wcfg.enabled:
        return None
    return ServerWatch(urls, wcfg).start()


# --------------------------------------------------------------------------- startup health check
def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (an exited child its parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_healthy(urls: Sequence[str], *, deadline_s: float, pids: Sequence[int] = (), interval_s: float = 1.0,
                 probe_timeout_s: float = 5.0, log: Callable[[str], None] = print) -> None:
    """Poll every URL's ``/health`` until each has answered 200 once; RuntimeError naming the
    servers (and their nodes) still silent at the deadline, or the first of ``pids`` that exits."""
    start = time.monotonic()
    pending = [u.rstrip("/") for u in urls]
    while True:
        dead = [p for p in pids if not _alive(p)]
        if dead:
            raise RuntimeError(f"the server step(s) with pid {', '.join(map(str, dead))} ended before every "
                               f"server answered /health; still waiting for: "
                               + ", ".join(f"{u} (node {host_of(u)})" for u in pending))
        still = []
        for u in pending:
            try:
                if httpx.get(u + "/health", timeout=probe_timeout_s).status_code == 200:
                    log(f"[watchdog] {u} (node {host_of(u)}) is healthy after {time.monotonic() - start:.1f} s")
                    continue
            except httpx.HTTPError:
                pass
            still.append(u)
        pending = still
        if not pending:
            return
        if time.monotonic() - start > deadline_s:
            raise RuntimeError(f"not healthy after {deadline_s:.0f} s: "
                               + ", ".join(f"{u} (node {host_of(u)})" for u in pending)
                               + " - see the server logs")
        time.sleep(interval_s)


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_rl.parallel.watchdog")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait", help="wait until every server answers /health (deadline; watched pids)")
    w.add_argument("urls", nargs="+")
    w.add_argument("--deadline-s", type=float, required=True)
    w.add_argument("--pid", type=int, action="append", default=[], help="a server step's pid (repeatable)")
    w.add_argument("--interval-s", type=float, default=1.0)
    a = p.parse_args(argv)
    try:
        wait_healthy(a.urls, deadline_s=a.deadline_s, pids=a.pid, interval_s=a.interval_s,
                     log=lambda m: print(m, flush=True))
    except RuntimeError as e:
        print(f"[watchdog] {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
