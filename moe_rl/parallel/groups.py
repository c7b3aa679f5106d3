"""Process groups: torch.distributed start-up and Megatron's ``parallel_state``.

This is the only module that touches ``megatron.core.parallel_state`` (a process-global
registry). Everything else receives a :class:`Groups` object, so code below it can be
called with explicit groups and tested without the globals.

Collective semantics: :func:`setup` and :func:`teardown` must be called by every rank of the
world, in the same order.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moe_rl.parallel.dims import ParallelDims
from moe_rl.parallel.launch_env import resolve_launch_env


@dataclass
class Groups:
    """This rank's coordinates and groups for one layout."""

    dims: ParallelDims
    rank: int
    tp_rank: int
    cp_rank: int
    pp_rank: int
    ep_rank: int
    etp_rank: int
    dp_rank: int
    tp_group: Any
    cp_group: Any  # context-parallel group: the ranks that share one sequence
    pp_group: Any
    ep_group: Any
    etp_group: Any
    dp_group: Any  # dense data-parallel group: replicas that see different data (CP peers excluded)
    mp_group: Any  # model-parallel group (TP x PP): the ranks that hold one copy of the model
    pg_collection: Any  # Megatron's ProcessGroupCollection, for modules that take groups explicitly

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.dims.pp - 1


def backend_for_device() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_minutes: float | None = None) -> None:
    """Start torch.distributed from torchrun's environment, a Slurm job step's (``srun``
    without torchrun), or as a 1-rank world when the process is the whole job; anything in
    between is refused (``moe_rl.parallel.launch_env``).

    A collective that waits longer than the timeout fails instead of hanging until the
    walltime (default 10 min; ``MOE_RL_DIST_TIMEOUT_S`` overrides, the tests use 5 min)."""
    if timeout_minutes is None:
        timeout_minutes = float(os.environ.get("MOE_RL_DIST_TIMEOUT_S", 600)) / 60
    if dist.is_initialized():
        return
    launch = resolve_launch_env(os.environ)
    os.environ.update(launch.env_vars())
    if launch.master_port is None:
        os.environ["MASTER_PORT"] = str(_free_port())
    backend = backend_for_device()
    if backend == "nccl":
        torch.cuda.set_device(launch.local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(dims: ParallelDims, *, seed: int = 1234) -> Groups:
    """Create Megatron's model-parallel groups for ``dims`` and seed the model-parallel RNG.

    Call on every rank after :func:`init_distributed`. Calling it again with another layout
    first tears the previous one down (several layouts can run in one launch).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if dims.world_size != dist.get_world_size():
        raise ValueError(f"layout {dims.describe()} needs {dims.world_size} ranks, "
                         f"the job has {dist.get_world_size()}")
    if ps.model_parallel_is_initialized():
        teardown()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp,
        virtual_pipeline_model_parallel_size=dims.vpp if dims.vpp > 1 else None,
        context_parallel_size=dims.cp,
        expert_model_parallel_size=dims.ep,
        expert_tensor_parallel_size=dims.etp,
        create_gloo_process_groups=backend_for_device() != "gloo",
    )
    model_parallel_cuda_manual_seed(seed)
    return Groups(
        dims=dims,
        rank=dist.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        cp_group=ps.get_context_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        ep_group=ps.get_expert_model_parallel_group(),
        etp_group=ps.get_expert_tensor_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def teardown() -> None:
    """Destroy the model-parallel groups and Megatron's process-global MoE replay registry."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.router_replay import RouterReplay

    # Megatron's destroy_model_parallel only drops its references: the communicators (and,
    # on gloo, their threads — measured: 4,000 per process after 50 set-ups, the machine then
    # spends its time in the kernel) stay alive. Destroy every group it created.
    seen: set[int] = set()
    destroyed: list = []
    for name, value in list(vars(ps).items()):
        groups = list(_process_groups(value))
        for group in groups:
            if id(group) not in seen and group is not dist.GroupMember.WORLD:
                seen.add(id(group))
                destroyed.append(group)
                try:
                    dist.destroy_process_group(group)
                except (ValueError, RuntimeError):
                    pass  # not a group of this rank, or already gone
        if groups:
            # destroy_model_parallel forgets a few (e.g. _INTRA_PARTIAL_DATA_PARALLEL_GROUP_WITH_CP).
            setattr(ps, name, None)
    ps.destroy_model_parallel()
    RouterReplay.clear_global_router_replay_instances()
    _clear_megatron_caches()
    # Models and optimizers of the old layout hold the groups in reference cycles: collect
    # them now so the communicators (and gloo's threads) go with them.
    gc.collect()
    _free_in_parallel(destroyed)


def _free_in_parallel(groups: list) -> None:
    """Drop our references to destroyed groups, each in a thread of its own. Freeing a gloo
    group waits for its transport's event loop, which wakes every 10 ms: one after another,
    the ~20 groups of a layout took 0.15 s (measured), in parallel about 0.01 s. A group that
    something else still references is freed later, where that reference goes."""
    import threading

    boxes = [[g] for g in groups]
    groups.clear()
    threads = [threading.Thread(target=box.clear, name="moe_rl-free-group") for box in boxes]
    del boxes
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _clear_megatron_caches() -> None:
    """Empty Megatron's ``functools.lru_cache``s: a cached method holds its ``self`` (e.g.
    ``RotaryEmbedding.forward``), which keeps a finished model's module and its process
    group alive."""
    import functools
    import sys

    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("megatron.") or mod is None:
            continue
        for obj in list(vars(mod).values()):
            candidates = [obj]
            if isinstance(obj, type) and obj.__module__ == mod_name:
                candidates += list(vars(obj).values())
            for c in candidates:
                if isinstance(c, functools._lru_cache_wrapper):
                    c.cache_clear()


def _process_groups(value):
    if isinstance(value, dist.ProcessGroup):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _process_groups(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _process_groups(v)


def pipeline_first_last_ranks(groups: Groups) -> tuple[int, int]:
    """Global ranks of the first and last pipeline stage in this rank's pipeline."""
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_first_rank(), ps.get_pipeline_model_parallel_last_rank()
