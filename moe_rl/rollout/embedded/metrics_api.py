"""The embedded server's load and metrics endpoints, in SGLang 0.5.23's shapes.

``GET /metrics`` (with ``--enable-metrics``, as SGLang): Prometheus text exposition of the
subset of SGLang's ``sglang:*`` series that a CPU engine has, under SGLang's names, types and
labels, so a Prometheus scrape config or sglang-router's ``/engine_metrics`` written for SGLang
works unchanged.

``GET /v1/loads`` (always): SGLang's per-DP-rank ``LoadSnapshot`` (one rank here) with its
``include`` sections (core, memory, queues; spec, lora and disagg do not exist on this engine
and are left out, as SGLang leaves out an absent section), ``dp_rank`` filter and
``format=prometheus``. Fields the engine has no counterpart for (prefix-cache hit rate,
disaggregation queues, prefill busy time) are 0, as on an SGLang server where they never moved.

Gauges carry SGLang's scheduler labels (``model_name``, ``engine_type``, ``tp_rank``,
``pp_rank``, ``moe_ep_rank``), counters its tokenizer-manager labels (``model_name``,
``engine_type``, plus ``is_streaming`` where SGLang has it). ``sglang:gen_throughput`` is the
generation rate since the previous scrape (since the server started, on the first): SGLang's
is over its last decode-log interval. Everything is read from the engine without stopping it.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Optional

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from moe_rl.rollout.embedded.control_api import VERSION
from moe_rl.rollout.embedded.http_context import ServerContext
from moe_rl.rollout.embedded.protocol import SchemaError

LOAD_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus text format 0.0.4


def _labels(labels: dict[str, str]) -> str:
    esc = {k: str(v).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc.items()) + "}"


def _family(lines: list[str], name: str, kind: str, doc: str, samples: list[tuple[dict[str, str], float]]) -> None:
    """One metric family. A counter's HELP/TYPE name keeps its ``_total``: prometheus_client drops it
    (OpenMetrics style), which sglang-router's ``/engine_metrics`` parser refuses ("Invalid Name in
    metric family"); the Prometheus text format 0.0.4 takes either."""
    lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{_labels(lab)} {float(v)!r}" for lab, v in samples]


def render(ctx: ServerContext, gen_throughput: float) -> str:
    """The exposition text of the engine's current state."""
    engine = ctx.engine
    tok = {"model_name": ctx.served_model_name, "engine_type": "unified"}
    sched = dict(tok, tp_rank="0", pp_rank="0", moe_ep_rank="0")
    capacity = engine.max_total_num_tokens
    lines: list[str] = []
    gauges = [
        ("sglang:num_running_reqs", "The number of running requests.", engine.num_running),
        ("sglang:num_queue_reqs", "The number of requests in the waiting queue.", engine.num_waiting),
        ("sglang:num_paused_reqs", "The number of requests held while generation is paused.", engine.num_held),
        ("sglang:gen_throughput", "The generation throughput (token/s).", gen_throughput),
        ("sglang:num_used_tokens", "The number of used tokens.", engine.num_used_tokens),
        ("sglang:token_usage", "The token usage.", engine.num_used_tokens / capacity if capacity else 0.0),
        ("sglang:max_total_num_tokens", "Maximum total number of tokens in the KV cache pool.", capacity),
    ]
    for name, doc, value in gauges:
        _family(lines, name, "gauge", doc, [(sched, value)])
    counts = engine.finished_counts
    for name, doc, field in (
        ("sglang:prompt_tokens_total", "Number of prefill tokens processed.", "prompt_tokens"),
        ("sglang:generation_tokens_total", "Number of generation tokens processed.", "generation_tokens"),
        ("sglang:num_requests_total", "Number of requests processed.", "requests"),
    ):
        _family(lines, name, "counter", doc,
                [(dict(tok, is_streaming=s), getattr(counts[s], field)) for s in ("false", "true")])
    _family(lines, "sglang:num_aborted_requests_total", "counter", "Number of requests aborted.",
            [(tok, engine.num_aborted_requests)])
    return "\n".join(lines) + "\n"


class _Rate:
    """Generated tokens per second since the previous call (since creation on the first)."""

    def __init__(self, engine) -> None:
        self.engine, self.t, self.tokens = engine, time.monotonic(), engine.num_generated_tokens

    def __call__(self) -> float:
        now, tokens = time.monotonic(), self.engine.num_generated_tokens
        rate = (tokens - self.tokens) / max(now - self.t, 1e-9)
        self.t, self.tokens = now, tokens
        return rate


def load_snapshot(ctx: ServerContext, gen_throughput: float, include: Optional[set[str]]) -> dict:
    """SGLang's ``LoadSnapshot.to_dict(include)`` for the engine (its one DP rank)."""
    engine, c = ctx.engine, ctx.engine.cfg
    capacity = engine.max_total_num_tokens
    used = engine.num_used_tokens
    waiting_tokens, retracted = engine.waiting_counts()
    load = {
        "timestamp": time.time(), "dp_rank": 0, "num_running_reqs": engine.num_running,
        "num_waiting_reqs": engine.num_waiting,
        "num_waiting_uncached_tokens": waiting_tokens,
        "num_used_tokens": used, "num_total_tokens": used, "num_active_tokens": used,
        "num_prealloc_ready_tokens": 0, "max_total_num_tokens": capacity, "max_running_requests": c.max_running,
        "token_usage": used / capacity if capacity else 0.0, "gen_throughput": gen_throughput,
        "cache_hit_rate": 0.0, "utilization": engine.num_running / c.max_running if c.max_running else 0.0,
        "total_prefill_uncached_tokens": 0, "total_prefill_busy_us": 0, "decode_moments": None,
    }
    if include == {"core"}:
        return load
    every = include is None or "all" in include
    if every or "memory" in include:
        weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        load["memory"] = {"weight_gb": weight_bytes / 1e9, "kv_cache_gb": engine.cache.nbytes() / 1e9,
                          "graph_gb": 0.0, "token_capacity": capacity}
    if every or "queues" in include:
        load["queues"] = {"waiting": engine.num_waiting, "grammar": 0, "paused": engine.num_held,
                          "retracted": retracted, "prealloc_ready": 0}
    return load


def loads_prometheus(load: dict) -> str:
    """SGLang's ``format=prometheus`` of ``/v1/loads``: every number a gauge ``sglang_<key>``
    (a section's as ``sglang_<section>_<key>``, spec/disagg shortened), labelled by dp_rank."""
    prefix = {"speculative": "spec", "disaggregation": "disagg"}
    rank = load["dp_rank"]
    lines = []
    for key, v in load.items():
        items = ([(f"sglang_{prefix.get(key, key)}_{k}", x) for k, x in v.items()] if isinstance(v, dict)
                 else [(f"sglang_{key}", v)])
        for name, x in items:
            if key != "dp_rank" and isinstance(x, (int, float)) and not isinstance(x, bool):
                lines += [f"# TYPE {name} gauge", f'{name}{{dp_rank="{rank}"}} {x}']
    return "\n".join(lines) + "\n"


def loads_router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    rate = _Rate(ctx.engine)

    @r.get("/v1/loads")
    async def loads(dp_rank: Optional[str] = None, include: Optional[str] = None, format: Optional[str] = None):
        try:
            rank = int(dp_rank) if dp_rank is not None else None
        except ValueError:
            raise SchemaError(f"dp_rank: Input should be a valid integer, unable to parse string as an "
                              f"integer (got {dp_rank!r})") from None
        sections = {x.strip() for x in include.split(",")} if include else None
        if sections is not None and not sections <= LOAD_SECTIONS:
            raise SchemaError(f"Invalid include sections: {sections - LOAD_SECTIONS}. Valid options: "
                              f"{sorted(LOAD_SECTIONS)}", type_="400")
        loads = [] if rank not in (None, 0) else [load_snapshot(ctx, rate(), sections)]
        if format == "prometheus":
            return PlainTextResponse("".join(loads_prometheus(x) for x in loads) or "\n", media_type=CONTENT_TYPE)
        return JSONResponse({"timestamp": datetime.now(timezone.utc).isoformat(), "version": VERSION,
                             "accelerator": None, "num_accelerators": 1, "loads": loads,
                             "weight_version": ctx.version()})

    return r


def metrics_router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    rate = _Rate(ctx.engine)

    @r.get("/metrics")
    async def metrics():
        return PlainTextResponse(render(ctx, rate()), media_type=CONTENT_TYPE)

    return r
