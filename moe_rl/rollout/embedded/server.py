"""The embedded engine behind SGLang 0.5.23's HTTP protocol (FastAPI + uvicorn).

``python -m moe_rl.rollout.embedded.server --model-path DIR --port P`` serves ``/generate`` and
the control endpoints the RL loop and sglang-router use. The flags are SGLang's own names
(``--model-path``, ``--max-running-requests``, ``--context-length``, ``--random-seed``,
``--api-key``...), so an SGLang command line works unchanged; SGLang flags that have no
meaning here are accepted where their value is harmless and refused otherwise.

The app is assembled from one router per concern: ``generate_api.py`` (generate, health),
``control_api.py`` (info, pause/continue, abort, memory, version), ``weights_api.py``
(weight updates) and ``metrics_api.py`` (``/v1/loads``, and with ``--enable-metrics`` Prometheus
``/metrics``); ``http_context.py`` holds what they share. Every response carries the
weight version: ``meta_info.weight_version`` in generate items, a ``weight_version`` key in
JSON control replies, and an ``X-Weight-Version`` header on all.

Security: with ``--api-key`` every endpoint but health/readiness/metrics needs
``Authorization: Bearer KEY``; the server refuses to listen beyond loopback without a key.
On SIGTERM/SIGINT the engine stops first, so requests in flight fail at once (503) and the
process exits promptly instead of waiting for them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from moe_rl.rollout.config import EmbeddedEngineConfig
from moe_rl.rollout.embedded.control_api import control_router
from moe_rl.rollout.embedded.engine import EmbeddedEngine
from moe_rl.rollout.embedded.generate_api import generate_router
from moe_rl.rollout.embedded.http_context import ServerContext, ServerMiddleware, ServerOptions, Unavailable
from moe_rl.rollout.embedded.metrics_api import loads_router, metrics_router
from moe_rl.rollout.embedded.protocol import ContractError, RequestError, SchemaError
from moe_rl.rollout.embedded.tokenizer import load_tokenizer
from moe_rl.rollout.embedded.weights_api import weights_router


def build_app(engine: EmbeddedEngine, options: ServerOptions | None = None, *, tokenizer=None) -> FastAPI:
    """The FastAPI app over a started engine."""
    ctx = ServerContext(engine, options or ServerOptions(), tokenizer)
    app = FastAPI()
    app.state.ctx = ctx

    @app.exception_handler(SchemaError)
    async def _schema(_req, exc: SchemaError):
        # SGLang's ErrorResponse (http_server.py validation / HTTPException handlers)
        return JSONResponse({"object": "error", "message": str(exc), "type": exc.type, "param": None, "code": 400,
                             "weight_version": ctx.version()}, status_code=400)

    @app.exception_handler(ContractError)
    async def _contract(_req, exc: ContractError):
        return JSONResponse({"error": str(exc), "weight_version": ctx.version()}, status_code=400)

    @app.exception_handler(RequestError)
    async def _request(_req, exc: RequestError):
        return JSONResponse({"error": {"message": str(exc)}, "weight_version": ctx.version()}, status_code=400)

    @app.exception_handler(Unavailable)
    async def _unavailable(_req, exc: Unavailable):
        return JSONResponse({"error": {"message": str(exc)}, "weight_version": ctx.version()},
                            status_code=exc.status)

    routers = [generate_router(ctx), control_router(ctx), weights_router(ctx), loads_router(ctx)]
    if ctx.options.enable_metrics:
        routers.append(metrics_router(ctx))
    for router in routers:
        app.include_router(router)
    app.add_middleware(ServerMiddleware, ctx=ctx)
    ctx.startup_time = time.time()
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Embedded rollout engine speaking SGLang's HTTP protocol "
                                             "(flags named as SGLang's)")
    ap.add_argument("--model-path", "--model", dest="model_path", required=True, help="HF checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--api-key", default="", help="require 'Authorization: Bearer KEY' (needed off loopback)")
    ap.add_argument("--max-running-requests", "--max-running", dest="max_running", type=int, default=32,
                    help="sequences decoding at once")
    ap.add_argument("--context-length", "--max-context-len", dest="context_length", type=int, default=0,
                    help="prompt + response tokens per sequence; 0 = the model's max_position_embeddings")
    ap.add_argument("--weight-version", default="default")
    ap.add_argument("--random-seed", "--seed", dest="random_seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                    help="model and KV cache dtype (auto = float32 on CPU)")
    ap.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own modelling code")
    ap.add_argument("--enable-return-routed-experts", action="store_true",
                    help="accepted for SGLang compatibility; routed experts are captured unless "
                         "--no-routed-experts")
    ap.add_argument("--no-routed-experts", action="store_true", help="do not capture routed experts")
    ap.add_argument("--weight-roots", nargs="*", default=None,
                    help="/update_weights_from_disk reads only below these directories "
                         "(default: the directory that holds --model-path)")
    ap.add_argument("--max-samples-per-request", type=int, default=4096)
    ap.add_argument("--control-timeout", type=float, default=300.0,
                    help="seconds a control call may wait to start before it is cancelled")
    ap.add_argument("--num-threads", type=int, default=0, help="torch threads; 0 = torch default")
    ap.add_argument("--log-level", default="warning")
    # SGLang flags with no effect on a one-process CPU engine: accepted at their neutral values.
    for flag_name in ("--tp-size", "--tp", "--dp-size", "--dp", "--ep-size", "--ep"):
        ap.add_argument(flag_name, type=int, default=1, dest=f"sgl_{flag_name.lstrip('-').replace('-', '_')}")
    ap.add_argument("--mem-fraction-static", type=float, default=None, help="ignored (no GPU memory pool)")
    ap.add_argument("--base-gpu-id", type=int, default=0, help="ignored (no GPU)")
    ap.add_argument("--enable-metrics", action="store_true", help="serve GET /metrics (Prometheus text format)")
    for flag_name in ("--skip-server-warmup", "--enable-memory-saver",
                      "--enable-weights-cpu-backup"):
        ap.add_argument(flag_name, action="store_true", help="ignored (no effect on the CPU engine)")
    a = ap.parse_args(argv)
    for name in ("tp_size", "tp", "dp_size", "dp", "ep_size", "ep"):
        if getattr(a, f"sgl_{name}") != 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(a, f'sgl_{name}')}: the embedded engine is one "
                     "process (1); use SGLang for parallel serving")
    if not is_loopback(a.host) and not a.api_key:
        ap.error(f"--host {a.host} listens beyond this machine: give --api-key (clients then send "
                 "'Authorization: Bearer KEY'), or bind 127.0.0.1")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    import uvicorn

    cfg = EmbeddedEngineConfig(model_path=a.model_path, max_running=a.max_running, max_context_len=a.context_length,
                               weight_version=a.weight_version, seed=a.random_seed, num_threads=a.num_threads,
                               dtype="float32" if a.dtype == "auto" else a.dtype,
                               capture_routed_experts=not a.no_routed_experts, trust_remote_code=a.trust_remote_code)
    # the tokenizer first: its EOS and additional stop ids end samples too, as in SGLang
    tokenizer = load_tokenizer(a.model_path, trust_remote_code=a.trust_remote_code)
    engine = EmbeddedEngine(cfg, tokenizer=tokenizer)
    engine.start()
    model_path = os.path.abspath(a.model_path)
    roots = a.weight_roots if a.weight_roots is not None else [os.path.dirname(model_path)]
    options = ServerOptions(model_path=model_path, api_key=a.api_key, weight_roots=[os.path.abspath(r) for r in roots],
                            control_timeout_s=a.control_timeout, max_samples_per_request=a.max_samples_per_request,
                            enable_metrics=a.enable_metrics)
    app = build_app(engine, options, tokenizer=tokenizer)
    server = uvicorn.Server(uvicorn.Config(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                                           timeout_graceful_shutdown=5))
    handle_exit = server.handle_exit

    def stop_engine_then_exit(sig, frame):
        # Requests waiting on the engine would hold the graceful shutdown; fail them now.
        engine.stop(f"server shutting down (signal {sig})")
        handle_exit(sig, frame)

    server.handle_exit = stop_engine_then_exit  # type: ignore[method-assign]
    try:
        server.run()
    finally:
        engine.stop("server shutting down")
        app.state.ctx.close()
    sys.exit(1 if (engine.error or "").startswith("engine error") else 0)


if __name__ == "__main__":
    main()
