"""Information and scheduling control endpoints of the embedded server (SGLang 0.5.23 names):
model/server info, the OpenAI model list, flush, pause/continue, abort, memory
release/resume, weight version. Every change runs on the engine thread between two steps
(``ServerContext.on_engine``).

As SGLang's: ``/model_info`` and ``/v1/models`` name the model by the path of the last
successful ``/update_weights_from_disk`` (``model_path`` and ``served_model_name`` both move
there), ``/server_info`` keeps the startup configuration, and ``tokenizer_path`` is the startup
model path (SGLang's default, also with no tokenizer loaded). ``/pause_generation`` modes:
``abort`` ends every request, ``in_place`` keeps the running ones in place (a ``/flush_cache``
then fails while they hold KV), ``retract`` moves them back to waiting with their KV freed (a
flush then succeeds; they recompute it on ``/continue_generation``).

A body that SGLang's pydantic models refuse (a required field missing, a value of the wrong
type or outside a ``Literal``) is a ``SchemaError``: SGLang's ``ErrorResponse``, HTTP 400.
"""

from __future__ import annotations

import asyncio
import math
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from moe_rl.rollout.embedded.http_context import ServerContext
from moe_rl.rollout.embedded.protocol import RequestError, SchemaError, flag, max_req_input_len

VERSION = "0.5.23"  # the SGLang release whose protocol this server speaks (clients parse it as a version)
SERVER = "moe_rl-embedded-0.1"
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


def control_router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    engine = ctx.engine

    def model_info() -> dict:
        cfg = engine.hf_config
        return {
            "model_path": ctx.model_path, "served_model_name": ctx.served_model_name,
            "tokenizer_path": ctx.startup_model_path,
            "is_generation": True, "preferred_sampling_params": None, "weight_version": ctx.version(),
            "load_format": "auto", "reasoning_parser": None, "tool_call_parser": None,
            "disaggregation_mode": "null", "has_image_understanding": False, "has_audio_understanding": False,
            "model_type": cfg.model_type, "architectures": list(cfg.architectures or []),
            # embedded extras for the client's routed-experts decoding
            "num_hidden_layers": engine.num_hidden_layers, "num_experts_per_tok": engine.top_k_experts,
            "moe_layer_ids": engine.moe_layer_ids,
        }

    @r.get("/model_info")
    @r.get("/get_model_info")
    async def get_model_info():
        return JSONResponse(model_info())

    @r.get("/server_info")
    @r.get("/get_server_info")
    async def server_info():
        c = engine.cfg
        return JSONResponse({
            "model_path": ctx.startup_model_path, "tp_size": 1, "dp_size": 1, "ep_size": 1,
            "served_model_name": ctx.startup_model_path, "tokenizer_path": ctx.startup_model_path,
            "skip_tokenizer_init": ctx.tokenizer is None, "page_size": 1,
            "max_running_requests": c.max_running, "context_length": engine.context_len,
            # the scheduler's: KV capacity in tokens (one context per slot), the longest prompt
            "max_total_num_tokens": engine.max_total_num_tokens,
            "max_req_input_len": max_req_input_len(engine.context_len),
            "enable_return_routed_experts": c.capture_routed_experts, "weight_version": ctx.version(),
            "internal_states": [{"num_running_reqs": engine.num_running, "num_waiting_reqs": engine.num_waiting,
                                 "num_held_reqs": engine.num_held, "paused": engine.paused, "released": sorted(engine.released),
                                 "kv_cache_bytes": engine.cache.nbytes(), "engine_error": engine.error,
                                 "num_generate_requests": ctx.num_generate_requests}],
            "version": VERSION, "server": SERVER, "frontend": "python", "startup_time": ctx.startup_time,
        })

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "sglang", "root": name,
                "parent": None, "max_model_len": engine.context_len}

    @r.get("/v1/models")
    async def models():
        return JSONResponse({"object": "list", "data": [model_card(ctx.served_model_name)]})

    @r.get("/v1/models/{model:path}")
    async def model(model: str):
        if model != ctx.served_model_name:
            return JSONResponse({"error": {"message": f"The model '{model}' does not exist",
                                           "type": "invalid_request_error", "param": "model",
                                           "code": "model_not_found"}}, status_code=404)
        return JSONResponse(model_card(model))

    @r.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(request: Request):
        # ``?timeout=S`` (SGLang's, >= 0): wait up to S seconds for the engine to go idle, then
        # flush, instead of refusing at once. Requests that arrived while paused are held
        # outside the scheduler (``num_held``); a paused scheduler's waiting list does not count
        # either (SGLang's ``is_fully_idle(ignore_waiting=paused)``).
        raw = request.query_params.get("timeout", "0")
        try:
            timeout = float(raw)
        except ValueError:
            timeout = math.nan
        if not timeout >= 0.0 or math.isinf(timeout):
            raise SchemaError(f"timeout: Input should be a finite number greater than or equal to 0 "
                              f"(got {raw!r:.80})")
        deadline = time.monotonic() + timeout

        def busy() -> tuple[int, int]:
            return engine.num_running, 0 if engine.paused else engine.num_waiting

        while any(busy()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        running, waiting = busy()
        if running or waiting:
            why = "Timed out waiting for idle state. " if timeout > 0 else ""
            return PlainTextResponse(
                f"{why}Cache not flushed: {running} running, {waiting} waiting requests", status_code=400)
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. "
                                 "(When there are running or waiting requests, the operation will not be performed.)")

    @r.post("/pause_generation")
    async def pause_generation(request: Request):
        body = await ctx.read_json(request, required=False)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise SchemaError(f"mode ({mode!r:.80}) must be 'abort', 'retract' or 'in_place'")
        await ctx.on_engine(request, lambda: engine.pause(mode), what="pause_generation")
        return ctx.ok({"message": "Generation paused successfully.", "status": "ok"})

    @r.post("/continue_generation")
    async def continue_generation(request: Request):
        await ctx.read_json(request, required=False)
        await ctx.on_engine(request, engine.resume, what="continue_generation")
        return ctx.ok({"message": "Generation continued successfully.", "status": "ok"})

    @r.post("/abort_request")
    async def abort_request(request: Request):
        body = await ctx.read_json(request, required=False)
        rid = body.get("rid", "") or ""
        if not isinstance(rid, str):
            raise SchemaError(f"rid must be a string, got {rid!r:.80}")
        engine.abort(rid=rid, abort_all=flag(body, "abort_all"), prefix=True)
        return Response(status_code=200)

    @r.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release_memory(request: Request):
        tags = _tags(await ctx.read_json(request, required=False))

        def release():
            if "kv_cache" in tags:
                if engine.num_running:
                    raise RequestError(f"cannot release kv_cache with {engine.num_running} running requests")
                engine.cache.release()
            engine.released.update(tags)

        await ctx.on_engine(request, release, what="release_memory_occupation")
        return JSONResponse(None)

    @r.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume_memory(request: Request):
        tags = _tags(await ctx.read_json(request, required=False))

        def resume():
            engine.released.difference_update(tags)
            engine.wake()

        await ctx.on_engine(request, resume, what="resume_memory_occupation")
        return JSONResponse(None)

    @r.post("/update_weight_version")
    async def update_weight_version(request: Request):
        body = await ctx.read_json(request)
        new = body.get("new_version")
        if new is None:
            raise SchemaError("new_version: Field required")
        if not isinstance(new, (str, int)) or isinstance(new, bool) or new == "":
            raise RequestError(f"new_version must be a non-empty string, got {new!r:.80}")
        if flag(body, "abort_all_requests", True):
            engine.abort(abort_all=True)

        def set_version():
            engine.weight_version = str(new)

        await ctx.on_engine(request, set_version, what="update_weight_version")
        return ctx.ok({"success": True, "message": "Weight version updated.", "new_version": str(new)})

    return r


def _tags(body: dict) -> set[str]:
    tags = body.get("tags")
    if tags is None:
        return set(MEMORY_TAGS)
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise SchemaError(f"tags ({tags!r:.80}) must be null or a list of strings")
    if any(t not in MEMORY_TAGS for t in tags):
        raise RequestError(f"tags ({tags!r:.80}) must be null or a subset of {list(MEMORY_TAGS)}")
    return set(tags)
