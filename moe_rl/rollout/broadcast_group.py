"""The process group SGLang's ``/init_weights_update_group`` builds, for gloo or nccl.

Rank 0 is the trainer; engine ranks are ``rank_offset + local rank``. Weights travel as one
``broadcast`` from rank 0 per tensor, in the order of the ``names`` list of the matching
``/update_weights_from_distributed`` call (SGLang's protocol, with NCCL on GPUs; the
embedded engine uses gloo on CPU). The group is standalone (its own TCPStore + PrefixStore
on ``group_name``), so it does not touch, or need, ``torch.distributed``'s default group.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


class WeightBroadcastGroup:
    """One member of the weight-update group. Every member must construct it concurrently:
    the constructor returns once all ``world_size`` ranks have joined."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 group_name: str = "weight_update_group", backend: str = "gloo",
                 timeout_s: float = 300.0) -> None:
        if backend != "gloo":
            raise ValueError(f"backend {backend!r}: only 'gloo' is available without GPUs")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size={world_size})")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0),
                                   timeout=timeout, wait_for_workers=False)
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore(group_name, self.store), rank, world_size, timeout)
        self.rank = rank
        self.world_size = world_size
        self.group_name = group_name

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Broadcast each tensor from rank 0, in order (in place on the receivers)."""
        works = []
        for t in tensors:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            works.append(self.pg.broadcast([t], opts))
        for w in works:
            w.wait()

    def close(self) -> None:
        """Shut the gloo group down and drop the store (its threads and sockets go with them);
        the object is unusable afterwards. Safe to call twice."""
        pg = self.__dict__.pop("pg", None)
        if pg is not None:
            pg.shutdown()
        self.__dict__.pop("store", None)
