"""``GET /metrics`` of the embedded server (with ``--enable-metrics``, as SGLang): Prometheus
text exposition of the subset of SGLang's ``sglang:*`` series that a CPU engine has, under
SGLang's names, types and labels, so a Prometheus scrape config or sglang-router's
``/engine_metrics`` written for SGLang works unchanged.

Gauges carry SGLang's scheduler labels (``model_name``, ``engine_type``, ``tp_rank``,
``pp_rank``, ``moe_ep_rank``), counters its tokenizer-manager labels (``model_name``,
``engine_type``, plus ``is_streaming`` where SGLang has it). ``sglang:gen_throughput`` is the
generation rate since the previous scrape (since the server started, on the first): SGLang's
is over its last decode-log interval. Everything is read from the engine without stopping it.
"""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from moe_rl.rollout.embedded.http_context import ServerContext

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
    capacity = engine.cfg.max_running * engine.context_len  # as /server_info's max_total_num_tokens
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


def metrics_router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    last = {"t": time.monotonic(), "tokens": ctx.engine.num_generated_tokens}

    @r.get("/metrics")
    async def metrics():
        now, tokens = time.monotonic(), ctx.engine.num_generated_tokens
        rate = (tokens - last["tokens"]) / max(now - last["t"], 1e-9)
        last.update(t=now, tokens=tokens)
        return PlainTextResponse(render(ctx, rate), media_type=CONTENT_TYPE)

    return r
