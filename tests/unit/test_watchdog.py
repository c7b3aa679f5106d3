"""The fail-fast watchdog against real HTTP servers on 127.0.0.1 (no Slurm): a server that
goes away ends the watching process within the stated bound, naming the server and itself."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from moe_rl.parallel.watchdog import EXIT_SERVER_DIED, ServerWatch, WatchdogConfig, wait_healthy


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(type(self).status if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def _serve(status=200):
    handler = type("H", (_Health,), {"status": status})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def _free_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_a_server_that_goes_away_is_reported_within_the_bound():
    srv, url = _serve()
    cfg = WatchdogConfig(interval_s=0.1, confirm=3, stall_s=30.0, probe_timeout_s=2.0)
    seen, when = [], []
    watch = ServerWatch([url], cfg, on_dead=lambda m: (seen.append(m), when.append(time.monotonic()))).start()
    try:
        time.sleep(0.6)
        assert seen == []  # a healthy server is left alone
        srv.shutdown()
        srv.server_close()
        killed = time.monotonic()
        while not seen and time.monotonic() - killed < 10:
            time.sleep(0.02)
    finally:
        watch.stop()
    assert seen, "the watchdog did not notice the server going away"
    # bound: interval_s * confirm plus one probe (a refused connection answers at once)
    assert when[0] - killed <= cfg.interval_s * cfg.confirm + 1.0, when[0] - killed
    m = seen[0]
    assert url in m and "node 127.0.0.1" in m and "refused 3 connections" in m
    assert f"pid {os.getpid()}" in m and socket.gethostname() in m


def test_a_server_that_answers_but_never_healthy_is_reported_after_stall_s():
    srv, url = _serve(status=503)
    cfg = WatchdogConfig(interval_s=0.1, confirm=2, stall_s=0.5, probe_timeout_s=2.0)
    watch = ServerWatch([url], cfg)
    state: dict = {}
    t0 = time.monotonic()
    msg = None
    while msg is None and time.monotonic() - t0 < 5:
        msg = watch.check_once(state)
        time.sleep(0.1)
    srv.shutdown()
    assert msg is not None and "has not answered /health with 200" in msg and "HTTP 503" in msg
    assert 0.5 <= time.monotonic() - t0 < 3


def test_the_default_action_ends_the_process_with_exit_4_and_names_it():
    """The real path: a watching process with a dead server exits 4 on its own, even while its
    main thread is busy (here: sleeping, as one blocked in a collective would be)."""
    url = _free_url()
    code = ("import time; from moe_rl.parallel.watchdog import ServerWatch, WatchdogConfig; "
            f"ServerWatch([{url!r}], WatchdogConfig(interval_s=0.2, confirm=3)).start(); time.sleep(60)")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "RANK": "0"})
    took = time.monotonic() - t0
    assert p.returncode == EXIT_SERVER_DIED, p.stderr
    assert f"rollout server {url} on node 127.0.0.1 is gone" in p.stderr and "rank 0 on" in p.stderr
    assert took < 20, took


def test_wait_healthy_deadline_names_the_silent_server_and_a_dead_step_ends_it_early():
    srv, up = _serve()
    down = _free_url()
    wait_healthy([up], deadline_s=5, interval_s=0.1, log=lambda m: None)
    with pytest.raises(RuntimeError, match=f"not healthy after 0 s: {down} \\(node 127.0.0.1\\)"):
        wait_healthy([up, down], deadline_s=0.3, interval_s=0.1, log=lambda m: None)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=f"pid {gone.pid} ended before every server answered"):
        wait_healthy([down], deadline_s=60, pids=[gone.pid], interval_s=0.1, log=lambda m: None)
    assert time.monotonic() - t0 < 5
    srv.shutdown()


def test_wait_command_exit_codes():
    srv, up = _serve()
    ok = subprocess.run([sys.executable, "-m", "moe_rl.parallel.watchdog", "wait", "--deadline-s", "5", up],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "is healthy" in ok.stdout
    down = _free_url()
    bad = subprocess.run([sys.executable, "-m", "moe_rl.parallel.watchdog", "wait", "--deadline-s", "0.5",
                          "--interval-s", "0.1", down], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and down in bad.stderr
    srv.shutdown()


def test_config_is_validated():
    with pytest.raises(ValueError, match="confirm"):
        WatchdogConfig(confirm=0)
    with pytest.raises(ValueError, match="stall_s"):
        WatchdogConfig(interval_s=5, confirm=3, stall_s=10)


def test_save_on_signal_names_a_catchable_signal_and_the_handler_only_records_it():
    import os
    import signal

    import pytest

    from moe_rl.checkpoint.config import CheckpointConfig
    from moe_rl.parallel.stop_signal import StopSignal, parse_signal

    assert parse_signal("SIGUSR1") is parse_signal("usr1") is signal.SIGUSR1
    assert parse_signal("") is None and not StopSignal("").agreed()
    for bad in ("SIGKILL", "STOP", "SIGNOPE", "9"):
        with pytest.raises(ValueError, match=rf"checkpoint.save_on_signal \({bad!r}\)"):
            CheckpointConfig(save_on_signal=bad)
    stop = StopSignal("SIGUSR2")
    try:
        assert not stop.agreed()  # no process group: this process alone decides
        os.kill(os.getpid(), signal.SIGUSR2)  # would end the process without the handler
        assert stop.received is signal.SIGUSR2 and stop.agreed()
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
