"""The training job as the weight sync sees it: this rank, the world, and the few
collectives the sync needs to agree (barrier, gather an object, share rank 0's object).

A process without ``torch.distributed`` is a job of one rank, so the sync also runs from a
single process (tools, tests) without starting a process group.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(error: str | None) -> str | None:
    """Every rank's error joined (None when no rank failed); the same on every rank."""
    errors = [e for e in gather_objects(error) if e]
    return "; ".join(errors) if errors else None
