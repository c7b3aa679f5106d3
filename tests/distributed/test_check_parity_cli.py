"""tools/check_parity.py as a user runs it: last line ``max_abs_diff=<x>``, exit 0 within the
tolerance, 1 above it, 2 with a clear message for a layout that cannot work."""

import pytest

from launcher import ROOT, torchrun

pytestmark = pytest.mark.distributed
TOOL = ROOT / "tools/check_parity.py"


def _last(proc):
    return proc.stdout.strip().splitlines()[-1]


def test_parity_ok_on_an_hf_dir(tiny_hf_dirs):
    proc = torchrun(TOOL, 2, "--hf-dir", str(tiny_hf_dirs["mixtral"]), "--ep", "2")
    last = _last(proc)
    assert last.startswith("max_abs_diff=") and float(last.split("=")[1]) <= 1e-4, proc.stdout


def test_above_tolerance_exits_1():
    proc = torchrun(TOOL, 2, "--family", "qwen3", "--tp", "2", "--tolerance", "1e-12", check=False)
    assert proc.returncode != 0
    assert "exitcode  : 1" in proc.stderr or "exitcode: 1" in proc.stderr.replace(" ", ""), proc.stderr[-2000:]
    last = _last(proc)
    assert last.startswith("max_abs_diff=") and float(last.split("=")[1]) > 1e-12


def test_impossible_layout_is_a_clear_error():
    proc = torchrun(TOOL, 2, "--family", "qwen3_moe", "--ep", "4", check=False)
    assert proc.returncode != 0
    assert "expert_parallel (4)" in proc.stderr, proc.stderr[-2000:]
