"""The process group SGLang's ``/init_weights_update_group`` builds, for gloo (CPU) or NCCL (GPUs).

Rank 0 is the trainer; an engine's ranks are ``rank_offset + its TP rank``. Weights travel as
one ``broadcast`` from rank 0 per tensor, in the order of the ``names`` list of the matching
``/update_weights_from_distributed`` call (SGLang 0.5.23's default ``load_format``).

Interoperating with a real SGLang means building the same group it builds, key for key: it
calls ``init_custom_process_group(backend, init_method="tcp://<address>:<port>", world_size,
rank, group_name)`` (``sglang/srt/utils/common.py``), which

1. rendezvouses on a ``TCPStore`` at ``address:port`` hosted by rank 0;
2. wraps it in ``PrefixStore(group_name)``;
3. builds the backend through torch's ``_new_process_group_helper``, which nests two more
   prefixes, ``"<group_name>/"`` and the device's (``"cpu/"`` for gloo, ``"cuda/"`` for NCCL).

:class:`WeightBroadcastGroup` makes that store chain explicitly and constructs the backend
itself, so the group is standalone: it does not touch, or need, ``torch.distributed``'s
default group or its registry of groups (the trainer's rank 0 already has a default group,
the embedded engine has none), and a ``TORCHELASTIC_USE_AGENT_STORE`` set by torchrun cannot
turn rank 0 into a store client. ``tests/http/test_sglang_weight_group.py`` joins it with
SGLang's own ``init_custom_process_group`` and receives the weights with SGLang's own
receive code.
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

BACKEND_DEVICE = {"gloo": "cpu", "nccl": "cuda"}  # the first device torch's helper registers


def default_backend() -> str:
    """NCCL where the trainer has GPUs (an SGLang on GPUs receives into GPU memory), else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


class WeightBroadcastGroup:
    """One member of the weight-update group. Every member must construct it concurrently:
    the constructor returns once all ``world_size`` ranks have joined (gloo connects at once;
    NCCL connects at the first broadcast)."""

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 group_name: str = "weight_update_group", backend: str = "gloo",
                 timeout_s: float = 300.0) -> None:
        if backend not in BACKEND_DEVICE:
            raise ValueError(f"backend {backend!r} must be one of {sorted(BACKEND_DEVICE)}")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs a GPU; without GPUs the group is gloo")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank ({rank}) must be in [0, world_size={world_size})")
        if not group_name:
            raise ValueError("group_name must not be empty (SGLang refuses it)")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0),
                                   timeout=timeout, wait_for_workers=False, multi_tenant=True)
        store = dist.PrefixStore(group_name, self.store)
        store = dist.PrefixStore(f"{BACKEND_DEVICE[backend]}/", dist.PrefixStore(f"{group_name}/", store))
        if backend == "gloo":
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        else:
            opts = dist.ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = False
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        self.rank, self.world_size, self.group_name, self.backend = rank, world_size, group_name, backend

    @property
    def device(self) -> torch.device:
        """Where the tensors of a broadcast must be (CUDA for NCCL)."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def broadcast(self, tensors: list[torch.Tensor]) -> None:
        """Broadcast each tensor from rank 0, in order (in place on the receivers)."""
        works = []
        for t in tensors:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            opts.rootTensor = 0
            works.append(self.pg.broadcast([t], opts))
        for w in works:
            w.wait()

    def close(self) -> None:
        """Shut the group down and drop the store (its threads and sockets go with them);
        the object is unusable afterwards. Safe to call twice."""
        pg = self.__dict__.pop("pg", None)
        if pg is not None:
            pg.shutdown()
        self.__dict__.pop("store", None)
