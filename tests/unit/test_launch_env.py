"""Rank, world and rendezvous from the launcher's environment: torchrun, a Slurm job step
(srun without torchrun), or a standalone process. Pure: env dicts in, no process group."""

import pytest

from moe_rl.parallel.launch_env import first_host_in_hostlist, resolve_launch_env

SRUN_TASK = {  # what srun sets for task 5 of 8 on two nodes (4 per node)
    "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NODEID": "1",
    "SLURM_STEP_NODELIST": "gpu-[007-008]", "SLURM_JOB_NODELIST": "gpu-[007-008]",
}
BATCH_SCRIPT = {  # the batch script of an 8-task allocation: no job step
    "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8",
    "SLURM_JOB_NODELIST": "gpu-[007-008]", "SLURM_NODELIST": "gpu-[007-008]",
}


def _hosts(nodelist):  # stands in for scontrol
    assert nodelist == "gpu-[007-008]"
    return "gpu-007"


def test_standalone_is_one_rank():
    le = resolve_launch_env({})
    assert (le.source, le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port) == \
        ("standalone", 0, 1, 0, "127.0.0.1", None)
    assert resolve_launch_env({"MASTER_PORT": "29555"}).master_port == 29555


def test_torchrun_wins_over_slurm():
    env = dict(SRUN_TASK, RANK="3", WORLD_SIZE="16", LOCAL_RANK="3", MASTER_ADDR="n0", MASTER_PORT="29500")
    le = resolve_launch_env(env, first_host=_hosts)
    assert (le.source, le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port) == \
        ("torchrun", 3, 16, 3, "n0", 29500)


def test_torchrun_partial_env_is_refused():
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT are not"):
        resolve_launch_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match=r"RANK \(4\) must be in \[0, WORLD_SIZE=4\)"):
        resolve_launch_env({"RANK": "4", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                            "MASTER_PORT": "1"})


def test_srun_tasks_become_one_world():
    le = resolve_launch_env(dict(SRUN_TASK, MASTER_PORT="29511"), first_host=_hosts)
    assert (le.source, le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port) == \
        ("slurm", 5, 8, 1, "gpu-007", 29511)
    assert le.env_vars() == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu-007",
                             "MASTER_PORT": "29511"}
    # an explicit MASTER_ADDR is kept, the node list is then not read
    le = resolve_launch_env(dict(SRUN_TASK, MASTER_ADDR="10.0.0.9", MASTER_PORT="1"), first_host=None)
    assert le.master_addr == "10.0.0.9"


def test_srun_without_port_or_address_names_what_is_missing():
    with pytest.raises(ValueError, match="8 tasks .*missing MASTER_PORT"):
        resolve_launch_env(SRUN_TASK, first_host=_hosts)
    no_list = {k: v for k, v in SRUN_TASK.items() if "NODELIST" not in k}
    with pytest.raises(ValueError, match="missing MASTER_ADDR .*SLURM_STEP_NODELIST.*; MASTER_PORT"):
        resolve_launch_env(no_list, first_host=_hosts)
    no_proc = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_PROCID"}
    with pytest.raises(ValueError, match="missing SLURM_PROCID"):
        resolve_launch_env(dict(no_proc, MASTER_PORT="1"), first_host=_hosts)


def test_single_task_step_is_standalone():
    one = dict(SRUN_TASK, SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1")
    assert resolve_launch_env(one).source == "standalone"
    assert resolve_launch_env(dict(BATCH_SCRIPT, SLURM_NTASKS="1")).source == "standalone"


def test_batch_script_of_a_multi_task_allocation_is_refused():
    with pytest.raises(ValueError, match=r"SLURM_NTASKS=8 but this process is not a Slurm job step"):
        resolve_launch_env(BATCH_SCRIPT, first_host=_hosts)


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"),
    ("gpu-[007-010,12],cpu1", "gpu-007"),
    ("a[3,1-2]", "a3"),
    ("rack[2-3]-n[01-04]", "rack2-n01"),
    ("cpu1,gpu-[1-2]", "cpu1"),
])
def test_first_host_in_hostlist(nodelist, first):
    assert first_host_in_hostlist(nodelist) == first


def test_init_distributed_refuses_before_starting_anything(monkeypatch):
    import os

    import torch.distributed as dist

    from moe_rl.parallel import groups

    for k in list(os.environ):
        if k.startswith("SLURM_") or k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            monkeypatch.delenv(k)
    for k, v in BATCH_SCRIPT.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="not a Slurm job step"):
        groups.init_distributed()
    assert not dist.is_initialized() and "RANK" not in os.environ
