"""Weight-update endpoints of the embedded server (SGLang 0.5.23 names and bodies).

Bad input is a 400 with a message and changes nothing: an update is validated whole before
the first tensor is copied (``weight_update.py``), and applied on the engine thread between
two decode steps (on an unpaused engine it waits for running requests to finish, SGLang's
writer lock; on a paused one it applies at once). What a client can make the server read or
allocate is bounded: ``/update_weights_from_disk`` reads only below the configured weight
roots, ``/update_weights_from_distributed`` announces only the model's own tensors, with
the model's own shapes, before any buffer is allocated, and ``/update_weights_from_tensor``
takes only safetensors bytes (``load_format: "safetensors"``): nothing that arrives over HTTP
is unpickled. Rendezvous and broadcasts run on their own bounded executor with a deadline
(``join_timeout_s``: a join gives up then, naming the address); loads from disk run apart from
them, so a join waiting for its trainer does not hold up ``/update_weights_from_disk``.

``/update_weights_from_distributed`` receives as SGLang 0.5.23's model runner does: one
broadcast per tensor (``load_format`` absent or null) or, with ``load_format:
"flattened_bucket"``, one broadcast of a uint8 tensor holding the tensors' bytes back to back
(:func:`flattened_bucket`); any other ``load_format`` is refused before anything is received.
Rank 0 broadcasts every bucket it announces, so a call that does not receive its broadcast (a
refused announcement, a failed or timed-out broadcast) leaves the group's members out of step:
the group is closed then (a peer's pending broadcast fails at once instead of at its timeout)
and every later update on it is refused, saying so, until ``/init_weights_update_group``
joins a new one. A failed receive is SGLang's ``{"success": false, "message": "Failed to
receive weights: ..."}`` (400); the weights and the version stay as they were. (SGLang keeps
such a group, whose next broadcast then pairs with the wrong one.)

Replies have SGLang's shapes. A body SGLang's pydantic models refuse (a required field missing
or of the wrong type) is a ``SchemaError``: SGLang's ``ErrorResponse``, HTTP 400. Every other
failure of an update call (a value that cannot be used: an empty ``model_path``, a path outside
the weight roots, an unknown group, bad ports or ranks, an announcement that does not fit the
model, tensors that do not) is SGLang's failed update: HTTP 400 ``{"success": false,
"message": "<what is wrong>"}`` (``/update_weights_from_disk`` adds ``num_paused_requests``),
which clients read from ``r.json()["success"]``.

Cache flush after an update, as SGLang's scheduler does it (``flush_cache``, default true, on
disk, tensor and distributed updates): on an engine paused ``in_place`` whose requests still
hold KV the new weights are loaded, but the flush is refused and so is the call (400, "Weights
were updated, but the cache was not flushed..."); as in SGLang's tokenizer manager, the weight
version and the model path are then left as they were. Pause with ``retract`` (or ``abort``)
first, or send ``flush_cache: false``.

``/begin_weight_update`` and ``/end_weight_update`` open and close a weight-update session as
SGLang 0.5.23's do (a second begin, or an end without a begin, is a 400), so a client that
drives SGLang works here unchanged; this engine does not require the session around updates.
``/init_weights_update_group`` builds SGLang's group (``rollout/broadcast_group.py``) over gloo
(also when ``backend`` is absent); ``backend: "nccl"`` is refused with a 400 (the engine runs
on CPU) rather than joined over gloo, where a trainer on NCCL would wait for it until its
timeout.

Beyond SGLang (``moe_rl.weights`` uses them when ``GET /weight_sync_info`` answers):

* ``checksums`` ({name: crc32 hex}, ``moe_rl.weights.checksum``) in any update body: the
  engine checks what it received against them and refuses the update naming the first
  tensor that differs. Every successful reply carries ``checksums`` of what was received.
* ``stage_id`` in any update body: the bucket is checked and held, not applied;
  ``POST /commit_staged_weights {stage_id, weight_version, expected_tensors, complete}``
  applies every held bucket at once (and sets the version), ``POST /discard_staged_weights``
  drops them. A new ``stage_id`` drops what an older one held. So a sync that fails half way
  leaves the engine on its old weights and version.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import threading
from typing import Any

import torch
from fastapi import APIRouter, Request

from moe_rl.rollout.broadcast_group import FLATTENED, WeightBroadcastGroup, error_text
from moe_rl.rollout.embedded.http_context import ServerContext, Unavailable
from moe_rl.rollout.embedded.protocol import SchemaError
from moe_rl.rollout.embedded.weight_update import (
    StagedUpdate, WeightUpdateError, apply_update, check_announced, check_complete, load_checkpoint_state,
    plan_update)
from moe_rl.weights import checksum
from moe_rl.weights.payload import SAFETENSORS, decode_safetensors


def under_roots(path: str, roots: list[str]) -> bool:
    """``path`` (symlinks resolved) lies inside one of ``roots``."""
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


CACHE_NOT_FLUSHED = ("Weights were updated, but the cache was not flushed because requests are still running or "
                     "queued. Retract or finish them, then call /flush_cache.")  # SGLang's message


class Refused(ValueError):
    """An update call that cannot be done: SGLang's ``{"success": false, "message"}``, HTTP 400."""


def _str_field(body: dict, key: str) -> str | None:
    """An optional string field (``weight_version``, ``stage_id``): of another type it is SGLang's
    schema error; empty it is refused (a version or stage that cannot be told from none)."""
    v = body.get(key)
    if v is None:
        return None
    _field(body, key, None, str, "string")
    if v == "":
        raise Refused(f"{key} must be a non-empty string, got ''")
    return v


GROUP = "weight_update_group"  # SGLang's default group_name


def flattened_bucket(names: list[str], specs: list[tuple[list[int], torch.dtype]]
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SGLang's ``flattened_bucket`` receive buffer (``FlattenedTensorBucket.empty``,
    ``sglang/srt/weight_sync/tensor_bucket.py``): one uint8 tensor holding the announced tensors'
    bytes back to back, in ``names`` order, without padding. Returns it and each tensor as a
    view of it. Refused where SGLang's raises: an empty bucket, or a tensor whose byte offset
    is not a multiple of its dtype's size."""
    spans, offset = [], 0
    for name, (shape, dt) in zip(names, specs):
        if offset % dt.itemsize:
            raise Refused(f"Failed to receive weights: load_format {FLATTENED!r}: unaligned tensor {name}: "
                          f"byte offset {offset} is not a multiple of {dt}'s size {dt.itemsize}")
        spans.append((offset, math.prod(shape) * dt.itemsize, shape, dt))
        offset += spans[-1][1]
    if not spans:
        raise Refused(f"Failed to receive weights: load_format {FLATTENED!r} with no names (an empty bucket)")
    flat = torch.empty(offset, dtype=torch.uint8)
    return flat, [flat[start:start + size].view(dt).view(shape) for start, size, shape, dt in spans]


def _field(body: dict, key: str, default: Any, typ: type | tuple[type, ...], what: str) -> Any:
    """``body[key]`` (``default`` when absent); of another type it is SGLang's schema error."""
    v = body.get(key, default)
    if not isinstance(v, typ):
        raise SchemaError(f"{key}: Input should be a valid {what}, got {v!r:.80}")
    return v


def _bool_field(body: dict, key: str, default: bool) -> bool:
    return _field(body, key, default, bool, "boolean")


def _required(body: dict, key: str, kind: type, what: str) -> Any:
    """``body[key]``, which SGLang's request model requires to be ``kind``; else a SchemaError."""
    if key not in body or body[key] is None:
        raise SchemaError(f"{key}: Field required")
    v = body[key]
    if kind is int and isinstance(v, str) and v.strip().lstrip("+-").isdigit():
        v = int(v)  # pydantic's lax mode takes "29500" for an int
    if not isinstance(v, kind) or isinstance(v, bool):
        raise SchemaError(f"{key}: must be {what}, got {v!r:.80}")
    return v


def _checksums_field(body: dict) -> dict[str, str] | None:
    v = body.get("checksums")
    if v is None:
        return None
    if not isinstance(v, dict) or not all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        raise Refused("checksums must be an object of tensor name -> checksum string")
    return v


def weights_router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    engine = ctx.engine
    staged: dict[str, StagedUpdate] = {}  # at most one: a new stage_id replaces the old one
    staged_from: dict[str, set] = {}  # stage_id -> the disk paths its buckets came from (None: not disk)
    session = {"open": False}  # SGLang's weight-update session (begin/end)
    disk_slots = threading.BoundedSemaphore(ctx.options.max_joins)  # loads from disk at once

    async def load_from_disk(fn):
        """Run a disk load on the loop's default executor, at most ``max_joins`` at once, apart
        from the weight-group joins (a rendezvous may wait ``join_timeout_s`` for its trainer)."""
        if not disk_slots.acquire(blocking=False):
            raise Unavailable(f"load from disk: {ctx.options.max_joins} loads from disk already running")

        def run():
            try:
                return fn()
            finally:
                disk_slots.release()

        return await asyncio.get_running_loop().run_in_executor(None, run)

    def fields(body: dict) -> tuple[str | None, str | None, bool]:
        """(weight_version, stage_id, flush_cache) of an update body, checked before anything is read."""
        return _str_field(body, "weight_version"), _str_field(body, "stage_id"), _bool_field(body, "flush_cache", True)

    async def apply(request: Request, named, body: dict, *, complete: bool = False,
                    source: str | None = None) -> tuple[bool, str, dict]:
        """Verify checksums, validate all, then stage it or apply all on the engine thread.
        ``source``: the directory the tensors were read from (disk updates)."""
        new_version, stage_id, flush = fields(body)
        abort_all = _bool_field(body, "abort_all_requests", False)
        expected = _checksums_field(body)
        received = checksum.checksums(named)
        try:
            if expected is not None:
                checksum.verify(received, expected, where="engine")
            plan = plan_update(engine.model, named)
            if complete:
                check_complete(engine.model, plan)
        except (WeightUpdateError, checksum.ChecksumMismatch) as e:
            return False, f"Failed to update weights: {e}", {}
        if stage_id is not None:
            if stage_id not in staged:
                staged.clear()
                staged_from.clear()
                staged[stage_id] = StagedUpdate(stage_id)
            try:
                staged[stage_id].add(plan)
            except WeightUpdateError as e:
                return False, f"Failed to stage weights: {e}", {}
            staged_from.setdefault(stage_id, set()).add(source)
            return True, f"Staged {len(plan)} tensors ({len(staged[stage_id])} in {stage_id!r}).", received
        if abort_all:
            engine.abort(abort_all=True)

        def do() -> bool:
            apply_update(engine.model, plan)
            if flush and engine.num_running:  # SGLang's flush after the update is refused
                return False
            if new_version is not None:
                engine.weight_version = new_version
            return True

        if not await ctx.on_engine(request, do, when_idle=not engine.paused, what="weight update"):
            return False, CACHE_NOT_FLUSHED, {}
        if source is not None:
            ctx.model_path = ctx.served_model_name = source
        return True, f"Succeeded to update {len(plan)} tensors.", received

    def reply(success: bool, message: str, received: dict | None = None, *, disk: bool = False):
        body: dict[str, Any] = {"success": success, "message": message}
        if disk:
            body["num_paused_requests"] = 0
        if success and received is not None:
            body["checksums"] = received
        return ctx.ok(body, status=200 if success else 400)

    def refusals_replied(*, disk: bool = False):
        """Route decorator: a :class:`Refused` raised by the route is SGLang's failure reply."""
        def wrap(fn):
            @functools.wraps(fn)
            async def route(request: Request):
                try:
                    return await fn(request)
                except Refused as e:
                    return reply(False, str(e), disk=disk)
            return route
        return wrap

    @r.get("/weight_sync_info")
    async def weight_sync_info():
        return ctx.ok({"staging": True, "checksum": checksum.ALGORITHM, "load_formats": [SAFETENSORS],
                       "staged": {k: len(v) for k, v in staged.items()}})

    @r.post("/update_weights_from_disk")
    @refusals_replied(disk=True)
    async def update_from_disk(request: Request):
        body = await ctx.read_json(request)
        path = _required(body, "model_path", str, "a string")
        fields(body)
        if not path:
            raise Refused("Failed to update weights: model_path is the empty string")
        roots = ctx.options.weight_roots
        if not under_roots(path, roots):
            raise Refused(f"model_path {path!r} is outside the server's weight roots {roots} (--weight-roots)")
        try:
            named = await load_from_disk(lambda: load_checkpoint_state(path, engine.model))
        except WeightUpdateError as e:
            raise Refused(f"Failed to update weights: {e}") from e
        return reply(*await apply(request, named, body, complete=True, source=path), disk=True)

    @r.post("/update_weights_from_tensor")
    @refusals_replied()
    async def update_from_tensor(request: Request):
        body = await ctx.read_json(request)
        blobs = _required(body, "serialized_named_tensors", list, "a list of base64 strings")
        if not all(isinstance(b, str) for b in blobs):
            raise SchemaError(f"serialized_named_tensors: must be a list of base64 strings, got {blobs!r:.80}")
        fields(body)
        if len(blobs) != 1:
            raise Refused("serialized_named_tensors must be a list of one base64 string "
                          "(one entry per TP rank; this engine is TP 1)")
        fmt = body.get("load_format")
        if fmt != SAFETENSORS:
            raise Refused(f"load_format {fmt!r} is not accepted: this engine takes only safetensors "
                          f"bytes (load_format {SAFETENSORS!r}) and never unpickles a payload")
        try:
            named = decode_safetensors(blobs[0])
        except ValueError as e:
            raise Refused(f"Failed to decode serialized_named_tensors: {e}") from e
        return reply(*await apply(request, named, body))

    @r.post("/commit_staged_weights")
    @refusals_replied()
    async def commit_staged(request: Request):
        body = await ctx.read_json(request)
        stage_id = _str_field(body, "stage_id")
        new_version = _str_field(body, "weight_version")
        want = body.get("expected_tensors")
        if want is not None and (not isinstance(want, int) or isinstance(want, bool) or want < 0):
            raise Refused(f"expected_tensors must be a non-negative integer, got {want!r:.80}")
        up = staged.get(stage_id) if stage_id is not None else None
        if up is None:
            return reply(False, f"nothing staged under stage_id {stage_id!r} (staged: {sorted(staged)})")
        if want is not None and len(up) != want:
            return reply(False, f"stage {stage_id!r} holds {len(up)} tensors, the commit expects {want}: "
                                "a bucket is missing or repeated; nothing applied")
        try:
            if _bool_field(body, "complete", False):
                check_complete(engine.model, up.plan)
        except WeightUpdateError as e:
            return reply(False, f"stage {stage_id!r} is not a whole model: {e}; nothing applied")

        def do():
            apply_update(engine.model, up.plan)
            if new_version is not None:
                engine.weight_version = new_version

        await ctx.on_engine(request, do, when_idle=not engine.paused, what="commit of staged weights")
        staged.pop(stage_id, None)
        sources = staged_from.pop(stage_id, set())
        if len(sources) == 1 and None not in sources:  # all read from one checkpoint directory
            ctx.model_path = ctx.served_model_name = next(iter(sources))
        return reply(True, f"Committed {len(up)} staged tensors.")

    @r.post("/discard_staged_weights")
    @refusals_replied()
    async def discard_staged(request: Request):
        body = await ctx.read_json(request, required=False)
        stage_id = _str_field(body, "stage_id")
        dropped = {k: len(v) for k, v in staged.items() if stage_id is None or k == stage_id}
        for k in dropped:
            staged.pop(k)
            staged_from.pop(k, None)
        return reply(True, f"Discarded {dropped or 'nothing'}.")

    @r.post("/begin_weight_update")
    async def begin_weight_update(request: Request):
        await ctx.read_json(request, required=False)
        if session["open"]:
            return reply(False, "a weight-update session is already open; call end_weight_update() first")
        session["open"] = True
        return reply(True, "Success")

    @r.post("/end_weight_update")
    async def end_weight_update(request: Request):
        await ctx.read_json(request, required=False)
        if not session["open"]:
            return reply(False, "no weight-update session is open; call begin_weight_update() first")
        session["open"] = False
        return reply(True, "Success")

    def live_group(name: str) -> bool:
        """A group of that name exists and is not broken (a broken one may be joined anew)."""
        g = ctx.groups.get(name)
        return g is not None and g.broken is None

    @r.post("/init_weights_update_group")
    @refusals_replied()
    async def init_group(request: Request):
        body = await ctx.read_json(request)
        addr = _required(body, "master_address", str, "a string")
        port, rank_offset, world = (_required(body, k, int, "an integer")
                                    for k in ("master_port", "rank_offset", "world_size"))
        name = _field(body, "group_name", GROUP, str, "string")
        backend = _field(body, "backend", "gloo", str, "string")  # (SGLang's default is "nccl"; here only gloo)
        if not 0 < port < 65536 or not 0 < rank_offset < world:
            raise Refused(f"Failed to init group: master_port ({port}) must be in (0, 65536) and rank_offset "
                          f"({rank_offset}) in (0, world_size={world})")
        if not name:
            raise Refused("Failed to init group: group_name is the empty string")
        if backend != "gloo":
            raise Refused(f"backend {backend!r}: this engine runs on CPU and joins weight-update groups "
                          "over gloo only (send backend 'gloo')")
        if live_group(name):
            raise Refused(f"group {name!r} already exists")
        timeout = ctx.options.join_timeout_s
        try:
            g = await ctx.blocking_join(
                lambda: WeightBroadcastGroup(addr, port, rank_offset, world, name, backend, timeout_s=timeout),
                "init_weights_update_group")
        except Unavailable:
            raise
        except Exception as e:  # noqa: BLE001 - rendezvous failure is reported, server keeps serving
            return reply(False, f"Failed to init group: {type(e).__name__}: {e}")
        if live_group(name):  # a concurrent join of the same name won
            g.close()
            return reply(False, f"group {name!r} already exists")
        ctx.groups[name] = g  # (replaces a broken one, closed already)
        return ctx.ok({"success": True, "message": "Succeeded to initialize custom process group."})

    @r.post("/destroy_weights_update_group")
    async def destroy_group(request: Request):
        body = await ctx.read_json(request, required=False)
        name = _field(body, "group_name", GROUP, str, "string")
        g = ctx.groups.pop(name, None)
        if g is None:
            return reply(False, f"no group {name!r:.80}")
        g.close()
        return ctx.ok({"success": True, "message": "Succeeded to destroy custom process group."})

    def receive_buffers(names: list, dtypes: list, shapes: list, fmt: str | None
                        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Check an announcement whole before anything is received; return the buffers the
        broadcast fills (one per tensor, or the one flattened bucket) and the tensors."""
        if fmt not in (None, FLATTENED):
            raise Refused(f"Failed to receive weights: load_format {fmt!r:.80} is not accepted: send none (one "
                          f"broadcast per tensor) or {FLATTENED!r} (one broadcast of the whole bucket)")
        try:
            specs = check_announced(engine.model, names, dtypes, shapes)
        except WeightUpdateError as e:
            raise Refused(f"Failed to receive weights: bad announcement: {e}") from e
        if fmt == FLATTENED:
            flat, tensors = flattened_bucket(names, specs)
            return [flat], tensors
        tensors = [torch.empty(shape, dtype=dt) for shape, dt in specs]
        return tensors, tensors

    def out_of_step(name: str) -> str:
        """What a call that did not receive its broadcast did to the group (it closed it)."""
        return (f"Rank 0 broadcasts every bucket it announces, so weight update group {name!r:.80} is out of "
                "step and now closed: join a new one with /init_weights_update_group")

    @r.post("/update_weights_from_distributed")
    @refusals_replied()
    async def update_from_distributed(request: Request):
        body = await ctx.read_json(request)
        names, dtypes, shapes = (_required(body, k, list, "a list") for k in ("names", "dtypes", "shapes"))
        name = _field(body, "group_name", GROUP, str, "string")
        fmt = _field(body, "load_format", None, (str, type(None)), "string")
        g = ctx.groups.get(name)
        try:
            fields(body)
            if g is None:
                raise Refused(f"Failed to receive weights: no weight update group {name!r:.80}; call "
                              "/init_weights_update_group first")
            wire, tensors = receive_buffers(names, dtypes, shapes, fmt)
        except Refused as e:
            if g is not None:  # refused early all the same (safer than receiving what does not fit)
                g.mark_broken(f"a bucket was refused: {e}")
                e.args = (f"{e}. {out_of_step(name)}",)  # the same refusal, saying what it did
            raise
        if g.broken is not None:
            raise Refused(f"Failed to receive weights: weight update group {name!r:.80} is closed, its members "
                          f"out of step ({g.broken}); join a new one with /init_weights_update_group")
        try:
            await ctx.blocking_join(lambda: g.broadcast(wire), "update_weights_from_distributed")
        except Unavailable as e:  # too busy to receive: the broadcast has no receiver here
            g.mark_broken(f"a bucket was not received: {e}")
            raise Unavailable(f"{e}. {out_of_step(name)}", e.status) from e
        except Exception as e:  # noqa: BLE001 - SGLang's failed receive; nothing applied
            g.mark_broken(f"a broadcast failed: {error_text(e)}")
            raise Refused(f"Failed to receive weights: {error_text(e)}. {out_of_step(name)}") from e
        return reply(*await apply(request, list(zip(names, tensors)), body))

    return r
