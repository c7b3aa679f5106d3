"""``/generate`` with ``stream: true``: SGLang 0.5.23's Server-Sent Events.

Framing: each chunk is ``data: <json>\\n\\n`` (the JSON as the non-streamed reply writes it),
and the stream ends with ``data: [DONE]\\n\\n``. A chunk is a whole response item
(``items.py``), **cumulative** as SGLang's default (non-incremental) output: ``output_ids``,
``text`` and the log-probs so far, ``finish_reason`` null until the sample's last chunk, which
is exactly its non-streamed item. A batch stream (several prompts, or ``n > 1``) interleaves
its samples' chunks as they come and gives each an ``index``: its position in the
non-streamed list (prompt-major). A sample ended by an abort (``/abort_request``, a
``/pause_generation`` in mode abort) or by an engine failure ends with its chunk carrying that
``finish_reason`` (SGLang streams its abort item instead of failing the request).

When chunks go out (SGLang's output streamer): a sample's first token at once, then every
``sampling_params.stream_interval`` new tokens (default 1); a chunk whose decoded tail ends
with the beginning of one of the request's stop strings is held back; chunks the client has
not taken yet are coalesced into the latest one (SGLang's tokenizer manager keeps the last
of its queued outputs). Unfinished ``text`` is released as SGLang's detokenizer releases it
(``output_text.IncrementalText``).

Errors: a request SGLang's tokenizer manager refuses (``RequestError``) is an HTTP 200 stream
of one ``data: {"error": {"message", "type": "invalid_request_error", "code": 400,
"retryable": false}}`` chunk and ``[DONE]``; parse and schema errors stay HTTP 400 replies, as
SGLang checks them before it starts streaming.

A client that disconnects aborts its unfinished samples (their slots free at the engine's next
step) and releases its request ids; so does any other end of the response. The engine thread
only hands token events to the event loop (``call_soon_threadsafe``), it never waits on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import time
from typing import Any, AsyncIterator, Callable

from fastapi import Request
from starlette.responses import StreamingResponse

from moe_rl.rollout.embedded.engine import SeqResult, TokenEvent
from moe_rl.rollout.embedded.http_context import ServerContext, json_bytes
from moe_rl.rollout.embedded.items import response_item
from moe_rl.rollout.embedded.output_text import IncrementalText
from moe_rl.rollout.embedded.protocol import ParsedGenerate
from moe_rl.rollout.embedded.stop_strings import StopStrings

DONE = b"data: [DONE]\n\n"
IDLE_POLL_S = 0.25  # while no token comes, look this often whether the client is still there


def sse(obj: Any) -> bytes:
    """One event, JSON written as the non-streamed reply writes it (non-finite floats as null)."""
    return b"data: " + json_bytes(obj) + b"\n\n"


class SSEResponse(StreamingResponse):
    """An event stream whose ``on_close`` runs once however it ends: done, client gone,
    cancelled, or failed (the body generator is closed first, so its own cleanup runs)."""

    def __init__(self, body: AsyncIterator[bytes], on_close: Callable[[], None] | None = None) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self._on_close is not None:
                on_close, self._on_close = self._on_close, None
                on_close()


def error_stream(message: str, code: int = 400) -> SSEResponse:
    """SGLang's stream for a request its tokenizer manager refuses: one error event, then [DONE]."""

    async def body():
        yield sse({"error": {"message": message, "type": "invalid_request_error", "code": code,
                             "retryable": False}})
        yield DONE

    return SSEResponse(body())


class _Sample:
    """What one streamed sample has produced, and how much of it the stream has shown."""

    def __init__(self, rid: str, prompt_idx: int, prompt_len: int, interval: int, stop: StopStrings | None,
                 text: IncrementalText | None) -> None:
        self.rid = rid
        self.prompt_idx = prompt_idx
        self.prompt_len = prompt_len
        self.interval = interval
        self.stop = stop
        self.text = text
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.tops: list = []
        self.chosen: list = []
        self.versions: list[str] = []
        self.num_retractions = 0
        self.input_logprobs = None
        self.sent = 0  # tokens shown by the last chunk (SGLang's send_token_offset)
        self.result: SeqResult | None = None

    def take(self, ev: TokenEvent) -> bool:
        """Record a token; True when a chunk goes out for it (SGLang's streaming rule)."""
        self.ids.append(ev.token)
        self.lps.append(ev.logprob)
        self.tops.append(ev.top)
        self.chosen.append(ev.token_ids_logprobs)
        self.versions.append(ev.weight_version)
        self.num_retractions = ev.num_retractions
        self.input_logprobs = ev.input_logprobs
        if ev.finished:  # its future's "done" event brings the last chunk
            return False
        unsent = len(self.ids) - self.sent
        if not (self.interval == 1 or unsent >= self.interval or self.sent == 0):
            return False
        if self.stop is not None and self.stop.holds_prefix(self.ids):
            return False
        if self.text is not None:
            self.text.advance(self.ids[self.sent:])
        self.sent = len(self.ids)
        return True

    def partial(self) -> SeqResult:
        """The sample as its last chunk shows it (finish_reason null)."""
        n = self.sent
        spans: list[dict] = []
        for i, v in enumerate(self.versions[:n]):
            if spans and spans[-1]["version"] == v:
                spans[-1]["end"] = i + 1
            else:
                spans.append({"version": v, "start": i, "end": i + 1})
        return SeqResult(rid=self.rid, prompt_len=self.prompt_len, output_ids=self.ids[:n],
                         output_logprobs=self.lps[:n], routes_NLK=None, finish=None,
                         weight_version=spans[-1]["version"], weight_versions=spans,
                         num_retractions=self.num_retractions, input_logprobs=self.input_logprobs,
                         output_top=self.tops[:n], output_token_ids_logprobs=self.chosen[:n])


def stream_response(ctx: ServerContext, request: Request, req: ParsedGenerate, t0: float,
                    held_rids: list[str]) -> SSEResponse:
    """Submit ``req`` (already parsed and its ``held_rids`` marked in flight) and stream it.
    Raises ``EngineFailed`` (after aborting what it submitted, releasing nothing) when the
    engine is down; the caller then replies 500 and releases the ids."""
    engine = ctx.engine
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item: tuple) -> None:  # engine thread (or this loop): hand over, never wait
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is going down
            pass

    samples: list[_Sample] = []
    futs: list[cf.Future] = []
    try:
        for i, (prompt, params, rid) in enumerate(zip(req.prompts, req.params, req.rids)):
            ids = [rid] if params.n == 1 and rid is not None else [engine.new_rid() for _ in range(params.n)]
            stop = StopStrings(params.stop, ctx.tokenizer) if params.stop else None
            base = len(samples)
            o = req.text_options[i]
            for r in ids:
                text = None if ctx.tokenizer is None else IncrementalText(
                    ctx.tokenizer, prompt, skip_special_tokens=o.skip_special_tokens,
                    spaces_between_special_tokens=o.spaces_between_special_tokens)
                samples.append(_Sample(r, i, len(prompt), req.stream_intervals[i], stop, text))
            futs += engine.submit(prompt, params, ids, stop=stop, logprobs=req.logprobs[i],
                                  on_token=lambda ev, base=base: put(("token", base + ev.index, ev)))
    except BaseException:
        for s in samples[: len(futs)]:
            engine.abort(rid=s.rid)
        raise
    for k, f in enumerate(futs):
        f.add_done_callback(lambda _f, k=k: put(("done", k, None)))

    def close() -> None:
        for s, f in zip(samples, futs):
            if not f.done():
                engine.abort(rid=s.rid)
        ctx.rids_in_flight.difference_update(held_rids)

    def chunk(k: int) -> bytes:
        s = samples[k]
        if s.result is not None:
            item = response_item(ctx, req, s.prompt_idx, s.result, time.monotonic() - t0)
        else:
            item = response_item(ctx, req, s.prompt_idx, s.partial(), None,
                                 text=s.text.text if s.text is not None else None)
        if not req.single:
            item["index"] = k
        return sse(item)

    async def body() -> AsyncIterator[bytes]:
        left = len(samples)
        while left:
            try:
                first = await asyncio.wait_for(queue.get(), IDLE_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            events = [first]
            while not queue.empty():
                events.append(queue.get_nowait())
            touched: dict[int, None] = {}  # samples with a chunk to send, in order of arrival
            for kind, k, ev in events:
                s = samples[k]
                if s.result is not None:
                    continue
                if kind == "done":
                    s.result = futs[k].result()
                    left -= 1
                    touched[k] = None
                elif s.take(ev):
                    touched[k] = None
            for k in touched:
                yield chunk(k)
        yield DONE

    return SSEResponse(body(), close)
