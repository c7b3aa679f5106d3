"""The embedded engine behind SGLang 0.5.23's HTTP protocol (FastAPI + uvicorn).

``python -m moe_rl.rollout.embedded.server --model DIR --port P`` serves ``/generate`` and
the control endpoints the RL loop and sglang-router use (see the README's "Rollout engines").
Every response carries the weight version: ``meta_info.weight_version`` in generate items,
a ``weight_version`` key in JSON control replies, and an ``X-Weight-Version`` header on all.

Bad input is a 400 with a message and changes nothing: weight updates are validated whole
before the first tensor is copied (``weight_update.py``). Weight updates run on the engine
thread between decode steps; on an unpaused engine they wait for running requests to
finish (SGLang's writer lock), on a paused one they apply at once.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import time
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from moe_rl.rollout import routed_experts_codec
from moe_rl.rollout.broadcast_group import WeightBroadcastGroup
from moe_rl.rollout.config import EmbeddedEngineConfig
from moe_rl.rollout.embedded.engine import EmbeddedEngine, SeqResult
from moe_rl.rollout.embedded.protocol import ContractError, ParsedGenerate, RequestError, parse_generate
from moe_rl.rollout.embedded.weight_update import (
    WeightUpdateError, apply_update, load_checkpoint_state, parse_dtype, plan_update)

VERSION = "moe_rl-embedded-0.1 (sglang 0.5.23 protocol)"
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


def _load_tokenizer(path: str):
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def build_app(engine: EmbeddedEngine, *, model_path: str = "", tokenizer=None):
    """The FastAPI app over a started engine."""
    app = FastAPI()
    state: dict[str, Any] = {"groups": {}, "num_generate_requests": 0}

    def version() -> str:
        return engine.weight_version

    @app.middleware("http")
    async def weight_version_header(request: Request, call_next):
        resp = await call_next(request)
        resp.headers["X-Weight-Version"] = version()
        return resp

    def ok(body: dict | None = None, status: int = 200):
        body = dict(body or {})
        body.setdefault("weight_version", version())
        return JSONResponse(body, status_code=status)

    def fail(message: str, status: int = 400, **extra):
        return JSONResponse({"success": False, "message": message, "weight_version": version(), **extra},
                            status_code=status)

    async def read_json(request: Request, *, required: bool = True) -> dict:
        raw = await request.body()
        if not raw.strip():
            if required:
                raise RequestError("request body is empty; expected a JSON object")
            return {}
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ContractError(f"malformed JSON: {e}") from e
        if not isinstance(body, dict):
            raise ContractError("request body must be a JSON object")
        return body

    @app.exception_handler(ContractError)
    async def _contract(_req, exc: ContractError):
        return JSONResponse({"error": str(exc), "weight_version": version()}, status_code=400)

    @app.exception_handler(RequestError)
    async def _request(_req, exc: RequestError):
        return JSONResponse({"error": {"message": str(exc)}, "weight_version": version()}, status_code=400)

    # ------------------------------------------------------------------ generate
    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        t0 = time.monotonic()
        state["num_generate_requests"] += 1
        body = await read_json(request)
        req = parse_generate(body, context_len=engine.context_len, vocab_size=engine.vocab_size,
                             tokenizer=tokenizer)
        futs = []
        for prompt, params, rid in zip(req.prompts, req.params, req.rids):
            rids = None
            if params.n == 1 and rid is not None:
                rids = [rid]
            futs.append(engine.submit(prompt, params, rids))
        results = [await asyncio.wrap_future(f) for fs in futs for f in fs]
        items = [_item(req, i // req.params[0].n, r, time.monotonic() - t0) for i, r in enumerate(results)]
        return JSONResponse(items[0] if req.single else items)

    def _item(req: ParsedGenerate, prompt_idx: int, r: SeqResult, latency: float) -> dict:
        fin = r.finish
        meta: dict[str, Any] = {
            "id": r.rid, "finish_reason": fin, "prompt_tokens": r.prompt_len,
            "completion_tokens": len(r.output_ids), "cached_tokens": 0, "reasoning_tokens": 0,
            "weight_version": r.weight_version, "num_retractions": 0, "e2e_latency": latency,
        }
        if req.return_logprob[prompt_idx]:
            meta["input_token_logprobs"] = []
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(r.output_logprobs, r.output_ids)]
            meta["output_token_logprobs_length"] = len(r.output_ids)
        if req.return_routed_experts and r.routes_NLK is not None:
            routes_NLK = r.routes_NLK[req.routed_experts_start_len:]
            full_NHK = torch.full((routes_NLK.shape[0], engine.num_hidden_layers, routes_NLK.shape[2]), -1,
                                  dtype=torch.int32)
            full_NHK[:, engine.moe_layer_ids] = routes_NLK
            meta["routed_experts"] = routed_experts_codec.encode(full_NHK)
        item: dict[str, Any] = {"output_ids": r.output_ids, "meta_info": meta}
        if tokenizer is not None:
            item["text"] = tokenizer.decode(r.output_ids, skip_special_tokens=True)
        return item

    # ------------------------------------------------------------------ info
    @app.get("/health")
    @app.get("/health_generate")
    @app.get("/ready")
    async def health():
        return Response(status_code=200)

    def model_info() -> dict:
        cfg = engine.hf_config
        return {
            "model_path": model_path, "served_model_name": model_path,
            "tokenizer_path": model_path if tokenizer is not None else None,
            "is_generation": True, "preferred_sampling_params": None, "weight_version": version(),
            "load_format": "auto", "reasoning_parser": None, "tool_call_parser": None,
            "disaggregation_mode": "null", "has_image_understanding": False, "has_audio_understanding": False,
            "model_type": cfg.model_type, "architectures": list(cfg.architectures or []),
            # embedded extras for the client's routed-experts decoding
            "num_hidden_layers": engine.num_hidden_layers, "num_experts_per_tok": engine.top_k_experts,
            "moe_layer_ids": engine.moe_layer_ids,
        }

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def get_model_info():
        return JSONResponse(model_info())

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        c = engine.cfg
        return JSONResponse({
            "model_path": model_path, "tp_size": 1, "dp_size": 1, "ep_size": 1,
            "max_running_requests": c.max_running, "context_length": engine.context_len,
            "enable_return_routed_experts": c.capture_routed_experts, "weight_version": version(),
            "internal_states": [{"num_running_reqs": engine.num_running, "num_waiting_reqs": engine.num_waiting,
                                 "paused": engine.paused, "released": sorted(engine.released),
                                 "num_generate_requests": state["num_generate_requests"]}],
            "version": VERSION, "frontend": "python", "startup_time": state.get("startup_time"),
        })

    @app.get("/v1/loads")
    async def loads():
        return JSONResponse({"loads": [{"dp_rank": 0, "num_running_reqs": engine.num_running,
                                        "num_waiting_reqs": engine.num_waiting}], "weight_version": version()})

    # ------------------------------------------------------------------ scheduling control
    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        # Requests that arrived while paused wait outside the scheduler (SGLang blocks them in
        # the tokenizer manager), so they do not prevent a flush.
        waiting = 0 if engine.paused else engine.num_waiting
        if engine.num_running or waiting:
            return PlainTextResponse(
                f"Cache not flushed: {engine.num_running} running, {waiting} waiting requests",
                status_code=400)
        return PlainTextResponse("Cache flushed.\nPlease check backend logs for more details. "
                                 "(When there are running or waiting requests, the operation will not be performed.)")

    @app.post("/pause_generation")
    async def pause_generation(request: Request):
        body = await read_json(request, required=False)
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise RequestError(f"mode ({mode!r}) must be 'abort', 'retract' or 'in_place'")
        await asyncio.to_thread(engine.call, lambda: engine.pause(mode))
        return ok({"message": "Generation paused successfully.", "status": "ok"})

    @app.post("/continue_generation")
    async def continue_generation(request: Request):
        await read_json(request, required=False)
        await asyncio.to_thread(engine.call, engine.resume)
        return ok({"message": "Generation continued successfully.", "status": "ok"})

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await read_json(request, required=False)
        engine.abort(rid=str(body.get("rid", "") or ""), abort_all=bool(body.get("abort_all", False)))
        return Response(status_code=200)

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release_memory(request: Request):
        tags = _tags(await read_json(request, required=False))

        def release():
            if "kv_cache" in tags:
                if engine.num_running:
                    raise RequestError(f"cannot release kv_cache with {engine.num_running} running requests")
                engine.cache.release()
            engine.released.update(tags)

        await asyncio.to_thread(engine.call, release)
        return JSONResponse(None)

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume_memory(request: Request):
        tags = _tags(await read_json(request, required=False))
        await asyncio.to_thread(engine.call, lambda: engine.released.difference_update(tags))
        engine._wake.set()
        return JSONResponse(None)

    def _tags(body: dict) -> set[str]:
        tags = body.get("tags")
        if tags is None:
            return set(MEMORY_TAGS)
        if not isinstance(tags, list) or any(t not in MEMORY_TAGS for t in tags):
            raise RequestError(f"tags ({tags!r}) must be null or a subset of {list(MEMORY_TAGS)}")
        return set(tags)

    # ------------------------------------------------------------------ weights
    async def _apply(named, body: dict) -> tuple[bool, str]:
        """Validate all, then apply all on the engine thread; bump the version if asked."""
        new_version = body.get("weight_version")
        if new_version is not None and not isinstance(new_version, (str, int)):
            raise RequestError(f"weight_version must be a string, got {new_version!r}")
        if body.get("abort_all_requests", False):
            engine.abort(abort_all=True, message="Abort by weight update")
        try:
            plan = plan_update(engine.model, named)
        except WeightUpdateError as e:
            return False, f"Failed to update weights: {e}"

        def do():
            apply_update(engine.model, plan)
            if new_version is not None:
                engine.weight_version = str(new_version)

        await asyncio.to_thread(engine.call, do, when_idle=not engine.paused)
        return True, f"Succeeded to update {len(plan)} tensors."

    def _reply(success: bool, message: str):
        return ok({"success": success, "message": message, "num_paused_requests": 0},
                  status=200 if success else 400)

    @app.post("/update_weights_from_disk")
    async def update_from_disk(request: Request):
        body = await read_json(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise RequestError("model_path (string) is required")
        try:
            named = await asyncio.to_thread(load_checkpoint_state, path, engine.model)
        except WeightUpdateError as e:
            return _reply(False, f"Failed to update weights: {e}")
        return _reply(*await _apply(named, body))

    @app.post("/update_weights_from_tensor")
    async def update_from_tensor(request: Request):
        body = await read_json(request)
        blobs = body.get("serialized_named_tensors")
        if not isinstance(blobs, list) or not blobs or not isinstance(blobs[0], str):
            raise RequestError("serialized_named_tensors must be a non-empty list of base64 strings")
        try:
            # one entry per TP rank in SGLang; the embedded engine is TP 1
            obj = torch.load(io.BytesIO(base64.b64decode(blobs[0])), weights_only=True)
            named = [(str(n), t) for n, t in obj]
        except Exception as e:  # noqa: BLE001 - undecodable payload is bad input
            return _reply(False, f"Failed to decode serialized_named_tensors: {type(e).__name__}: {e}")
        return _reply(*await _apply(named, body))

    @app.post("/init_weights_update_group")
    async def init_group(request: Request):
        body = await read_json(request)
        try:
            addr, port = str(body["master_address"]), int(body["master_port"])
            rank_offset, world = int(body["rank_offset"]), int(body["world_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise RequestError(f"master_address, master_port, rank_offset, world_size are required: {e}") from e
        name = body.get("group_name", "weight_update_group")
        backend = body.get("backend", "gloo")
        if backend == "nccl":  # the trainer's default spelling; CPU has only gloo
            backend = "gloo"
        if name in state["groups"]:
            return _reply(False, f"group {name!r} already exists")
        try:
            g = await asyncio.to_thread(WeightBroadcastGroup, addr, port, rank_offset, world, name, backend)
        except Exception as e:  # noqa: BLE001 - rendezvous failure is reported, server keeps serving
            return _reply(False, f"Failed to init group: {type(e).__name__}: {e}")
        state["groups"][name] = g
        return ok({"success": True, "message": "Succeeded to initialize custom process group."})

    @app.post("/destroy_weights_update_group")
    async def destroy_group(request: Request):
        body = await read_json(request, required=False)
        name = body.get("group_name", "weight_update_group")
        if state["groups"].pop(name, None) is None:
            return _reply(False, f"no group {name!r}")
        return ok({"success": True, "message": "Succeeded to destroy custom process group."})

    @app.post("/update_weights_from_distributed")
    async def update_from_distributed(request: Request):
        body = await read_json(request)
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
            raise RequestError("names, dtypes and shapes (lists) are required")
        if not len(names) == len(dtypes) == len(shapes):
            raise RequestError(f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes ({len(shapes)}) "
                               "must have the same length")
        g = state["groups"].get(body.get("group_name", "weight_update_group"))
        if g is None:
            raise RequestError(f"no weight update group {body.get('group_name', 'weight_update_group')!r}; "
                               "call /init_weights_update_group first")
        try:
            bufs = [torch.empty([int(d) for d in s], dtype=parse_dtype(dt)) for s, dt in zip(shapes, dtypes)]
        except (WeightUpdateError, TypeError, ValueError) as e:
            raise RequestError(f"bad dtypes/shapes: {e}") from e
        # receive everything the trainer broadcasts (keeps the collective in step), then validate
        await asyncio.to_thread(g.broadcast, bufs)
        return _reply(*await _apply(list(zip([str(n) for n in names], bufs)), body))

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request):
        body = await read_json(request)
        new = body.get("new_version")
        if not isinstance(new, (str, int)) or isinstance(new, bool) or new == "":
            raise RequestError("new_version (non-empty string) is required")
        if body.get("abort_all_requests", True):
            engine.abort(abort_all=True, message="Abort by weight version update")

        def set_version():
            engine.weight_version = str(new)

        await asyncio.to_thread(engine.call, set_version)
        return ok({"success": True, "message": "Weight version updated.", "new_version": str(new)})

    state["startup_time"] = time.time()
    return app


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Embedded rollout engine speaking SGLang's HTTP protocol")
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--max-running", type=int, default=32, help="sequences decoding at once")
    ap.add_argument("--max-context-len", type=int, default=0, help="0 = max_position_embeddings")
    ap.add_argument("--weight-version", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-threads", type=int, default=0, help="torch threads; 0 = torch default")
    ap.add_argument("--no-routed-experts", action="store_true", help="do not capture routed experts")
    ap.add_argument("--log-level", default="warning")
    a = ap.parse_args(argv)
    import uvicorn

    cfg = EmbeddedEngineConfig(model_path=a.model, max_running=a.max_running, max_context_len=a.max_context_len,
                               weight_version=a.weight_version, seed=a.seed, num_threads=a.num_threads,
                               capture_routed_experts=not a.no_routed_experts)
    engine = EmbeddedEngine(cfg)
    engine.start()
    app = build_app(engine, model_path=os.path.abspath(a.model), tokenizer=_load_tokenizer(a.model))
    # paused requests never finish on their own: bound the graceful shutdown
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, access_log=False,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
