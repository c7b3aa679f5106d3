"""The trainer's side of rollout: ``/generate`` over many servers, and weight-sync control.

Legend: P prompt tokens, T response tokens, L MoE layers, K experts per token.

Generation. One HTTP request per group (``input_ids`` = the prompt, ``n`` = samples still
missing). Requests go to the server with the fewest requests in flight (our own load
balancing, needed for routed experts), or to ``router_url`` (sglang-router 0.3.2, which
drops ``return_routed_experts``). A group is done when it has ``n`` accepted samples:
- a sample that comes back with finish reason ``abort`` (pause, abort_request) is not
  accepted; only the missing ones are asked again;
- a server that fails (connection error, timeout, 5xx) gets no new requests for
  ``server_cooldown_s`` and the whole request is sent to another server;
- a 4xx is a bug in the request: it raises at once (retrying cannot help).
A group's samples are accepted from exactly one response each, so none is lost or
duplicated; ``sample_index`` is the order of acceptance.

Control. Weight sync goes to every server directly (the router does not proxy it), in
parallel, and raises if any server refuses: ``pause -> flush_cache -> update_* -> continue``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import time
from typing import Any

import httpx
import torch

from moe_rl.rollout import routed_experts_codec
from moe_rl.rollout.config import ClientConfig
from moe_rl.rollout.types import FinishReason, RolloutRequest, Sample


class RolloutError(RuntimeError):
    """A request that could not be completed (bad request, or every attempt failed)."""


@dataclasses.dataclass
class RoutingLayout:
    """How to read SGLang's routed-experts rows: all hidden layers on the wire, MoE ones kept."""

    num_hidden_layers: int  # rows per token on the wire (SGLang counts dense layers too)
    topk: int  # experts per token
    moe_layer_ids: list[int]  # HF layer indices kept in Sample.routed_experts_TLK

    @classmethod
    def from_hf_config(cls, hf_config) -> "RoutingLayout":
        return cls(int(hf_config.num_hidden_layers), int(hf_config.num_experts_per_tok),
                   routed_experts_codec.moe_layer_ids(hf_config))


@dataclasses.dataclass
class _Server:
    url: str
    in_flight: int = 0
    down_until: float = 0.0
    failures: int = 0


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


def generate_body(req: RolloutRequest, num_samples: int, want_routes: bool) -> dict[str, Any]:
    """The ``/generate`` body asking ``num_samples`` samples of ``req`` (SGLang 0.5.23 schema).

    ``routed_experts_start_len = P - 1`` makes the server return exactly one row per response
    token: the routes of the forward passes that produced them.
    """
    sp = req.sampling.to_sglang()
    sp.pop("n", None)
    if num_samples != 1:
        sp["n"] = num_samples
    body: dict[str, Any] = {"input_ids": list(req.prompt_ids), "sampling_params": sp, "return_logprob": True}
    if want_routes:
        body["return_routed_experts"] = True
        body["routed_experts_start_len"] = len(req.prompt_ids) - 1
    return body


class RolloutClient:
    def __init__(self, cfg: ClientConfig, routing: RoutingLayout | None = None) -> None:
        if not cfg.server_urls and not cfg.router_url:
            raise ValueError("client.server_urls is empty and client.router_url is not set")
        self.cfg = cfg
        self.routing = routing
        self.servers = [_Server(u.rstrip("/")) for u in cfg.server_urls]
        self.stats = {"requests": 0, "aborted_samples": 0, "server_failures": 0}

    # ------------------------------------------------------------------ generate
    def generate(self, requests: list[RolloutRequest]) -> list[Sample]:
        """Blocking wrapper of :meth:`agenerate` (runs its own event loop)."""
        return asyncio.run(self.agenerate(requests))

    async def agenerate(self, requests: list[RolloutRequest]) -> list[Sample]:
        """Samples of every request, group-major then ``sample_index``."""
        want_routes = self.cfg.return_routed_experts and not self.cfg.router_url
        if want_routes and self.routing is None:
            self.routing = await self._routing_from_server()
        sem = asyncio.Semaphore(self.cfg.max_concurrency)
        limits = httpx.Limits(max_connections=self.cfg.max_concurrency + 8)
        async with httpx.AsyncClient(timeout=self.cfg.request_timeout_s, limits=limits) as http:
            groups = await asyncio.gather(*(self._group(http, sem, r, want_routes) for r in requests))
        return [s for g in groups for s in g]

    async def _routing_from_server(self) -> RoutingLayout | None:
        async with httpx.AsyncClient(timeout=self.cfg.control_timeout_s) as http:
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

    def _pick(self) -> _Server | None:
        now = time.monotonic()
        up = [s for s in self.servers if s.down_until <= now]
        if not up:  # everything is cooling down: try the one that failed least recently
            up = sorted(self.servers, key=lambda s: s.down_until)[:1]
        return min(up, key=lambda s: (s.in_flight, s.failures)) if up else None

    async def _group(self, http: httpx.AsyncClient, sem: asyncio.Semaphore, req: RolloutRequest,
                     want_routes: bool) -> list[Sample]:
        n = req.sampling.n
        accepted: list[Sample] = []
        failures = aborts = 0  # aborts (a pause for weight sync) are expected; failures are not
        last_err = ""
        while len(accepted) < n:
            if failures >= self.cfg.max_attempts or aborts >= 100 * self.cfg.max_attempts:
                raise RolloutError(f"group {req.group_id}: {n - len(accepted)} of {n} samples missing after "
                                   f"{failures} failed and {aborts} aborted attempts; last error: {last_err}")
            missing = n - len(accepted)
            body = generate_body(req, missing, want_routes)
            server = None if self.cfg.router_url else self._pick()
            url = (self.cfg.router_url.rstrip("/") if server is None else server.url) + "/generate"
            async with sem:
                if server is not None:
                    server.in_flight += 1
                try:
                    self.stats["requests"] += 1
                    resp = await http.post(url, json=body)
                except httpx.HTTPError as e:
                    last_err = f"{url}: {type(e).__name__}: {e}"
                    self._mark_down(server)
                    failures += 1
                    await asyncio.sleep(min(0.05 * failures, 1.0))
                    continue
                finally:
                    if server is not None:
                        server.in_flight -= 1
            if resp.status_code >= 500 or resp.status_code in (408, 429):
                last_err = f"{url}: HTTP {resp.status_code}: {_error_text(resp)}"
                self._mark_down(server)
                failures += 1
                continue
            if resp.status_code != 200:
                raise RolloutError(f"group {req.group_id}: {url} rejected the request "
                                   f"(HTTP {resp.status_code}): {_error_text(resp)}")
            if server is not None:
                server.failures = 0
            items = resp.json()
            items = items if isinstance(items, list) else [items]
            if len(items) != missing:
                raise RolloutError(f"group {req.group_id}: asked {missing} samples, got {len(items)}")
            for item in items:
                meta = item["meta_info"]
                if meta["finish_reason"]["type"] == FinishReason.ABORT.value:
                    self.stats["aborted_samples"] += 1
                    last_err = f"aborted: {meta['finish_reason'].get('message')}"
                    continue
                accepted.append(self._sample(req, len(accepted), item, want_routes))
            if len(accepted) < n:
                aborts += 1
                await asyncio.sleep(0.02)
        return accepted

    def _mark_down(self, server: _Server | None) -> None:
        self.stats["server_failures"] += 1
        if server is not None:
            server.failures += 1
            server.down_until = time.monotonic() + self.cfg.server_cooldown_s

    def _sample(self, req: RolloutRequest, index: int, item: dict, want_routes: bool) -> Sample:
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
            if routes.shape[0] != len(ids):
                raise RolloutError(f"group {req.group_id}: {routes.shape[0]} routed rows for {len(ids)} tokens")
        return Sample(group_id=req.group_id, sample_index=index, prompt_ids=list(req.prompt_ids),
                      response_ids=ids, rollout_logprobs_T=torch.tensor([float(x[0]) for x in lps],
                                                                        dtype=torch.float32),
                      routed_experts_TLK=routes, finish_reason=FinishReason(meta["finish_reason"]["type"]),
                      weight_version=str(meta.get("weight_version", "")))

    # ------------------------------------------------------------------ control, every server
    def _all(self, method: str, path: str, body: dict | None = None, *, timeout: float | None = None) -> list[Any]:
        """Call ``path`` on every server in parallel; raise if any fails; return the JSON replies."""
        if not self.servers:
            raise RolloutError("control calls need client.server_urls (the router does not proxy them)")
        timeout = timeout or self.cfg.control_timeout_s

        def one(s: _Server):
            r = httpx.request(method, s.url + path, json=body, timeout=timeout)
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
            return list(ex.map(one, self.servers))

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

    def update_weights_from_disk(self, model_path: str, weight_version: str | None = None) -> None:
        body: dict[str, Any] = {"model_path": model_path}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        self._all("POST", "/update_weights_from_disk", body)

    def update_weights_from_tensor(self, serialized_named_tensors: list[str],
                                   weight_version: str | None = None) -> None:
        body: dict[str, Any] = {"serialized_named_tensors": serialized_named_tensors}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        self._all("POST", "/update_weights_from_tensor", body)

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
            r = httpx.post(s.url + "/init_weights_update_group", json=body, timeout=self.cfg.control_timeout_s)
            if r.status_code != 200:
                raise RolloutError(f"{s.url}: init_weights_update_group: {_error_text(r)}")

        futs = [ex.submit(one, i, s) for i, s in enumerate(self.servers)]
        ex.shutdown(wait=False)
        return futs

    def update_weights_from_distributed(self, names: list[str], dtypes: list[str], shapes: list[list[int]], *,
                                        weight_version: str | None = None,
                                        group_name: str = "weight_update_group") -> list[cf.Future]:
        """Announce one bucket to every server; the trainer broadcasts it meanwhile. Futures."""
        body: dict[str, Any] = {"names": names, "dtypes": dtypes, "shapes": shapes, "group_name": group_name}
        if weight_version is not None:
            body["weight_version"] = str(weight_version)
        ex = cf.ThreadPoolExecutor(1)
        fut = ex.submit(self._all, "POST", "/update_weights_from_distributed", body)
        ex.shutdown(wait=False)
        return [fut]

    def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> None:
        self._all("POST", "/update_weight_version",
                  {"new_version": str(new_version), "abort_all_requests": abort_all_requests})

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._all("POST", "/release_memory_occupation", {"tags": tags})

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self._all("POST", "/resume_memory_occupation", {"tags": tags})

    def weight_versions(self) -> list[str]:
        return [str(info["weight_version"]) for info in self._all("GET", "/model_info")]

    def abort_all(self) -> None:
        self._all("POST", "/abort_request", {"abort_all": True})
