"""The export stream: execute an :class:`~moe_rl.weights.plan.ExportPlan` on the live sharded
model and yield HF-named buckets, one at a time.

Parallel semantics: every rank of the training job iterates the plan's buckets in the same
order and takes part in those it is involved in: a TP (ETP) shard holder gives its shard to
the gather in its TP (ETP) group, the bucket's sender assembles the HF tensors and receives
the bucket from the generator. Ranks that hold nothing of a bucket skip it; the other
data-parallel replicas skip everything. Collectives are issued in plan order on every rank,
so two groups that share ranks never wait on each other.

Memory: a bucket is built only when the consumer asks for the next one, and the consumer
holds the previous one until then: at most two buckets per rank beyond the model itself
(gathered shards are released as soon as an item is assembled). A tensor that needs no
gather and no transform (a replicated norm, an expert weight at ETP 1) is a view of the
parameter, not a copy; transports serialize or broadcast it while training is paused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from moe_rl.models.param_map import unshard
from moe_rl.weights.plan import ExportPlan, Item, coords


@dataclass(eq=False)
class ExportedBucket:
    """What a sender ships: HF names and tensors, in plan order."""

    index: int  # the plan's bucket index
    names: list[str]
    tensors: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def named(self) -> list[tuple[str, torch.Tensor]]:
        return list(zip(self.names, self.tensors))


def assemble(item: Item, shards: list[torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The HF tensors of ``item`` from its shards (in shard order): unshard, trim the
    vocabulary padding, split fused tensors, cast to the plan's dtype. Pure; every result is
    contiguous (a view of the shard when nothing had to change)."""
    full = unshard(shards, item.entry, partition_dim=item.partition_dim)
    assert tuple(full.shape) == item.shape, (item.mcore, tuple(full.shape), item.shape)
    out = []
    for spec, (name, t) in zip(item.hf, item.entry.to_hf(full, item.vocab_rows).items()):
        assert name == spec.name and tuple(t.shape) == spec.shape, (name, tuple(t.shape), spec.shape)
        out.append((name, t.to(getattr(torch, spec.dtype)).contiguous()))
    return out


def _group(item: Item, groups):
    return groups.etp_group if item.group == "etp" else groups.tp_group


def _live_partition(t: torch.Tensor) -> int | None:
    return t.partition_dim if getattr(t, "tensor_model_parallel", False) else None


def check_layout(plan: ExportPlan, built, groups) -> None:
    """The plan's idea of this rank (coordinates, layer and expert offsets) is the live one's."""
    c = coords(plan.dims, groups.rank)
    live = (groups.tp_rank, groups.cp_rank, groups.dp_rank, groups.pp_rank, groups.etp_rank, groups.ep_rank)
    assert (c.tp, c.cp, c.dp, c.pp, c.etp, c.ep) == live, (
        f"rank {groups.rank}: plan coordinates {c} differ from Megatron's {live}")
    if plan.dims != groups.dims:
        raise ValueError(f"the plan is for {plan.dims.describe()}, the model runs at {groups.dims.describe()}")


@torch.no_grad()
def export_buckets(plan: ExportPlan, built, groups) -> Iterator[ExportedBucket]:
    """Execute ``plan`` on this rank's part of the model; yields the buckets this rank sends.

    Every rank of the job must iterate the generator to the end (it takes part in the
    gathers of buckets it does not send). ``built`` is the ``BuiltModel`` of this rank."""
    check_layout(plan, built, groups)
    rank = groups.rank
    params = {(c, name): t for c, chunk in enumerate(built.chunks)
              for name, t in chunk.state_dict(keep_vars=True).items() if not name.endswith("_extra_state")}
    for bucket in plan.buckets:
        if not plan.involves(rank, bucket):
            continue
        mine = bucket.sender == rank
        named: list[tuple[str, torch.Tensor]] = []
        for item in bucket.items:
            if rank not in item.sources:
                continue
            t = params.get((item.chunk, item.local_name))
            if t is None:
                raise KeyError(f"rank {rank}: the plan reads {item.local_name} of model chunk {item.chunk} "
                               f"(canonical {item.mcore}), which this rank's model does not have")
            group_size = groups.dims.etp if item.group == "etp" else groups.dims.tp
            if group_size > 1:
                assert _live_partition(t) == item.partition_dim, (
                    f"{item.mcore}: Megatron splits it on dim {_live_partition(t)} over {group_size} ranks, "
                    f"the plan on {item.partition_dim}")
            t = t.detach()  # (drops Megatron's attributes: read them first)
            shards = _gather(t, item, groups, mine)
            if mine:
                named += assemble(item, shards)
            del shards
        if mine:
            yield ExportedBucket(bucket.index, [n for n, _ in named], [t for _, t in named])
        del named


def _gather(t: torch.Tensor, item: Item, groups, to_me: bool) -> list[torch.Tensor]:
    """Every shard of ``item`` on its sender (in shard order); [] elsewhere."""
    if len(item.sources) == 1:
        return [t]
    t = t.contiguous()
    out = [torch.empty_like(t) for _ in item.sources] if to_me else None
    dist.gather(t, out, dst=item.sources[0], group=_group(item, groups))
    return out or []


def buckets_from_hf(plan: ExportPlan, get) -> Iterator[ExportedBucket]:
    """The buckets of a one-rank ``plan`` straight from HF tensors (``get(name)``), no model:
    push a checkpoint into the engines through the same transports and checks."""
    if plan.dims.world_size != 1:
        raise ValueError(f"buckets_from_hf needs a one-rank plan, not {plan.dims.describe()}")
    for bucket in plan.buckets:
        named = [(t.name, get(t.name).to(getattr(torch, t.dtype)).contiguous()) for t in bucket.tensors]
        for (name, t), spec in zip(named, bucket.tensors):
            if tuple(t.shape) != spec.shape:
                raise ValueError(f"{name}: shape {tuple(t.shape)}, the plan expects {spec.shape}")
        yield ExportedBucket(bucket.index, [n for n, _ in named], [t for _, t in named])
