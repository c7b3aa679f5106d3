"""launch/quickstart.py refuses a config it would not honour, before starting anything."""

import subprocess
import sys

import pytest

from launcher import ROOT


@pytest.mark.parametrize("override, message", [
    ("algorithm.preset=dapo", "algorithm.* is not used by the quickstart"),
    ("optim.learning_rate=0.1", "learning_rate"),
    ("model.params_dtype=float16", "params_dtype"),
])
def test_quickstart_refuses_what_it_would_ignore(override, message):
    proc = subprocess.run([sys.executable, "launch/quickstart.py", "launch/configs/quickstart.yaml", override],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert message in proc.stderr, proc.stderr[-2000:]
