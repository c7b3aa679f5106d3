"""What every endpoint of the embedded server shares: the engine, the options, replies,
body parsing, waiting on the engine with a deadline, and the ASGI middleware.

Waiting on the engine never holds a worker thread: a control call is queued on the engine
thread (:meth:`EmbeddedEngine.submit_call`) and awaited on the event loop. When its deadline
passes before it started, or its client hung up, it is cancelled and never takes effect;
once it has started it is waited for, so a reply never says "timed out" about a change
that happened. Blocking joins (gloo rendezvous, broadcasts) run on a small executor of their
own, so they cannot starve anything else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import dataclasses
import json
import math
import secrets
import threading
from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from moe_rl.rollout.embedded.engine import EmbeddedEngine, EngineFailed
from moe_rl.rollout.embedded.protocol import SchemaError


def json_bytes(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON (Starlette's ``JSONResponse`` format), with NaN and
    +-Infinity written as ``null``, as SGLang's orjson responses write them: a legitimate
    ``-inf`` log-prob (a masked token's) must not fail the reply. The common case, every float
    finite, is one ``json.dumps``; only a reply holding a non-finite float is walked."""
    try:
        text = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:  # "Out of range float values are not JSON compliant"
        text = json.dumps(_finite_or_null(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return text.encode("utf-8")


def _finite_or_null(x: Any) -> Any:
    """``x`` with every non-finite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_null(v) for v in x]
    return x


class SafeJSONResponse(JSONResponse):
    """A ``JSONResponse`` written by :func:`json_bytes` (non-finite floats as ``null``)."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


@dataclasses.dataclass
class ServerOptions:
    """Server-side limits and security settings (the CLI flags of ``server.py``)."""

    model_path: str = ""  # served checkpoint directory (/model_info); "" = the engine's
    api_key: str = ""  # require "Authorization: Bearer <api_key>" (not on /health*, /ready*, /metrics*)
    weight_roots: list[str] = dataclasses.field(default_factory=list)  # /update_weights_from_disk reads only below these
    control_timeout_s: float = 300.0  # a control call not started by then is cancelled (504)
    join_timeout_s: float = 120.0  # deadline of a weight-group rendezvous or broadcast
    max_joins: int = 2  # weight-group joins/broadcasts running at once; more get 503
    max_samples_per_request: int = 4096  # prompts x n one /generate may ask
    health_timeout_s: float = 20.0  # /health_generate's one-token generate must finish by then
    enable_metrics: bool = False  # serve GET /metrics (Prometheus text), as SGLang's --enable-metrics


class Unavailable(RuntimeError):
    """The server cannot serve this now (engine dead, busy, deadline passed): 5xx."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class ServerContext:
    """State shared by the routers of one app."""

    def __init__(self, engine: EmbeddedEngine, options: ServerOptions, tokenizer=None) -> None:
        self.engine = engine
        self.options = options
        self.tokenizer = tokenizer
        if tokenizer is not None:
            # The first encode may reconfigure the Rust tokenizer (no_padding / no_truncation,
            # a mutable borrow); do it now, so later encodes on the event loop only read it
            # while the engine thread decodes stop-string tails with the same object. The empty
            # text: a vocabulary without an unknown token cannot spell arbitrary words.
            try:
                tokenizer("")
            except Exception:  # noqa: BLE001 - then a text request gets its own 400
                pass
        self.groups: dict[str, Any] = {}  # weight-update groups by name
        # The served model's identity. SGLang's tokenizer manager moves both to the path of the
        # last successful /update_weights_from_disk (/model_info, /v1/models report them); the
        # startup path stays in /server_info and is the tokenizer's path.
        self.startup_model_path = options.model_path or engine.cfg.model_path
        self.model_path = self.startup_model_path
        self.served_model_name = self.startup_model_path
        self.rids_in_flight: set[str] = set()  # request ids of /generate calls not answered yet
        self.num_generate_requests = 0
        self.startup_time: float | None = None
        self._joins = cf.ThreadPoolExecutor(options.max_joins, thread_name_prefix="weight-group")
        self._join_slots = threading.BoundedSemaphore(options.max_joins)

    def version(self) -> str:
        return self.engine.weight_version

    # ------------------------------------------------------------------ replies
    def ok(self, body: dict | None = None, status: int = 200) -> JSONResponse:
        body = dict(body or {})
        body.setdefault("weight_version", self.version())
        return JSONResponse(body, status_code=status)

    def fail(self, message: str, status: int = 400, **extra) -> JSONResponse:
        return JSONResponse({"success": False, "message": message, "weight_version": self.version(), **extra},
                            status_code=status)

    # ------------------------------------------------------------------ bodies
    @staticmethod
    async def read_json(request: Request, *, required: bool = True) -> dict:
        """The JSON object of the body. An unparseable or non-object body is a
        :class:`SchemaError` (SGLang's FastAPI ``ErrorResponse``), as is an empty one where the
        body is ``required``; otherwise an empty body is ``{}`` (lenient: SGLang's FastAPI
        wants a body, ``{}`` at least, on every control endpoint)."""
        raw = await request.body()
        if not raw.strip():
            if required:
                raise SchemaError("request body: Field required (expected a JSON object)")
            return {}
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:  # FastAPI: HTTPException(400) -> ErrorResponse type "400"
            raise SchemaError(f"There was an error parsing the body: request body is not UTF-8 "
                              f"({e.reason} at byte {e.start})", "400") from e
        except json.JSONDecodeError as e:
            raise SchemaError(f"malformed JSON: JSON decode error: {e}") from e
        except (RecursionError, ValueError) as e:  # nested too deeply, an integer of over 4300 digits:
            # FastAPI answers any other parse failure with HTTPException(400), as for UTF-8
            raise SchemaError(f"There was an error parsing the body: {e}", "400") from e
        if not isinstance(body, dict):
            raise SchemaError(f"request body: input should be a JSON object, got {type(body).__name__}")
        return body

    # ------------------------------------------------------------------ engine calls
    async def on_engine(self, request: Request | None, fn: Callable[[], Any], *, when_idle: bool = False,
                        what: str = "control call") -> Any:
        """Run ``fn`` on the engine thread; cancelled (never runs) if not started before the
        deadline or before the client hangs up."""
        try:
            fut = self.engine.submit_call(fn, when_idle=when_idle)
        except EngineFailed as e:
            raise Unavailable(str(e)) from e
        done = await wait_or_gone(request, [fut], self.options.control_timeout_s)
        if not done and fut.cancel():
            raise Unavailable(f"{what} did not start within {self.options.control_timeout_s:g}s "
                              "(or the client left); cancelled, nothing changed", status=504)
        try:
            return await asyncio.wrap_future(fut)
        except EngineFailed as e:
            raise Unavailable(str(e)) from e

    async def blocking_join(self, fn: Callable[[], Any], what: str) -> Any:
        """Run a blocking collective on the joins executor, at most ``max_joins`` at once."""
        if not self._join_slots.acquire(blocking=False):
            raise Unavailable(f"{what}: {self.options.max_joins} weight-group operations already running")

        def run():
            try:
                return fn()
            finally:
                self._join_slots.release()

        return await asyncio.wrap_future(self._joins.submit(run))

    def close(self) -> None:
        for g in self.groups.values():
            g.close()
        self.groups.clear()
        self._joins.shutdown(wait=False, cancel_futures=True)


async def wait_or_gone(request: Request | None, futs: list[cf.Future], timeout: float | None) -> bool:
    """Wait until every future is done (True), the deadline passes or the client disconnects (False)."""
    waiting = [asyncio.wrap_future(f) for f in futs]
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        step = 0.25 if deadline is None else min(0.25, max(0.0, deadline - loop.time()))
        _, pending = await asyncio.wait(waiting, timeout=step)
        if not pending:
            return True
        if deadline is not None and loop.time() >= deadline:
            return False
        if request is not None and await request.is_disconnected():
            return False


class ServerMiddleware:
    """Pure ASGI (keeps client-disconnect events visible to handlers): checks the API key as
    SGLang does (Bearer token; health, readiness and metrics always open) and stamps every
    response with ``X-Weight-Version``."""

    OPEN_PREFIXES = ("/health", "/ready", "/metrics")

    def __init__(self, app, *, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        key = self.ctx.options.api_key
        if key and scope.get("method") != "OPTIONS" and not scope["path"].startswith(self.OPEN_PREFIXES):
            auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), key.encode()):
                resp = JSONResponse({"error": "Unauthorized"}, status_code=401)
                return await resp(scope, receive, send)

        async def stamped(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers.append((b"x-weight-version", self.ctx.version().encode()))
                message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, stamped)
