"""``/generate`` and the health endpoints of the embedded server (SGLang 0.5.23 shapes).

A request whose client hangs up is aborted in the engine (as SGLang does), so a retry on
another server does not double the work. When the engine has failed, a request gets a 5xx
naming the error at once, and ``/health`` answers 503 with the same text; ``/health_generate``
runs a one-token generate through the engine, as SGLang's does.

With a tokenizer, an item's ``text`` and the token texts of ``return_text_in_logprobs`` are
SGLang's (``output_text.py``), and stop strings end samples on the engine thread
(``stop_strings.py``). ``meta_info.weight_versions`` says which version produced which tokens,
``meta_info.num_retractions`` how often a ``retract`` pause moved the sample back to waiting;
``return_prompt_token_ids`` adds the prompt's ids to each item (top-level ``prompt_token_ids``).
Items are built in ``items.py``, their log-prob keys (prompt, top-k and chosen-id log-probs
included) in ``logprobs.py``; ``stream: true`` is served by ``generate_stream.py``.

A request id must be unique among the requests in flight, as SGLang's tokenizer manager keeps
them: a ``rid`` equal to one still running is a 400 "Duplicate request ID detected: <rid>".
With ``n > 1`` the samples get fresh ids (SGLang regenerates them too), so only the check at
submission applies to the given ones.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from moe_rl.rollout.embedded.engine import EngineFailed, SeqResult
from moe_rl.rollout.embedded.generate_stream import error_stream, stream_response
from moe_rl.rollout.embedded.http_context import SafeJSONResponse, ServerContext, Unavailable, wait_or_gone
from moe_rl.rollout.embedded.items import response_item
from moe_rl.rollout.embedded.protocol import ParsedGenerate, RequestError, parse_generate
from moe_rl.rollout.embedded.stop_strings import StopStrings
from moe_rl.rollout.types import SamplingParams


def generate_router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    engine = ctx.engine

    @r.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        t0 = time.monotonic()
        ctx.num_generate_requests += 1
        body = await ctx.read_json(request)
        try:
            req = parse_generate(body, context_len=engine.context_len, vocab_size=engine.vocab_size,
                                 tokenizer=ctx.tokenizer, max_samples=ctx.options.max_samples_per_request)
            given = [r for r in req.rids if r is not None]
            busy = next((r for r in given if r in ctx.rids_in_flight), None)
            if busy is not None:
                raise RequestError(f"Duplicate request ID detected: {busy}")
        except RequestError as e:
            if body.get("stream") is True:  # SGLang refuses it inside the stream it already started
                return error_stream(str(e))
            raise
        held = given if req.params[0].n == 1 else []  # n > 1: the samples run under fresh ids
        ctx.rids_in_flight.update(held)  # no await since the check: no other request in between
        if req.stream:
            try:
                return stream_response(ctx, request, req, t0, held)  # releases the ids when it ends
            except EngineFailed as e:
                ctx.rids_in_flight.difference_update(held)
                raise Unavailable(str(e), status=500) from e
            except BaseException:
                ctx.rids_in_flight.difference_update(held)
                raise
        try:
            return await _run(request, req, t0)
        finally:
            ctx.rids_in_flight.difference_update(held)

    async def _run(request: Request, req: ParsedGenerate, t0: float):
        futs, rids = [], []
        try:
            for prompt, params, rid, spec in zip(req.prompts, req.params, req.rids, req.logprobs):
                ids = [rid] if params.n == 1 and rid is not None else [engine.new_rid() for _ in range(params.n)]
                stop = StopStrings(params.stop, ctx.tokenizer) if params.stop else None
                futs += engine.submit(prompt, params, ids, stop=stop, logprobs=spec)
                rids += ids
        except EngineFailed as e:
            for rid in rids:
                engine.abort(rid=rid)
            raise Unavailable(str(e), status=500) from e
        if not await wait_or_gone(request, futs, None):  # the client hung up
            for rid in rids:
                engine.abort(rid=rid)
            return Response(status_code=499)
        results: list[SeqResult] = [f.result() for f in futs]
        failed = [x for x in results if (x.finish.get("status_code") or 0) >= 500]
        if failed:
            fin = failed[0].finish
            return JSONResponse({"error": {"message": fin["message"]}, "weight_version": ctx.version()},
                                status_code=fin["status_code"])
        n = req.params[0].n
        items = [response_item(ctx, req, i // n, x, time.monotonic() - t0) for i, x in enumerate(results)]
        return SafeJSONResponse(items[0] if req.single else items)  # -inf log-probs as null

    @r.get("/health")
    async def health():
        if not engine.alive:
            return PlainTextResponse(f"unhealthy: {engine.error or 'engine not running'}", status_code=503)
        return Response(status_code=200)

    @r.get("/ready")
    async def ready():
        # SGLang's: whether the server should receive new requests (healthy and not paused)
        if not engine.alive:
            return PlainTextResponse(f"not ready: {engine.error or 'engine not running'}", status_code=503)
        if engine.paused:
            return PlainTextResponse("not ready: generation is paused", status_code=503)
        return Response(status_code=200)

    @r.get("/health_generate")
    async def health_generate(request: Request):
        if not engine.alive:
            return PlainTextResponse(f"unhealthy: {engine.error or 'engine not running'}", status_code=503)
        if engine.paused or engine.released:  # cannot generate now: prove the loop still answers
            await ctx.on_engine(request, lambda: None, what="health check")
            return Response(status_code=200)
        try:
            futs = engine.submit([0], SamplingParams(max_new_tokens=1, temperature=0.0))
        except EngineFailed as e:
            return PlainTextResponse(f"unhealthy: {e}", status_code=503)
        if not await wait_or_gone(None, futs, ctx.options.health_timeout_s):
            return PlainTextResponse(f"unhealthy: a one-token generate took over {ctx.options.health_timeout_s:g}s",
                                     status_code=503)
        fin = futs[0].result().finish
        if (fin.get("status_code") or 0) >= 500:
            return PlainTextResponse(f"unhealthy: {fin['message']}", status_code=503)
        return Response(status_code=200)

    return r
