"""Who this process is in the job: rank, world size, local rank and the rendezvous address,
read from torchrun's or Slurm's environment. Pure: a function of an environment mapping.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. ``srun`` without
torchrun starts one process per task and sets SLURM_PROCID, SLURM_LOCALID and
SLURM_STEP_NUM_TASKS instead; read as "no RANK, so one rank", N tasks would each train a
1-rank copy of the model. So the Slurm variables are translated, and anything ambiguous is
refused with the variables it lacks named. Only a process that is the whole job (no torchrun
variables, and not one task of several under Slurm) becomes a 1-rank world.

A Slurm batch script (or an ``salloc`` shell) runs once, outside any job step, yet carries
the allocation's SLURM_NTASKS: a python started there directly is refused when that is > 1
instead of waiting for ranks that never come.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_STEP_MARKERS = ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS")
_NODELISTS = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


@dataclass(frozen=True)
class LaunchEnv:
    source: str  # torchrun | slurm | standalone
    rank: int  # global rank of this process
    world_size: int  # processes in the job
    local_rank: int  # index of this process on its node (its GPU)
    master_addr: str  # host of rank 0, where the rendezvous listens
    master_port: Optional[int]  # rendezvous port; None: standalone, any free local port

    def env_vars(self) -> dict[str, str]:
        """The torch.distributed ``env://`` variables (MASTER_PORT only when known)."""
        out = {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
               "LOCAL_RANK": str(self.local_rank), "MASTER_ADDR": self.master_addr}
        if self.master_port is not None:
            out["MASTER_PORT"] = str(self.master_port)
        return out


def resolve_launch_env(env: Mapping[str, str], *,
                       first_host: Optional[Callable[[str], str]] = None) -> LaunchEnv:
    """Decide rank, world and rendezvous from ``env``; ValueError naming what is missing.

    Precedence: torchrun's variables (``RANK`` set), then a Slurm job step with more than
    one task, then a standalone 1-rank world. ``first_host`` maps a Slurm node list to its
    first host name (default: ``scontrol show hostnames``, else our own parse)."""
    if "RANK" in env:
        return _from_torchrun(env)
    in_step = any(k in env for k in _STEP_MARKERS)
    ntasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    ntasks = _int(env, ntasks_var) if ntasks_var in env else 1
    if ntasks > 1 and not in_step:
        raise ValueError(
            f"SLURM_NTASKS={ntasks} but this process is not a Slurm job step (no SLURM_STEP_ID): "
            "it is the batch script or salloc shell, one process of a multi-task allocation. "
            "Start the ranks with `srun python ...` or torchrun")
    if ntasks > 1:
        return _from_slurm(env, ntasks_var, ntasks, first_host or first_host_of)
    return LaunchEnv("standalone", 0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                     _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None)


def _from_torchrun(env: Mapping[str, str]) -> LaunchEnv:
    missing = [k for k in ("WORLD_SIZE", "LOCAL_RANK") if k not in env]
    world = _int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else None
    if world is not None and world > 1:
        missing += [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ValueError(f"RANK is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                         f"not: set all of {', '.join(_TORCHRUN)} (torchrun does)")
    rank, local = _int(env, "RANK"), _int(env, "LOCAL_RANK")
    _check_rank(rank, world, "RANK", "WORLD_SIZE")
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
    return LaunchEnv("torchrun", rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), port)


def _from_slurm(env: Mapping[str, str], ntasks_var: str, world: int,
                first_host: Callable[[str], str]) -> LaunchEnv:
    missing = [k for k in ("SLURM_PROCID", "SLURM_LOCALID") if k not in env]
    nodelist_var = next((k for k in _NODELISTS if env.get(k)), None)
    if "MASTER_ADDR" not in env and nodelist_var is None:
        missing.append(f"MASTER_ADDR (or one of {', '.join(_NODELISTS)})")
    if "MASTER_PORT" not in env:
        # Every task must agree on the port and none can pick it alone.
        missing.append("MASTER_PORT (e.g. export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)))")
    if missing:
        raise ValueError(f"Slurm job step of {world} tasks ({ntasks_var}) without torchrun: "
                         f"missing {'; '.join(missing)}")
    rank, local = _int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID")
    _check_rank(rank, world, "SLURM_PROCID", ntasks_var)
    addr = env["MASTER_ADDR"] if "MASTER_ADDR" in env else first_host(env[nodelist_var])
    return LaunchEnv("slurm", rank, world, local, addr, _int(env, "MASTER_PORT"))


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"{key}={env[key]!r} is not an integer") from None


def _check_rank(rank: int, world: int, rank_var: str, world_var: str) -> None:
    if world < 1:
        raise ValueError(f"{world_var} ({world}) must be >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"{rank_var} ({rank}) must be in [0, {world_var}={world})")


def first_host_of(nodelist: str) -> str:
    """First host of a Slurm node list: ``scontrol show hostnames`` when it is installed (it
    knows every syntax), else :func:`first_host_in_hostlist`."""
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return first_host_in_hostlist(nodelist)


def first_host_in_hostlist(nodelist: str) -> str:
    """``gpu-[007-010,12],cpu1`` -> ``gpu-007``: the first entry of the first item, each
    bracket replaced by its first value (zero padding kept)."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    item, out, i = nodelist[:end].strip(), [], 0
    while i < len(item):
        if item[i] == "[":
            j = item.find("]", i)
            if j < 0:
                raise ValueError(f"unbalanced '[' in Slurm node list {nodelist!r}")
            out.append(item[i + 1:j].split(",")[0].split("-")[0])
            i = j + 1
        else:
            out.append(item[i])
            i += 1
    host = "".join(out)
    if not host:
        raise ValueError(f"no host in Slurm node list {nodelist!r}")
    return host
