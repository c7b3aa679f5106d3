"""Weight-update endpoints of the embedded server (SGLang 0.5.23 names and bodies).

Bad input is a 400 with a message and changes nothing: an update is validated whole before
the first tensor is copied (``weight_update.py``), and applied on the engine thread between
two decode steps (on an unpaused engine it waits for running requests to finish, SGLang's
writer lock; on a paused one it applies at once). What a client can make the server read or
allocate is bounded: ``/update_weights_from_disk`` reads only below the configured weight
roots, and ``/update_weights_from_distributed`` announces only the model's own tensors, with
the model's own shapes, before any buffer is allocated. Rendezvous and broadcasts run on
their own bounded executor with a deadline.
"""

from __future__ import annotations

import base64
import io
import os

import torch
from fastapi import APIRouter, Request

from moe_rl.rollout.broadcast_group import WeightBroadcastGroup
from moe_rl.rollout.embedded.http_context import ServerContext, Unavailable
from moe_rl.rollout.embedded.protocol import RequestError, flag
from moe_rl.rollout.embedded.weight_update import (
    WeightUpdateError, apply_update, check_announced, load_checkpoint_state, plan_update)


def under_roots(path: str, roots: list[str]) -> bool:
    """``path`` (symlinks resolved) lies inside one of ``roots``."""
    real = os.path.realpath(path)
    for root in roots:
        r = os.path.realpath(root)
        if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
            return True
    return False


def weights_router(ctx: ServerContext) -> APIRouter:
    r = APIRouter()
    engine = ctx.engine

    async def apply(request: Request, named, body: dict) -> tuple[bool, str]:
        """Validate all, then apply all on the engine thread; bump the version if asked."""
        new_version = body.get("weight_version")
        if new_version is not None and (not isinstance(new_version, (str, int)) or isinstance(new_version, bool)):
            raise RequestError(f"weight_version must be a string, got {new_version!r:.80}")
        if flag(body, "abort_all_requests"):
            engine.abort(abort_all=True, message="Abort by weight update")
        try:
            plan = plan_update(engine.model, named)
        except WeightUpdateError as e:
            return False, f"Failed to update weights: {e}"

        def do():
            apply_update(engine.model, plan)
            if new_version is not None:
                engine.weight_version = str(new_version)

        await ctx.on_engine(request, do, when_idle=not engine.paused, what="weight update")
        return True, f"Succeeded to update {len(plan)} tensors."

    def reply(success: bool, message: str):
        return ctx.ok({"success": success, "message": message, "num_paused_requests": 0},
                      status=200 if success else 400)

    @r.post("/update_weights_from_disk")
    async def update_from_disk(request: Request):
        body = await ctx.read_json(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise RequestError("model_path (string) is required")
        roots = ctx.options.weight_roots
        if not under_roots(path, roots):
            return reply(False, f"model_path {path!r} is outside the server's weight roots {roots} "
                                "(--weight-roots)")
        try:
            named = await ctx.blocking_join(lambda: load_checkpoint_state(path, engine.model), "load from disk")
        except WeightUpdateError as e:
            return reply(False, f"Failed to update weights: {e}")
        return reply(*await apply(request, named, body))

    @r.post("/update_weights_from_tensor")
    async def update_from_tensor(request: Request):
        body = await ctx.read_json(request)
        blobs = body.get("serialized_named_tensors")
        if not isinstance(blobs, list) or not blobs or not isinstance(blobs[0], str):
            raise RequestError("serialized_named_tensors must be a non-empty list of base64 strings")
        try:
            # one entry per TP rank in SGLang; the embedded engine is TP 1
            obj = torch.load(io.BytesIO(base64.b64decode(blobs[0])), weights_only=True)
            named = [(str(n), t) for n, t in obj]
        except Exception as e:  # noqa: BLE001 - undecodable payload is bad input
            return reply(False, f"Failed to decode serialized_named_tensors: {type(e).__name__}: {e}")
        return reply(*await apply(request, named, body))

    @r.post("/init_weights_update_group")
    async def init_group(request: Request):
        body = await ctx.read_json(request)
        try:
            addr, port = str(body["master_address"]), int(body["master_port"])
            rank_offset, world = int(body["rank_offset"]), int(body["world_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise RequestError(f"master_address, master_port, rank_offset, world_size are required: {e}") from e
        if not 0 < port < 65536 or not 0 < rank_offset < world:
            raise RequestError(f"master_port ({port}) must be in (0, 65536) and rank_offset ({rank_offset}) "
                               f"in (0, world_size={world})")
        name = body.get("group_name", "weight_update_group")
        if not isinstance(name, str) or not name:
            raise RequestError(f"group_name must be a non-empty string, got {name!r:.80}")
        backend = body.get("backend", "gloo")
        if backend == "nccl":  # the trainer's default spelling; CPU has only gloo
            backend = "gloo"
        if name in ctx.groups:
            return reply(False, f"group {name!r} already exists")
        timeout = ctx.options.join_timeout_s
        try:
            g = await ctx.blocking_join(
                lambda: WeightBroadcastGroup(addr, port, rank_offset, world, name, backend, timeout_s=timeout),
                "init_weights_update_group")
        except Unavailable:
            raise
        except Exception as e:  # noqa: BLE001 - rendezvous failure is reported, server keeps serving
            return reply(False, f"Failed to init group: {type(e).__name__}: {e}")
        if name in ctx.groups:  # a concurrent join of the same name won
            g.close()
            return reply(False, f"group {name!r} already exists")
        ctx.groups[name] = g
        return ctx.ok({"success": True, "message": "Succeeded to initialize custom process group."})

    @r.post("/destroy_weights_update_group")
    async def destroy_group(request: Request):
        body = await ctx.read_json(request, required=False)
        name = body.get("group_name", "weight_update_group")
        g = ctx.groups.pop(name, None) if isinstance(name, str) else None
        if g is None:
            return reply(False, f"no group {name!r:.80}")
        g.close()
        return ctx.ok({"success": True, "message": "Succeeded to destroy custom process group."})

    @r.post("/update_weights_from_distributed")
    async def update_from_distributed(request: Request):
        body = await ctx.read_json(request)
        names, dtypes, shapes = body.get("names"), body.get("dtypes"), body.get("shapes")
        if not (isinstance(names, list) and isinstance(dtypes, list) and isinstance(shapes, list)):
            raise RequestError("names, dtypes and shapes (lists) are required")
        name = body.get("group_name", "weight_update_group")
        g = ctx.groups.get(name) if isinstance(name, str) else None
        if g is None:
            raise RequestError(f"no weight update group {name!r:.80}; call /init_weights_update_group first")
        try:
            specs = check_announced(engine.model, names, dtypes, shapes)
        except WeightUpdateError as e:
            raise RequestError(f"bad announcement: {e}") from e
        bufs = [torch.empty(shape, dtype=dt) for shape, dt in specs]
        # receive everything the trainer broadcasts (keeps the collective in step), then validate
        await ctx.blocking_join(lambda: g.broadcast(bufs), "update_weights_from_distributed")
        return reply(*await apply(request, list(zip(names, bufs)), body))

    return r
