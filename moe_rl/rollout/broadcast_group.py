"""The process group SGLang's ``/init_weights_update_group`` builds, for gloo (CPU) or NCCL (GPUs).

Rank 0 is the trainer; an engine's ranks are ``rank_offset + its TP rank``. Weights travel as
one ``broadcast`` from rank 0 per tensor, in the order of the ``names`` list of the matching
``/update_weights_from_distributed`` call (SGLang 0.5.23's default ``load_format``), or, with
``load_format: "flattened_bucket"``, as one broadcast of the whole bucket packed into a uint8
tensor (the receiver lays it out; see ``rollout/embedded/weights_api.py``).

Joining is bounded by ``timeout_s`` as a whole: a member other than rank 0 first waits (by
plain connects) until rank 0's store listens, then gives the store and the backend's
rendezvous only the time that is left. torch's own store client would retry past its timeout
(a closed port took about twice the timeout to fail). A group whose members fell out of step
(a failed broadcast, or one a member did not take part in) is :meth:`~WeightBroadcastGroup.mark_broken`.

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
import socket
import time

import torch
import torch.distributed as dist

FLATTENED = "flattened_bucket"  # SGLang's load_format of one broadcast per bucket (sender and receiver)
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
        self.timeout = datetime.timedelta(seconds=timeout_s)  # of each broadcast
        self.broken: str | None = None  # why the group can no longer be used (mark_broken)
        where = f"weight-update group {group_name!r} at {master_address}:{master_port}"
        deadline = time.monotonic() + timeout_s
        if rank != 0:
            _wait_until_listening(master_address, int(master_port), deadline, f"{where}: no store answered "
                                  f"within {timeout_s:g}s")
        try:
            self.store = dist.TCPStore(master_address, int(master_port), world_size, is_master=(rank == 0),
                                       timeout=_left(deadline), wait_for_workers=False, multi_tenant=True)
            store = dist.PrefixStore(group_name, self.store)
            store = dist.PrefixStore(f"{BACKEND_DEVICE[backend]}/", dist.PrefixStore(f"{group_name}/", store))
            if backend == "gloo":  # joins here: all members must connect before the deadline
                self.pg = dist.ProcessGroupGloo(store, rank, world_size, _left(deadline))
            else:  # joins at the first broadcast
                opts = dist.ProcessGroupNCCL.Options()
                opts.is_high_priority_stream = False
                opts._timeout = self.timeout
                self.pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        except Exception as e:
            self.close()
            raise RuntimeError(f"{where}: rank {rank} of {world_size} failed to join (timeout {timeout_s:g}s): "
                               f"{error_text(e)}") from e
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
            opts.timeout = self.timeout  # the backend's own may be shorter: the join's time left
            works.append(self.pg.broadcast([t], opts))
        for w in works:
            w.wait()

    def mark_broken(self, reason: str) -> None:
        """Record why the members are out of step and close the group. After a broadcast that
        failed, or one that rank 0 sent and this member did not receive, the next broadcast
        would pair with the wrong one (or hang), so the group can only be rebuilt; closing it
        at once makes a peer's pending broadcast fail fast ("Connection closed by peer")
        instead of waiting for its timeout. The first reason is kept."""
        if self.broken is None:
            self.broken = reason
        self.close()

    def close(self) -> None:
        """Shut the group down and drop the store (its threads and sockets go with them);
        the object is unusable afterwards. Safe to call twice."""
        pg = self.__dict__.pop("pg", None)
        if pg is not None:
            pg.shutdown()
        self.__dict__.pop("store", None)


def _left(deadline: float) -> datetime.timedelta:
    """The time left until ``deadline``; at least 1 ms, so that a late step fails by its own timeout."""
    return datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001))


def error_text(e: BaseException) -> str:
    """``Type: message`` of an error, cut to its first line: torch's distributed errors append
    a C++ stack trace."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _wait_until_listening(address: str, port: int, deadline: float, message: str) -> None:
    """Connect and disconnect until ``address:port`` accepts, else ``TimeoutError(message)``
    at ``deadline``. The store's server takes a connection that closes unused in its stride."""
    last = ""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{message} (last error: {last})")
        try:
            with socket.create_connection((address, port), timeout=min(left, 5.0)):
                return
        except OSError as e:
            last = f"{type(e).__name__}: {e}"
        time.sleep(min(0.1, max(deadline - time.monotonic(), 0.0)))
