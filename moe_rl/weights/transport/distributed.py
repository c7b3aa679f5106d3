"""Distributed transport: SGLang's weight-update group. Names, dtypes and shapes of a bucket
go by HTTP (``/update_weights_from_distributed``), the tensors by one broadcast each from
the group's rank 0, which is the training job's rank 0.

The calls, as SGLang 0.5.23 takes them (``sglang/srt/managers/io_struct.py``):

- ``/init_weights_update_group {master_address, master_port, rank_offset, world_size,
  group_name, backend}`` to every server at once, while rank 0 joins as rank 0: world size
  ``1 + sum of the servers' TP sizes``, server i's ranks from ``1 + i * tp_size`` (each TP
  rank of a server joins as ``rank_offset + tp_rank``; SGLang refuses data-parallel replicas
  here). The backend is NCCL when the trainer has GPUs, gloo otherwise, and always gloo for
  engines that stage (the embedded one).
- per bucket ``/update_weights_from_distributed {names, dtypes, shapes, group_name,
  load_format}`` (dtype names as torch spells them: "bfloat16"), then with ``load_format:
  "flattened_bucket"`` (``weights.flatten_buckets``, the default) ONE broadcast of a uint8
  tensor holding the bucket's tensors' bytes back to back in ``names`` order
  (:func:`flatten_bucket`, SGLang's ``FlattenedTensorBucket`` layout), otherwise one broadcast
  per tensor. One collective per bucket instead of hundreds: each broadcast has a fixed cost
  (a NCCL launch, a gloo round trip), and the buckets of a MoE hold many small tensors. The
  price is one more bucket's bytes on rank 0 while it broadcasts. The group's store layout is
  SGLang's own (``rollout/broadcast_group.py``).
- ``/destroy_weights_update_group {group_name}`` on close.

The other sender ranks relay their buckets to rank 0 one at a time (point-to-point in the
training job, in plan order), so rank 0 holds at most its own bucket and one received
bucket: no rank ever holds all experts.
"""

from __future__ import annotations

import concurrent.futures as cf
import socket

import torch
import torch.distributed as dist

from moe_rl.parallel.collectives import comm_device
from moe_rl.rollout.broadcast_group import FLATTENED, WeightBroadcastGroup, default_backend
from moe_rl.rollout.client import RolloutClient
from moe_rl.weights import checksum, job
from moe_rl.weights.export import ExportedBucket
from moe_rl.weights.transport import SyncRound, Transport, raise_if_failed
from moe_rl.weights.verify import SyncError, check_replies


def flatten_bucket(tensors: list[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """The bucket as SGLang's receiver takes a ``flattened_bucket``: ``(order, flat)``, the
    tensors' bytes back to back without padding, tensor ``order[0]`` first. The receiver
    refuses a tensor whose byte offset is not a multiple of its dtype's size, so the widest
    dtype goes first (stable otherwise): every offset is then a sum of sizes of elements at
    least as wide, hence aligned."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    return order, torch.cat([tensors[i].contiguous().reshape(-1).view(torch.uint8) for i in order])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class DistributedTransport(Transport):
    name = "distributed"

    def __init__(self, client: RolloutClient, *, address: str, port: int = 0, group_name: str = "moe_rl_weights",
                 engine_ranks: int = 1, timeout_s: float = 300.0, backend: str | None = None,
                 flatten: bool = True) -> None:
        self.client, self.address, self.port, self.flatten = client, address, port, flatten
        self.group_name, self.engine_ranks, self.timeout_s = group_name, engine_ranks, timeout_s
        self.backend = backend or default_backend()
        self.group: WeightBroadcastGroup | None = None

    def setup(self) -> None:
        """Rank 0 and every engine join the group (collective over the job: the others wait)."""
        error = None
        if job.rank() == 0:
            try:
                port = self.port or _free_port()
                world = 1 + self.engine_ranks * len(self.client.servers)
                futs = self.client.init_weights_update_group(self.address, port, gpus_per_server=self.engine_ranks,
                                                             group_name=self.group_name, backend=self.backend)
                try:
                    self.group = WeightBroadcastGroup(self.address, port, 0, world, self.group_name, self.backend,
                                                      timeout_s=self.timeout_s)
                finally:
                    errors = []
                    for f in futs:
                        try:
                            f.result(timeout=self.timeout_s)
                        except Exception as e:  # noqa: BLE001 - each engine's failure is named
                            errors.append(str(e))
                if errors:
                    raise SyncError("; ".join(errors))
            except Exception as e:  # noqa: BLE001 - reported to every rank
                error = f"rank 0: joining the weight-update group {self.group_name!r}: {e}"
                if self.group is not None:
                    self.group.close()
                    self.group = None
        raise_if_failed(error)

    def ship(self, plan, stream, rnd: SyncRound) -> None:
        me = job.rank()
        stream = iter(stream)
        error = None
        if me == 0:
            assert self.group is not None, "setup() was not called"
            for spec in plan.buckets:
                b = next(stream) if spec.sender == 0 else self._receive(spec)
                if error is None:
                    try:
                        self._broadcast(b, rnd)
                        rnd.tensors += len(b.tensors)
                        rnd.bytes += b.nbytes
                    except Exception as e:  # noqa: BLE001 - keep receiving, report at the end
                        error = f"rank 0, bucket {b.index}: {e}"
                del b
            for _ in stream:  # rank 0 sends nothing else; keeps the generator's contract
                raise AssertionError("rank 0 exported a bucket the plan does not list")
        else:
            for b in stream:  # this rank's own buckets, in plan order
                for t in b.tensors:
                    dist.send(t.contiguous(), dst=0)
        raise_if_failed(error)

    @staticmethod
    def _receive(spec) -> ExportedBucket:
        names, tensors = [], []
        device = comm_device()
        for t in spec.tensors:
            buf = torch.empty(t.shape, dtype=getattr(torch, t.dtype), device=device)
            dist.recv(buf, src=spec.sender)
            names.append(t.name)
            tensors.append(buf)
        return ExportedBucket(spec.index, names, tensors)

    def _broadcast(self, b: ExportedBucket, rnd: SyncRound) -> None:
        tensors = [t.detach().to(self.group.device).contiguous() for t in b.tensors]
        sums = checksum.checksums(zip(b.names, [t.cpu() for t in tensors])) if rnd.verify else None
        names, send = b.names, tensors
        if self.flatten:  # announced in the flat buffer's order
            order, flat = flatten_bucket(tensors)
            names, tensors, send = [b.names[i] for i in order], [tensors[i] for i in order], [flat]
        futs = self.client.update_weights_from_distributed(
            names, [str(t.dtype).removeprefix("torch.") for t in tensors], [list(t.shape) for t in tensors],
            group_name=self.group_name, stage_id=rnd.stage_id, checksums=sums,
            load_format=FLATTENED if self.flatten else None)
        fut = futs[0]
        try:  # an engine that refused the announcement will not join the broadcast
            fut.result(timeout=0.05)
        except cf.TimeoutError:
            pass
        self.group.broadcast(send)
        del send
        replies = fut.result(timeout=self.timeout_s)
        if sums is not None:
            check_replies([s.url for s in self.client.servers], replies, sums, f"bucket {b.index}")

    def close(self) -> None:
        if self.group is not None:
            try:
                self.client.destroy_weights_update_group(self.group_name)
            finally:
                self.group.close()
                self.group = None
