"""Small collectives on host tensors, on whichever backend the group uses.

Counts, metrics and flags are built on the CPU (``torch.tensor([...])``). On gloo they can go
to ``dist.all_reduce`` as they are; on NCCL (every GPU run: the world group and Megatron's
groups are NCCL only, no gloo fallback) a CPU tensor is refused ("No backend type associated
with device type cpu"), so it has to travel through the current GPU. Every host-side
collective of the project goes through here, so the CPU tests and a GPU run take the same
code path and differ only in the device the bytes cross.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def comm_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """The device ``group``'s backend reduces on: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _crossing(t: torch.Tensor, group, collective) -> torch.Tensor:
    """Run ``collective`` (in place) on ``t`` on the device ``group``'s backend takes, and
    return the result on ``t``'s device."""
    dev = comm_device(group)
    if t.device == dev:
        collective(t)
        return t
    wire = t.to(dev)
    collective(wire)
    return wire.to(t.device)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``t`` all-reduced over ``group`` (default: the world), returned on ``t``'s device.

    ``t`` itself is reduced in place when it is already on the backend's device; otherwise a
    copy crosses and the result is a new tensor. Use the return value."""
    return _crossing(t, group, lambda x: dist.all_reduce(x, op=op, group=group))


def broadcast(t: torch.Tensor, src: int, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``t`` of global rank ``src`` on every rank of ``group``, returned on ``t``'s device (the
    same rule as :func:`all_reduce`: use the return value)."""
    return _crossing(t, group, lambda x: dist.broadcast(x, src=src, group=group))


def all_gather_values(x_N: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Every rank's 1-D ``x_N`` (lengths may differ) concatenated in group-rank order, on
    ``x_N``'s device. The lengths cross as a host count vector, the values padded to the
    longest, on the device the backend takes."""
    world, me = dist.get_world_size(group), dist.get_rank(group)
    counts = torch.zeros(world, dtype=torch.int64)
    counts[me] = x_N.numel()
    counts = all_reduce(counts, group=group).tolist()
    dev, longest = comm_device(group), max(counts)
    wire = torch.zeros(longest, dtype=x_N.dtype, device=dev)
    wire[:x_N.numel()] = x_N.reshape(-1).to(dev)
    parts = [torch.empty_like(wire) for _ in range(world)]
    dist.all_gather(parts, wire, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(x_N.device)


def max_over_world(x: float) -> float:
    """The largest ``x`` of all ranks (every rank calls it at the same point)."""
    return float(all_reduce(torch.tensor([x], dtype=torch.float64), op=dist.ReduceOp.MAX).item())
