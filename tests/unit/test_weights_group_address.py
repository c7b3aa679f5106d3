"""The distributed weight sync's rendezvous address: engines on other nodes must reach rank 0."""

from moe_rl.weights.config import WeightSyncConfig
from moe_rl.weights.sync import group_address

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
               "SLURM_STEP_NUM_TASKS", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_LOCALID")


def _clear(monkeypatch):
    for k in LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)


def test_explicit_address_wins(monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "node-a")
    assert group_address(WeightSyncConfig(group_address="10.0.0.7")) == "10.0.0.7"


def test_default_is_the_jobs_rendezvous_host(monkeypatch):
    _clear(monkeypatch)
    for k, v in {"RANK": "1", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu-node-017",
                 "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    assert group_address(WeightSyncConfig()) == "gpu-node-017"


def test_single_process_falls_back_to_loopback(monkeypatch):
    _clear(monkeypatch)
    assert group_address(WeightSyncConfig()) == "127.0.0.1"


def test_torchrun_standalone_localhost_stays_ipv4_loopback(monkeypatch):
    _clear(monkeypatch)
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                 "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(k, v)
    assert group_address(WeightSyncConfig()) == "127.0.0.1"


def test_joining_the_group_gives_up_at_its_timeout():
    """Both ends of a rendezvous that never completes fail at ``timeout_s``, naming the address
    and the seconds (torch's store client alone retries past its timeout)."""
    import socket
    import time

    import pytest

    from moe_rl.rollout.broadcast_group import WeightBroadcastGroup

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    for rank, error, text in ((1, TimeoutError, "no store answered within 1s"),
                              (0, RuntimeError, "rank 0 of 2 failed to join (timeout 1s)")):
        t0 = time.monotonic()
        with pytest.raises(error) as e:
            WeightBroadcastGroup("127.0.0.1", port, rank, 2, "g", timeout_s=1.0)
        assert f"'g' at 127.0.0.1:{port}" in str(e.value) and text in str(e.value), str(e.value)
        assert time.monotonic() - t0 < 2.5
