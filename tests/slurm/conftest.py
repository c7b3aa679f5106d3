"""The local two-node Slurm cluster (tests/slurm/cluster.py) for the whole suite.

MOE_RL_SKIP_SLURM=1 skips the suite; MOE_RL_SLURM_REQUIRED=1 (tests/run.sh sets it) turns
"this machine cannot run it" into a failure instead of a skip. MOE_RL_SLURM_MODE=multi forces
the two-slurmd mode (default: network namespaces, falling back to two slurmd)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cluster import Cluster, Unavailable  # noqa: E402


@pytest.fixture(scope="session")
def cluster():
    if os.environ.get("MOE_RL_SKIP_SLURM") == "1":
        pytest.skip("MOE_RL_SKIP_SLURM=1")
    c = Cluster(mode=os.environ.get("MOE_RL_SLURM_MODE", "auto"), log=lambda m: print(f"[slurm-harness] {m}",
                                                                                      file=sys.stderr, flush=True))
    try:
        c.up()
    except Unavailable as e:
        if os.environ.get("MOE_RL_SLURM_REQUIRED") == "1":
            pytest.fail(f"the local Slurm cluster cannot run here: {e}")
        pytest.skip(f"the local Slurm cluster cannot run here: {e}")
    try:
        yield c
    finally:
        c.down()
