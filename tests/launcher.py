"""Launch helpers for tests that need several processes (torchrun on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def torchrun(script: str | Path, nproc: int, *args: str, timeout: float = 600,
             check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``script`` under torchrun on 127.0.0.1 with ``nproc`` ranks; with ``check``, a
    non-zero exit fails the test with the launch's output."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1",
               MOE_RL_DIST_TIMEOUT_S="300")
    # --standalone: a private c10d rendezvous on a free local port (port 0 with the static
    # rendezvous is not propagated to the workers and hangs).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", str(script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed (rc={proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def run_layouts(tmp_path: Path, nproc: int, families: dict, layouts: list, checks: list) -> list:
    spec = tmp_path / f"spec{nproc}.json"
    out = tmp_path / f"out{nproc}.json"
    spec.write_text(json.dumps({"families": {k: str(v) for k, v in families.items()},
                                "layouts": layouts, "checks": checks}))
    torchrun(ROOT / "tests/distributed/layouts_worker.py", nproc, str(out), str(spec))
    return json.loads(out.read_text())
