"""RolloutClient against scripted SGLang-protocol servers on 127.0.0.1 (threads in this process).

The fake servers answer ``/generate`` in SGLang 0.5.23's response shape (one item per
sample, ``meta_info.weight_version``, ``finish_reason``, ``output_token_logprobs``) and do
whatever a test scripts: change weight version, fail with 5xx/429, hang, demand an API key.
Backoff waits go through a recording ``sleep`` so the tests see every wait without waiting.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch

from moe_rl.rollout import routed_experts_codec
from moe_rl.rollout.client import RESAMPLE_PAUSE_S, RolloutClient, RolloutError, _retry_after_s
from moe_rl.rollout.config import ClientConfig
from moe_rl.rollout.types import RolloutRequest, SamplingParams

pytestmark = pytest.mark.timeout(60)

TOKENS = [7, 8, 9]


def item(version: str, finish: str = "length") -> dict:
    """One ``/generate`` item as SGLang 0.5.23 returns it (``return_logprob=True``)."""
    reason: dict = {"type": finish}
    if finish == "abort":
        reason["message"] = "Abort in waiting queue"
    elif finish == "length":
        reason["length"] = len(TOKENS)
    meta = {"id": "x", "finish_reason": reason, "prompt_tokens": 3, "completion_tokens": len(TOKENS),
            "cached_tokens": 0, "weight_version": version, "e2e_latency": 0.001,
            "input_token_logprobs": [], "output_token_logprobs": [[-0.5, t, None] for t in TOKENS],
            "output_token_logprobs_length": len(TOKENS)}
    return {"output_ids": list(TOKENS), "meta_info": meta}


class FakeServer:
    """A threaded HTTP server speaking the parts of SGLang's protocol the client uses.

    ``on_generate(body) -> (status, json, headers)`` scripts ``/generate``; ``health`` is the
    ``/health`` status; ``control_status[path]`` makes a control path fail; ``hang`` holds
    the listed paths until the test ends; ``api_key`` makes it answer 401 without the key
    (``/health`` excepted, as SGLang does).
    """

    def __init__(self, version: str = "1") -> None:
        self.version = version
        self.health = 200
        self.health_text = ""
        self.on_generate = self.good
        self.control_status: dict[str, tuple[int, str]] = {}
        self.hang: set[str] = set()
        self.api_key = ""
        self.delay_s = 0.0
        self.log: list[tuple[float, str, str, dict]] = []  # (time, path, Authorization, body)
        self._release = threading.Event()
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw) if raw.strip() else {}
                status, payload, headers = fake.handle(method, self.path, self.headers.get("Authorization", ""),
                                                       body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def do_GET(self):
                self._answer("GET")

            def do_POST(self):
                self._answer("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def handle(self, method: str, path: str, auth: str, body: dict):
        with self._lock:
            self.log.append((time.monotonic(), path, auth, body))
        if path in self.hang:
            self._release.wait(10)
        if self.api_key and not path.startswith("/health") and auth != f"Bearer {self.api_key}":
            return 401, {"error": "Unauthorized"}, {}
        if path.startswith("/health"):
            return self.health, {"message": self.health_text}, {}
        if path == "/generate":
            if self.delay_s:
                time.sleep(self.delay_s)
            return self.on_generate(body)
        if path == "/model_info":
            return 200, {"weight_version": self.version, "num_hidden_layers": 3, "num_experts_per_tok": 2,
                         "moe_layer_ids": [1, 2]}, {}
        if path in self.control_status:
            status, text = self.control_status[path]
            return status, {"success": False, "message": text}, {}
        return 200, {"success": True, "message": "", "weight_version": self.version}, {}

    def good(self, body: dict):
        """Every sample finished at the current version."""
        n = body["sampling_params"].get("n", 1)
        items = [item(self.version) for _ in range(n)]
        return 200, (items[0] if n == 1 else items), {}

    def paths(self, path: str) -> list[tuple[float, str, str, dict]]:
        with self._lock:
            return [e for e in self.log if e[1] == path]

    def close(self) -> None:
        self._release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers():
    made: list[FakeServer] = []

    def make(k: int = 1) -> list[FakeServer]:
        new = [FakeServer() for _ in range(k)]
        made.extend(new)
        return new

    yield make
    for s in made:
        s.close()


class Waits:
    """A recording stand-in for ``asyncio.sleep``: every backoff wait, none actually waited."""

    def __init__(self) -> None:
        self.backoffs: list[float] = []

    async def __call__(self, seconds: float) -> None:
        if seconds != RESAMPLE_PAUSE_S:
            self.backoffs.append(seconds)
        await asyncio.sleep(0)


class TopOfRange(random.Random):
    """Full jitter that always draws the top of its range, so the waits are the bounds."""

    def uniform(self, a: float, b: float) -> float:
        return b


def requests(k: int = 1, n: int = 3) -> list[RolloutRequest]:
    return [RolloutRequest([1, 2, 3], SamplingParams(max_new_tokens=3, n=n), group_id=g) for g in range(k)]


def config(fakes: list[FakeServer], **kw) -> ClientConfig:
    kw.setdefault("return_routed_experts", False)
    kw.setdefault("request_timeout_s", 10.0)
    kw.setdefault("control_timeout_s", 10.0)
    kw.setdefault("health_timeout_s", 5.0)
    return ClientConfig(server_urls=[f.url for f in fakes], **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- one version per group
def scripted(fake: FakeServer, script: list[list[str]]):
    """``/generate`` answers from ``script``: one list of per-item versions (or "abort") per call."""
    calls = iter(script)

    def on_generate(body):
        versions = next(calls)
        n = body["sampling_params"].get("n", 1)
        assert n == len(versions), (n, versions)
        items = [item(fake.version, "abort") if v == "abort" else item(v) for v in versions]
        return 200, (items[0] if n == 1 else items), {}

    fake.on_generate = on_generate


@pytest.mark.parametrize("script, asked, stale", [
    # two samples aborted by a pause; the weights changed before they were asked again:
    # the v1 sample is dropped and asked again at v2
    ([["1", "abort", "abort"], ["2", "2"], ["2"]], [3, 2, 1], 1),
    # the sync happened while the re-ask ran: its own items mix versions; v2 is the newer one
    ([["1", "abort", "abort"], ["1", "2"], ["2", "2"]], [3, 2, 2], 2),
    # no change of version: nothing dropped
    ([["1", "abort", "1"], ["1"]], [3, 1], 0),
])
def test_a_group_is_one_weight_version(servers, script, asked, stale):
    (fake,) = servers(1)
    scripted(fake, script)
    client = RolloutClient(config([fake]), sleep=Waits())
    samples = client.generate(requests(1, n=3))
    final = script[-1][0]
    assert [s.weight_version for s in samples] == [final] * 3
    assert [s.sample_index for s in samples] == [0, 1, 2]
    assert [e[3]["sampling_params"].get("n", 1) for e in fake.paths("/generate")] == asked
    assert client.stats["stale_samples"] == stale


def test_mixed_versions_kept_when_allowed(servers):
    (fake,) = servers(1)
    scripted(fake, [["1", "abort", "abort"], ["2", "2"]])
    client = RolloutClient(config([fake], allow_mixed_versions=True), sleep=Waits())
    samples = client.generate(requests(1, n=3))
    assert [s.weight_version for s in samples] == ["1", "2", "2"]
    assert client.stats["mixed_version_groups"] == 1 and client.stats["stale_samples"] == 0


def test_version_changing_forever_is_bounded(servers):
    (fake,) = servers(1)
    count = iter(range(10**6))

    def on_generate(body):  # one sample per call, each at a new version; the rest aborted
        n = body["sampling_params"].get("n", 1)
        items = [item(str(next(count)))] + [item("x", "abort")] * (n - 1)
        return 200, (items[0] if n == 1 else items), {}

    fake.on_generate = on_generate
    client = RolloutClient(config([fake], max_attempts=1), sleep=Waits())
    with pytest.raises(RolloutError, match=r"group 0: 1 of 2 samples missing after 100 rounds"):
        client.generate(requests(1, n=2))
    assert len(fake.paths("/generate")) == 100


# ---------------------------------------------------------------------- backoff
def failing_then_ok(fake: FakeServer, failures: int, status: int = 503, headers: dict | None = None):
    calls = iter(range(10**6))

    def on_generate(body):
        if next(calls) < failures:
            return status, {"error": {"message": "engine overloaded"}}, headers or {}
        return fake.good(body)

    fake.on_generate = on_generate


def test_backoff_is_exponential_full_jitter_and_capped(servers):
    (fake,) = servers(1)
    failing_then_ok(fake, 4)
    waits = Waits()
    client = RolloutClient(config([fake], retry_backoff_base_s=0.1, retry_backoff_max_s=0.3),
                           sleep=waits, rng=TopOfRange())
    assert len(client.generate(requests(1, n=2))) == 2
    # the bound doubles per failure and stops at the cap
    assert waits.backoffs == pytest.approx([0.1, 0.2, 0.3, 0.3])
    # real dice: every wait lies in [0, min(cap, base * 2^(k-1))]
    failing_then_ok(fake, 6)
    waits = Waits()
    client = RolloutClient(config([fake], retry_backoff_base_s=0.1, retry_backoff_max_s=0.3),
                           sleep=waits, rng=random.Random(0))
    client.generate(requests(1, n=2))
    assert len(waits.backoffs) == 6
    for k, w in enumerate(waits.backoffs, start=1):
        assert 0.0 <= w <= min(0.3, 0.1 * 2 ** (k - 1))


def test_backoff_waits_between_attempts(servers):
    """Real sleeps, measured at the server: 503 twice, then 200; the gaps grow."""
    (fake,) = servers(1)
    failing_then_ok(fake, 2)
    waited: list[float] = []

    async def sleep(s):
        waited.append(s)
        await asyncio.sleep(s)

    client = RolloutClient(config([fake], retry_backoff_base_s=0.1, retry_backoff_max_s=1.0),
                           sleep=sleep, rng=TopOfRange())
    client.generate(requests(1, n=1))
    t = [e[0] for e in fake.paths("/generate")]
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert waited == pytest.approx([0.1, 0.2])
    assert len(gaps) == 2 and gaps[0] >= 0.1 and gaps[1] >= 0.2, gaps


@pytest.mark.parametrize("status, retry_after, expect", [
    (429, "0.25", 0.25),
    (503, "120", 0.5),  # bounded by the cap
    (503, None, 0.1),  # no header: full jitter from the base
    (500, "0.25", 0.1),  # only 429 and 503 carry a meaningful Retry-After
])
def test_retry_after(servers, status, retry_after, expect):
    (fake,) = servers(1)
    failing_then_ok(fake, 1, status, {"Retry-After": retry_after} if retry_after else {})
    waits = Waits()
    client = RolloutClient(config([fake], retry_backoff_base_s=0.1, retry_backoff_max_s=0.5),
                           sleep=waits, rng=TopOfRange())
    client.generate(requests(1, n=1))
    assert waits.backoffs == pytest.approx([expect])


def test_retry_after_parsing():
    resp = lambda v: httpx.Response(503, headers={"Retry-After": v})  # noqa: E731
    assert _retry_after_s(resp("3")) == 3.0
    assert _retry_after_s(resp("junk")) is None
    assert _retry_after_s(resp("inf")) is None
    assert _retry_after_s(httpx.Response(503)) is None
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= _retry_after_s(resp(future)) <= 31
    assert _retry_after_s(resp(email.utils.formatdate(time.time() - 30, usegmt=True))) == 0.0


def test_attempts_exhausted_names_url_status_and_text(servers):
    (fake,) = servers(1)
    fake.on_generate = lambda body: (503, {"error": {"message": "engine error: RuntimeError: boom"}}, {})
    waits = Waits()
    client = RolloutClient(config([fake], max_attempts=3), sleep=waits)
    with pytest.raises(RolloutError) as e:
        client.generate(requests(1, n=2))
    msg = str(e.value)
    assert f"{fake.url}/generate" in msg and "HTTP 503" in msg and "engine error: RuntimeError: boom" in msg, msg
    assert "after 3 failed attempts" in msg
    assert len(fake.paths("/generate")) == 3 and len(waits.backoffs) == 2


# ---------------------------------------------------------------------- failover
def broken(fake: FakeServer, text: str) -> None:
    """Our engine once its loop died: 500 on /generate, 503 on /health."""
    fake.on_generate = lambda body: (500, {"error": {"message": f"engine error: {text}"}}, {})
    fake.health, fake.health_text = 503, f"engine loop died: {text}"


def test_failover_to_a_healthy_server(servers):
    bad, good = servers(2)
    broken(bad, "RuntimeError: boom")
    good.delay_s = 0.02  # so requests overlap and least-loaded picks the broken one too
    client = RolloutClient(config([bad, good], max_concurrency=4, server_cooldown_s=0.0), sleep=Waits())
    samples = client.generate(requests(8, n=2))
    assert sorted((s.group_id, s.sample_index) for s in samples) == [(g, j) for g in range(8) for j in range(2)]
    assert len(bad.paths("/generate")) >= 1 and client.stats["server_failures"] >= 1
    # its cooldown is over, but its /health is 503: no request reaches it again
    before = len(bad.paths("/generate"))
    assert len(client.generate(requests(8, n=2))) == 16
    assert len(bad.paths("/generate")) == before
    assert len(bad.paths("/health")) >= 1
    assert "engine error: RuntimeError: boom" in client.servers[0].last_error
    assert "engine loop died" in client.servers[0].health_error


def test_no_server_left_names_each_server_and_its_error(servers):
    a, b = servers(2)
    broken(a, "RuntimeError: boom A")
    broken(b, "CUDA error B")
    client = RolloutClient(config([a, b]), sleep=Waits())
    t0 = time.monotonic()
    with pytest.raises(RolloutError) as e:
        client.generate(requests(3, n=2))
    msg = str(e.value)
    assert "no server left" in msg
    for fake, text in ((a, "RuntimeError: boom A"), (b, "CUDA error B")):
        assert fake.url in msg and f"engine error: {text}" in msg and f"engine loop died: {text}" in msg, msg
    assert time.monotonic() - t0 < 5


def test_hanging_server_times_out_and_fails_over(servers):
    hung, good = servers(2)
    hung.hang.add("/generate")
    client = RolloutClient(config([hung, good], request_timeout_s=0.5, max_concurrency=1), sleep=Waits())
    t0 = time.monotonic()
    samples = client.generate(requests(2, n=2))
    assert len(samples) == 4 and time.monotonic() - t0 < 5
    assert len(hung.paths("/generate")) == 1  # then it cools down
    assert "no answer within 0.5 s" in client.servers[0].last_error


def test_4xx_raises_at_once(servers):
    (fake,) = servers(1)
    fake.on_generate = lambda body: (400, {"error": {"message": "unknown field `bogus`"}}, {})
    client = RolloutClient(config([fake]), sleep=Waits())
    with pytest.raises(RolloutError, match=r"rejected the request \(HTTP 400\): unknown field `bogus`"):
        client.generate(requests(2, n=2))
    assert len(fake.paths("/generate")) <= 2  # one per group, no retries


# ---------------------------------------------------------------------- API key
def test_api_key_is_sent_on_every_call(servers):
    a, b = servers(2)
    for f in (a, b):
        f.api_key = "sekret"
    cfg = config([a, b], api_key="sekret", return_routed_experts=True)
    assert "sekret" not in repr(cfg)

    rows = 3 + len(TOKENS) - 1  # prompt + response - 1 (routed_experts_start_len 0)

    def with_routes(body):  # SGLang's routed_experts rows: all 3 hidden layers, top-2
        assert body["routed_experts_start_len"] == 0
        status, items, headers = a.good(body)
        for it in items if isinstance(items, list) else [items]:
            it["meta_info"]["routed_experts"] = routed_experts_codec.encode(
                torch.arange(rows * 3 * 2).reshape(rows, 3, 2))
        return status, items, headers

    a.on_generate = b.on_generate = with_routes
    client = RolloutClient(cfg, sleep=Waits())
    samples = client.generate(requests(4, n=2))  # asks /model_info for the layout first
    assert len(samples) == 8 and samples[0].routed_experts_NLK.shape == (rows, 2, 2)
    client.pause()
    client.flush_cache()
    client.update_weights_from_disk("/ckpt", weight_version="2")
    client.update_weight_version("3")
    client.continue_generation()
    assert client.weight_versions() == ["1", "1"]
    for f in client.init_weights_update_group("127.0.0.1", 1234, backend="gloo"):
        f.result(timeout=10)
    for f in (a, b):
        paths = {e[1] for e in f.log}
        assert {"/model_info", "/pause_generation", "/flush_cache", "/update_weights_from_disk",
                "/update_weight_version", "/continue_generation", "/init_weights_update_group"} <= paths
        assert {e[2] for e in f.log} == {"Bearer sekret"}, {(e[1], e[2]) for e in f.log}


def test_wrong_api_key_is_a_clear_error(servers):
    (fake,) = servers(1)
    fake.api_key = "sekret"
    client = RolloutClient(config([fake], api_key="wrong"), sleep=Waits())
    with pytest.raises(RolloutError, match=r"HTTP 401\): Unauthorized \(check client.api_key\)"):
        client.generate(requests(1, n=2))
    assert len(fake.paths("/generate")) == 1
    with pytest.raises(RolloutError, match="HTTP 401"):
        client.pause()


# ---------------------------------------------------------------------- control calls
def test_control_error_names_every_failing_server(servers):
    ok, refusing = servers(2)
    refusing.control_status["/pause_generation"] = (500, "scheduler is dead")
    gone = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = RolloutClient(ClientConfig(server_urls=[ok.url, refusing.url, gone], control_timeout_s=5.0))
    with pytest.raises(RolloutError) as e:
        client.pause()
    msg = str(e.value)
    assert "failed on 2 of 3 servers" in msg
    assert f"{refusing.url}/pause_generation: HTTP 500: scheduler is dead" in msg, msg
    assert f"{gone}/pause_generation: ConnectError" in msg, msg
    assert ok.url not in msg
    assert len(ok.paths("/pause_generation")) == 1  # the others were still called


def test_control_call_keeps_its_timeout(servers):
    ok, hung = servers(2)
    hung.hang.add("/flush_cache")
    client = RolloutClient(ClientConfig(server_urls=[ok.url, hung.url], control_timeout_s=0.3))
    t0 = time.monotonic()
    with pytest.raises(RolloutError, match=rf"{hung.url}/flush_cache: no answer within 0.3 s"):
        client._all("POST", "/flush_cache")
    with pytest.raises(RolloutError, match=rf"{hung.url}/flush_cache: no answer within 0.2 s"):
        client._all("POST", "/flush_cache", timeout=0.2)
    assert time.monotonic() - t0 < 5


def test_config_checks_backoff():
    with pytest.raises(ValueError, match=r"retry_backoff_base_s \(2.0\) must be in \[0, retry_backoff_max_s=1.0\]"):
        ClientConfig(retry_backoff_base_s=2.0, retry_backoff_max_s=1.0)
    with pytest.raises(ValueError, match=r"health_timeout_s \(0\) must be > 0"):
        ClientConfig(health_timeout_s=0)


def test_reasked_seeded_samples_are_new_draws():
    """A seeded group asked again after aborts must not replay the seeds of the samples it
    already kept (the server draws sample i from per_sample_seed(seed, i))."""
    from moe_rl.rollout.client import generate_body
    from moe_rl.rollout.types import per_sample_seed

    req = RolloutRequest([1, 2, 3], SamplingParams(n=4, sampling_seed=99))
    assert generate_body(req, 4, False)["sampling_params"]["sampling_seed"] == 99
    used = {per_sample_seed(99, i) for i in range(4)}
    again = [generate_body(req, 2, False, attempt=a)["sampling_params"]["sampling_seed"] for a in (1, 2, 3)]
    assert len(set(again)) == 3
    for s in again:  # neither the first request's draws nor those of the re-ask's own samples collide
        assert not ({per_sample_seed(s, i) for i in range(2)} & used)
