"""The trainer's side of rollout: ``/generate`` over many servers, and weight-sync control.

Legend: P prompt tokens, T response tokens, L MoE layers, K experts per token.

Generation. One HTTP request per group (``input_ids`` = the prompt, ``n`` = samples still
missing). Requests go to the server with the fewest requests in flight (our own load
balancing, needed for routed experts), or to ``router_url`` (sglang-router 0.3.2, which
drops ``return_routed_experts``). A group is done when it has ``n`` accepted samples:
- a sample that comes back with finish reason ``abort`` (pause, abort_request) is not
  accepted; only the missing ones are asked again;
- a group is one weight version: when a response brings samples of another version than
  the ones accepted so far (a weight sync happened in between), the older samples are
  dropped and asked again, so every sample of a group reports the same ``weight_version``
  (``client.allow_mixed_versions`` keeps them instead; each ``Sample`` says its version);
- a server that fails (connection error, timeout, 5xx, 408, 429) gets no new requests for
  ``server_cooldown_s``, and the group is sent again, to another server where there is
  one, after a backoff with full jitter (or the server's ``Retry-After``), both capped by
  ``retry_backoff_max_s``. A server that failed before gets requests again only once it
  answers ``/health`` with 200; when none is left, or after ``max_attempts`` failures,
  the group raises a :class:`RolloutError` naming each server and its last error;
- a 4xx is a bug in the request (or a wrong ``api_key``): it raises at once.
Every await is bounded (request, health and control timeouts; capped backoff), and when
one group raises, the others are cancelled.

Control. Weight sync goes to every server directly (the router does not proxy it), in
parallel, and raises naming every server that refuses or cannot be reached:
``pause -> flush_cache -> update_* -> continue``.

With ``client.api_key`` set, every call carries ``Authorization: Bearer <key>`` (SGLang's
``--api-key`` guards every endpoint but ``/health*``, ``/metrics*``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import email.utils
import math
import random
import time
from typing import Any, Awaitable, Callable

import httpx
import torch

from moe_rl.models import family_for
from moe_rl.rollout import routed_experts_codec
from moe_rl.rollout.config import ClientConfig
from moe_rl.rollout.types import FinishReason, RolloutRequest, Sample, per_sample_seed

# Pause before asking again for aborted or stale samples: an abort means a weight sync is
# under way, and the next request waits on the paused server anyway.
RESAMPLE_PAUSE_S = 0.02
# Rounds of aborted or stale samples a group may go through, per allowed failure.
RESAMPLE_ROUNDS_PER_ATTEMPT = 100


class RolloutError(RuntimeError):
    """A request that could not be completed (bad request, or every attempt failed)."""


@dataclasses.dataclass
class RoutingLayout:
    """How to read SGLang's routed-experts rows: all hidden layers on the wire, MoE ones kept."""

    num_hidden_layers: int  # rows per token on the wire (SGLang counts dense layers too)
    topk: int  # experts per token
    moe_layer_ids: list[int]  # HF layer indices kept in Sample.routed_experts_NLK

    @classmethod
    def from_hf_config(cls, hf_config) -> "RoutingLayout":
        return cls(int(hf_config.num_hidden_layers), int(hf_config.num_experts_per_tok),
                   family_for(hf_config).moe_layer_ids(hf_config))


@dataclasses.dataclass
class _Server:
    url: str
    in_flight: int = 0
    down_until: float = 0.0
    failures: int = 0  # failed requests since the last success
    last_error: str = ""  # of the last failed request, cleared by a success
    health_error: str = ""  # of the last failed /health probe, cleared by a good one

    def describe(self) -> str:
        errors = [e for e in (self.last_error, self.health_error and f"/health: {self.health_error}") if e]
        return f"{self.url} ({'; '.join(errors) or 'no error'})"


def _error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500]
    if isinstance(body, dict) and "error" in body:
        err = body["error"]
        return err.get("message", str(err)) if isinstance(err, dict) else str(err)
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    return str(body)[:500]


def _exception_text(e: BaseException, timeout_s: float) -> str:
    if isinstance(e, (TimeoutError, httpx.TimeoutException)):
        return f"no answer within {timeout_s:g} s ({type(e).__name__})"
    return f"{type(e).__name__}: {e}"


def _retry_after_s(resp: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (delta-seconds or an HTTP date), or None."""
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def follow_version(current: str | None, versions: list[str]) -> str | None:
    """The weight version a group follows once a response brings samples of ``versions``.

    A server's version only moves forward, so a response's version is newer than the
    group's ``current`` one. A response that itself mixes versions (a sync while it ran)
    has the newer one among those that are not ``current`` (the most common; ties go to
    the first in item order).
    """
    others = [v for v in versions if v != current]
    return max(others, key=others.count) if others else current


def generate_body(req: RolloutRequest, num_samples: int, want_routes: bool, attempt: int = 0) -> dict[str, Any]:
    """The ``/generate`` body asking ``num_samples`` samples of ``req`` (SGLang 0.5.23 schema).

    ``routed_experts_start_len = 0`` makes the server return the routes of every position but
    the last, prompt included (``[P + T - 1, layers, K]``), as ``Sample.routed_experts_NLK``
    keeps them. A seeded request asked again
    (``attempt`` > 0: samples were aborted or stale) gets a seed derived from the attempt, so
    the re-asked samples are new draws, not copies of the ones already kept.
    """
    sp = req.sampling.to_sglang()
    if attempt and "sampling_seed" in sp:
        sp["sampling_seed"] = per_sample_seed(sp["sampling_seed"], req.sampling.n + attempt)
    sp.pop("n", None)
    if num_samples != 1:
        sp["n"] = num_samples
    body: dict[str, Any] = {"input_ids": list(req.prompt_ids), "sampling_params": sp, "return_logprob": True}
    if want_routes:
        body["return_routed_experts"] = True
        body["routed_experts_start_len"] = 0
    return body


def _weight_ext(body: dict[str, Any], stage_id: str | None, checksums: dict[str, str] | None) -> dict[str, Any]:
    """The embedded engine's weight-update extensions, added only when used (SGLang ignores them)."""
    if stage_id is not None:
        body["stage_id"] = stage_id
    if checksums is not None:
        body["checksums"] = checksums
    return body


class RolloutClient:
    """Generation and control over HTTP.

    ``sleep`` and ``rng`` are the backoff's clock and dice (tests pass recording ones).
    """

    def __init__(self, cfg: ClientConfig, routing: RoutingLayout | None = None, *,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 rng: random.Random | None = None) -> None:
        if not cfg.server_urls and not cfg.router_url:
            raise ValueError("client.server_urls is empty and client.router_url is not set")
        self.cfg = cfg
        self.routing = routing
        self.servers = [_Server(u.rstrip("/")) for u in cfg.server_urls]
        self.stats = {"requests": 0, "aborted_samples": 0, "server_failures": 0, "stale_samples": 0,
                      "mixed_version_groups": 0}
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}

    # ------------------------------------------------------------------ generate
    def generate(self, requests: list[RolloutRequest]) -> list[Sample]:
        """Blocking wrapper of :meth:`agenerate` (runs its own event loop)."""
        return asyncio.run(self.agenerate(requests))

    async def agenerate(self, requests: list[RolloutRequest]) -> list[Sample]:
        """Samples of every request, group-major then ``sample_index``; the first failing group raises."""
        want_routes = self.cfg.return_routed_experts and not self.cfg.router_url
        if want_routes and self.routing is None:
            self.routing = await self._routing_from_server()
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency + 8)
        async with httpx.AsyncClient(timeout=self.cfg.request_timeout_s, limits=limits,
                                     headers=self._headers) as http:
            tasks = [asyncio.ensure_future(self._group(http, sem, r, want_routes)) for r in requests]
            try:
                groups = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return [s for g in groups for s in g]

    async def _routing_from_server(self) -> RoutingLayout | None:
        async with httpx.AsyncClient(timeout=self.cfg.control_timeout_s, headers=self._headers) as http:
            for s in self.servers:
                try:
                    info = (await http.get(f"{s.url}/model_info")).json()
                except (httpx.HTTPError, ValueError):
                    continue
                if "moe_layer_ids" in info:
                    return RoutingLayout(info["num_hidden_layers"], info["num_experts_per_tok"],
                                         info["moe_layer_ids"])
        raise RolloutError("return_routed_experts needs a RoutingLayout (RoutingLayout.from_hf_config) "
                           "for servers whose /model_info does not describe MoE layers")

    async def _choose(self, http: httpx.AsyncClient) -> _Server | None:
        """The least-loaded server to send a request to, or None when no server is left.

        A server that failed before is used again only after a /health probe answers 200.
        When every server is cooling down, the ones whose probe answers 200 are used.
        """
        def load(s: _Server):
            return (s.in_flight, s.failures)

        now = time.monotonic()
        up = sorted((s for s in self.servers if s.down_until <= now), key=load)
        for s in up:
            if s.failures == 0 or await self._healthy(http, s):
                return s
        cooling = [s for s in self.servers if s not in up]
        ok = await asyncio.gather(*(self._healthy(http, s) for s in cooling))
        healthy = [s for s, good in zip(cooling, ok) if good]
        return min(healthy, key=load) if healthy else None

    async def _healthy(self, http: httpx.AsyncClient, s: _Server) -> bool:
        """Probe ``/health``; a server that does not answer 200 cools down again."""
        timeout = self.cfg.health_timeout_s
        try:
            r = await asyncio.wait_for(http.get(s.url + "/health", timeout=timeout), timeout)
        except (httpx.HTTPError, TimeoutError) as e:
            s.health_error = _exception_text(e, timeout)
        else:
            if r.status_code == 200:
                s.health_error = ""
                s.down_until = 0.0
                return True
            s.health_error = f"HTTP {r.status_code}: {_error_text(r)}"
        s.down_until = time.monotonic() + self.cfg.server_cooldown_s
        return False

    def _servers_report(self) -> str:
        return "; ".join(s.describe() for s in self.servers)

    def _backoff_s(self, failures: int, retry_after: float | None) -> float:
        """Wait before a group's retry number ``failures``: Retry-After, else full jitter; capped."""
        cap = self.cfg.retry_backoff_max_s
        if retry_after is not None:
            return min(retry_after, cap)
        return self._rng.uniform(0.0, min(cap, self.cfg.retry_backoff_base_s * 2.0 ** min(failures - 1, 60)))

    async def _group(self, http: httpx.AsyncClient, sem: asyncio.Semaphore, req: RolloutRequest,
                     want_routes: bool) -> list[Sample]:
        n = req.sampling.n
        gid = req.group_id
        kept: list[Sample] = []  # accepted samples, all of `version` unless allow_mixed_versions
        version: str | None = None  # the weight version the group follows: the newest seen
        failures = rounds = 0  # failures are not expected; rounds (aborts, stale samples) are
        last_err = ""
        timeout = self.cfg.request_timeout_s
        while len(kept) < n:
            if rounds >= RESAMPLE_ROUNDS_PER_ATTEMPT * self.cfg.max_attempts:
                raise RolloutError(f"group {gid}: {n - len(kept)} of {n} samples missing after {rounds} "
                                   f"rounds of aborted or stale samples; last: {last_err}")
            missing = n - len(kept)
            body = generate_body(req, missing, want_routes, attempt=rounds + failures)
            resp: httpx.Response | None = None
            err = ""
            async with sem:
                server = None
                if not self.cfg.router_url:
                    server = await self._choose(http)
                    if server is None:
                        raise RolloutError(f"group {gid}: no server left to send it to (each failed and does "
                                           f"not answer /health with 200): {self._servers_report()}")
                url = (self.cfg.router_url.rstrip("/") if server is None else server.url) + "/generate"
                if server is not None:
                    server.in_flight += 1
                self.stats["requests"] += 1
                try:
                    resp = await asyncio.wait_for(http.post(url, json=body), timeout)
                except (httpx.HTTPError, TimeoutError) as e:
                    err = _exception_text(e, timeout)
                finally:
                    if server is not None:
                        server.in_flight -= 1
            retry_after = None
            if resp is not None and (resp.status_code >= 500 or resp.status_code in (408, 429)):
                err = f"HTTP {resp.status_code}: {_error_text(resp)}"
                if resp.status_code in (429, 503):
                    retry_after = _retry_after_s(resp)
            if err:
                last_err = f"{url}: {err}"
                self._mark_down(server, err)
                failures += 1
                if failures >= self.cfg.max_attempts:
                    servers = f"; servers: {self._servers_report()}" if len(self.servers) > 1 else ""
                    raise RolloutError(f"group {gid}: {missing} of {n} samples missing after {failures} failed "
                                       f"attempts; last error: {last_err}{servers}")
                await self._sleep(self._backoff_s(failures, retry_after))
                continue
            assert resp is not None
            if resp.status_code != 200:
                hint = " (check client.api_key)" if resp.status_code in (401, 403) else ""
                raise RolloutError(f"group {gid}: {url} rejected the request "
                                   f"(HTTP {resp.status_code}): {_error_text(resp)}{hint}")
            if server is not None:
                server.failures = 0
                server.last_error = ""
            items = resp.json()
            items = items if isinstance(items, list) else [items]
            if len(items) != missing:
                raise RolloutError(f"group {gid}: asked {missing} samples, got {len(items)}")
            fresh: list[Sample] = []
            for item in items:
                meta = item["meta_info"]
                if meta["finish_reason"]["type"] == FinishReason.ABORT.value:
                    self.stats["aborted_samples"] += 1
                    last_err = f"{url}: aborted: {meta['finish_reason'].get('message')}"
                    continue
                fresh.append(self._sample(req, item, want_routes))
            if fresh and not self.cfg.allow_mixed_versions:
                new = follow_version(version, [s.weight_version for s in fresh])
                stale = [s for s in kept + fresh if s.weight_version != new]
                if stale:
                    self.stats["stale_samples"] += len(stale)
                    last_err = (f"{url}: {len(stale)} samples of weight version(s) "
                                f"{sorted({s.weight_version for s in stale})} dropped, the group is at {new!r}")
                kept = [s for s in kept + fresh if s.weight_version == new]
                version = new
            else:
                kept += fresh
            if len(kept) < n:
                rounds += 1
                await self._sleep(RESAMPLE_PAUSE_S)
        if len({s.weight_version for s in kept}) > 1:
            self.stats["mixed_version_groups"] += 1
        for i, s in enumerate(kept):
            s.sample_index = i
        return kept

    def _mark_down(self, server: _Server | None, error: str) -> None:
        self.stats["server_failures"] += 1
        if server is not None:
            server.failures += 1
            server.last_error = error
            server.down_until = time.monotonic() + self.cfg.server_cooldown_s

    def _sample(self, req: RolloutRequest, item: dict, want_routes: bool) -> Sample:
        """One accepted item as a Sample; ``sample_index`` is set once the group is complete."""
        meta = item["meta_info"]
        lps = meta["output_token_logprobs"]
        ids = [int(x[1]) for x in lps]
        if ids != list(item.get("output_ids", ids)):
            raise RolloutError(f"group {req.group_id}: output_ids and output_token_logprobs disagree")
        routes = None
        if want_routes:
            if "routed_experts" not in meta:
                raise RolloutError("server returned no routed_experts (launch SGLang with "
                                   "--enable-return-routed-experts; do not route through sglang-router 0.3.2)")
            assert self.routing is not None
            routes = routed_experts_codec.decode(meta["routed_experts"], self.routing.num_hidden_layers,
                                                 self.routing.topk, self.routing.moe_layer_ids)
            if routes.shape[0] != len(req.prompt_ids) + len(ids) - 1:
                raise RolloutError(f"group {req.group_id}: {routes.shape[0]} routed rows for {len(req.prompt_ids)} "
                                   f"prompt + {len(ids)} response tokens (expected prompt + response - 1)")
        return Sample(group_id=req.group_id, sample_index=-1, prompt_ids=list(req.prompt_ids),
                      response_ids=ids, rollout_logprobs_T=torch.tensor([float(x[0]) for x in lps],
                                                                        dtype=torch.float32),
                      routed_experts_NLK=routes, finish_reason=FinishReason(meta["finish_reason"]["type"]),
                      weight_version=str(meta.get("weight_version", "")))

    # ------------------------------------------------------------------ control, every server
    def _all(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = None) -> list[Any]:
        """Call ``path`` on every server in parallel; return the JSON replies in server order.

        Each call is bounded by ``timeout`` (default ``control_timeout_s``; httpx applies it to
        connecting and to each read). Raises once all have answered, naming every server that
        refused, failed or did not answer, with its error.
        """
        if not self.servers:
            raise RolloutError("control calls need client.server_urls (the router does not proxy them)")
        timeout = timeout or self.cfg.control_timeout_s

        def one(s: _Server):
            try:
                r = httpx.request(method, s.url + path, json=body, timeout=timeout, headers=self._headers)
            except httpx.HTTPError as e:
                raise RolloutError(f"{s.url}{path}: {_exception_text(e, timeout)}") from e
            if r.status_code != 200:
                raise RolloutError(f"{s.url}{path}: HTTP {r.status_code}: {_error_text(r)}")
            try:
                out = r.json()
            except ValueError:
                return r.text
            if isinstance(out, dict) and out.get("success") is False:
                raise RolloutError(f"{s.url}{path}: {out.get('message')}")
            return out

        with cf.ThreadPoolExecutor(len(self.servers)) as ex:
            futs = [ex.submit(one, s) for s in self.servers]
        errors = [f.exception() for f in futs if f.exception() is not None]
        if errors:
            raise RolloutError(f"{method} {path} failed on {len(errors)} of {len(self.servers)} servers: "
                               + " | ".join(str(e) for e in errors)) from errors[0]
        return [f.result() for f in futs]

    def pause(self, mode: str = "abort") -> None:
        self._all("POST", "/pause_generation", {"mode": mode})

    def continue_generation(self) -> None:
        self._all("POST", "/continue_generation", {})

    def flush_cache(self, *, attempts: int = 60, interval_s: float = 1.0) -> None:
        """Retry until every server has flushed (a server refuses while requests run)."""
        for i in range(attempts):
            try:
                self._all("POST", "/flush_cache")
                return
            except RolloutError:
                if i == attempts - 1:
                    raise
                time.sleep(interval_s)

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None, *,
                                 stage_id: str | None = None, checksums: dict[str, str] | None = None) -> list[Any]:
        """Every server loads ``model_path``; returns the replies in server order.

        ``stage_id`` and ``checksums`` are the embedded engine's extensions (see
        ``rollout/embedded/weights_api.py``): hold instead of apply, check what was read."""
        body: dict[str, Any] = {"model_path": model_path}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        return self._all("POST", "/update_weights_from_disk", _weight_ext(body, stage_id, checksums))

    def update_weights_from_tensor(self, serialized_named_tensors: list[str], weight_version: str | None = None, *,
                                   load_format: str | None = None, stage_id: str | None = None,
                                   checksums: dict[str, str] | None = None) -> list[Any]:
        """Send one payload to every server (``moe_rl.weights.payload``: ``load_format``
        "safetensors" for the embedded engine, None for SGLang's own serializer)."""
        body: dict[str, Any] = {"serialized_named_tensors": serialized_named_tensors}
        if load_format is not None:
            body["load_format"] = load_format
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        return self._all("POST", "/update_weights_from_tensor", _weight_ext(body, stage_id, checksums))

    def commit_staged_weights(self, stage_id: str, weight_version: str | None = None, *,
                              expected_tensors: int | None = None, complete: bool = False) -> list[Any]:
        """Apply what every server holds under ``stage_id`` (embedded engine extension)."""
        body: dict[str, Any] = {"stage_id": stage_id, "complete": complete}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        if expected_tensors is not None:
            body["expected_tensors"] = expected_tensors
        return self._all("POST", "/commit_staged_weights", body)

    def discard_staged_weights(self, stage_id: str | None = None) -> list[Any]:
        """Drop what every server holds (under ``stage_id``, or all); embedded engine extension."""
        return self._all("POST", "/discard_staged_weights", {} if stage_id is None else {"stage_id": stage_id})

    def weight_sync_info(self) -> list[dict | None]:
        """Each server's weight-sync extensions (``GET /weight_sync_info``), None where the server
        has none (a real SGLang answers 404)."""
        timeout = self.cfg.control_timeout_s
        out: list[dict | None] = []
        for s in self.servers:
            try:
                r = httpx.get(s.url + "/weight_sync_info", timeout=timeout, headers=self._headers)
            except httpx.HTTPError as e:
                raise RolloutError(f"{s.url}/weight_sync_info: {_exception_text(e, timeout)}") from e
            if r.status_code == 404:
                out.append(None)
            elif r.status_code != 200:
                raise RolloutError(f"{s.url}/weight_sync_info: HTTP {r.status_code}: {_error_text(r)}")
            else:
                out.append(r.json())
        return out

    def init_weights_update_group(self, master_address: str, master_port: int, *, gpus_per_server: int = 1,
                                  group_name: str = "weight_update_group", backend: str = "nccl"):
        """Start the join on every server (rank_offset = 1 + GPUs before it); returns a future.

        The trainer must join as rank 0 (``WeightBroadcastGroup(..., rank=0)``) while this runs.
        """
        world = 1 + gpus_per_server * len(self.servers)
        ex = cf.ThreadPoolExecutor(len(self.servers))

        def one(i: int, s: _Server):
            body = {"master_address": master_address, "master_port": master_port,
                    "rank_offset": 1 + i * gpus_per_server, "world_size": world,
                    "group_name": group_name, "backend": backend}
            timeout = self.cfg.control_timeout_s
            try:
                r = httpx.post(s.url + "/init_weights_update_group", json=body, timeout=timeout,
                               headers=self._headers)
            except httpx.HTTPError as e:
                raise RolloutError(f"{s.url}: init_weights_update_group: {_exception_text(e, timeout)}") from e
            if r.status_code != 200:
                raise RolloutError(f"{s.url}: init_weights_update_group: {_error_text(r)}")

        futs = [ex.submit(one, i, s) for i, s in enumerate(self.servers)]
        ex.shutdown(wait=False)
        return futs

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]], *,
                                        weight_version: str | None = None,
                                        group_name: str = "weight_update_group", stage_id: str | None = None,
                                        checksums: dict[str, str] | None = None,
                                        load_format: str | None = None) -> list[cf.Future]:
        """Announce one bucket to every server; the trainer broadcasts it meanwhile (one
        broadcast per tensor, or with ``load_format="flattened_bucket"`` one of the whole
        bucket). One future, of the replies in server order."""
        body: dict[str, Any] = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name}
        if load_format is not None:
            body["load_format"] = load_format
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        body = _weight_ext(body, stage_id, checksums)
        ex = cf.ThreadPoolExecutor(1)
        fut = ex.submit(self._all, "POST", "/update_weights_from_distributed", body)
        ex.shutdown(wait=False)
        return [fut]

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        self._all("POST", "/destroy_weights_update_group", {"group_name": group_name})

    def probe_generate(self, body: dict[str, Any]) -> list[Any]:
        """One ``/generate`` body sent to every server directly (the weight sync's log-prob
        probe: each engine must answer for itself); replies in server order."""
        return self._all("POST", "/generate", body, timeout=self.cfg.request_timeout_s)

    def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> None:
        self._all("POST", "/update_weight_version",
                  {"new_version": str(new_version), "abort_all_requests": abort_all_requests})

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._all("POST", "/release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._all("POST", "/resume_memory_occupation", {"tags": tags})

    def weight_versions(self) -> list[str]:
        return [str(info["weight_version"]) for info in self._all("GET", "/model_info")]

    def weight_version_report(self) -> list[str]:
        """"<url>: <version>" per server, or "<url>: <error>" where it does not answer (never raises)."""
        out = []
        for s in self.servers:
            timeout = self.cfg.control_timeout_s
            try:
                r = httpx.get(s.url + "/model_info", timeout=timeout, headers=self._headers)
                out.append(f"{s.url}: {r.json()['weight_version']!r}" if r.status_code == 200
                           else f"{s.url}: HTTP {r.status_code}: {_error_text(r)}")
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
                out.append(f"{s.url}: {_exception_text(e, timeout)}")
        return out

    def abort_all(self) -> None:
        self._all("POST", "/abort_request", {"abort_all": True})
