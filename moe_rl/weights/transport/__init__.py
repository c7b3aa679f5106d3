"""Transports: how buckets reach the engines, one per SGLang update call.

``disk`` (``/update_weights_from_disk``), ``tensor`` (``/update_weights_from_tensor``) and
``distributed`` (``/init_weights_update_group`` + ``/update_weights_from_distributed``).

Parallel semantics of :meth:`Transport.ship`: every rank of the job calls it with the same
plan and its own export stream (iterating it is what takes part in the stream's gathers);
the sender ranks ship their buckets. A
rank whose sending fails keeps draining the stream (its gathers keep the other ranks in
step) and ships nothing more; then every rank raises the same :class:`SyncError`, naming
the rank, the bucket and the engine.

Buckets never carry the weight version: the commit (or, for engines that cannot stage, a
final ``/update_weight_version``) sets it once every bucket has arrived.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Iterator

from moe_rl.weights import job
from moe_rl.weights.export import ExportedBucket
from moe_rl.weights.verify import SyncError


@dataclasses.dataclass
class SyncRound:
    """One sync, as the transports see it."""

    version: str  # the weight version being shipped
    stage_id: str | None  # engines hold the buckets until the commit (None: applied on arrival)
    verify: bool  # send per-tensor checksums and check the engines' reports
    tensors: int = 0  # HF tensors this rank shipped
    bytes: int = 0  # their bytes


class Transport:
    name = ""

    def setup(self) -> None:
        """Once, on every rank, before the first sync."""

    def ship(self, plan, stream: Iterator[ExportedBucket], rnd: SyncRound) -> None:
        """Ship ``stream`` (this rank's buckets of ``plan``, in plan order)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what :meth:`setup` made (every rank)."""


def drain(buckets: Iterable[ExportedBucket], send: Callable[[ExportedBucket], None], rnd: SyncRound) -> str | None:
    """Send every bucket; after a failure keep iterating (the collectives of the stream must
    run on every rank) without sending. Returns this rank's error, if any."""
    error = None
    for b in buckets:
        if error is not None:
            continue
        try:
            send(b)
            rnd.tensors += len(b.tensors)
            rnd.bytes += b.nbytes
        except Exception as e:  # noqa: BLE001 - reported to every rank as a SyncError
            error = f"rank {job.rank()}, bucket {b.index}: {e}"
    return error


def raise_if_failed(error: str | None) -> None:
    """Collective: raise the joined errors of all ranks on every rank."""
    joined = job.first_error(error)
    if joined:
        raise SyncError(f"weight sync failed: {joined}")
