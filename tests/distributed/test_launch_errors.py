"""``moe_rl.launch`` as a user runs it: bad data found once the ranks have started (the prompts
load after the process group, before the model is built) is a config error on every rank
(exit 2, one message), not a traceback per rank."""

from __future__ import annotations

import pytest

from launcher import ROOT, torchrun

pytestmark = pytest.mark.distributed


def test_a_malformed_data_file_is_a_config_error_before_the_model_is_built(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "fine", "answer": "1"}\n{"prompt": "broken\n')
    proc = torchrun(ROOT / "moe_rl/launch.py", 2, str(ROOT / "launch/configs/quickstart.yaml"),
                    f"data.path={data}", f"output_dir={tmp_path / 'run'}", "metrics.progress=false",
                    check=False, timeout=180)
    err = proc.stderr
    assert proc.returncode != 0
    assert err.count(f"config error: data.path: '{data}' line 2 is not valid JSON") == 1, err[-3000:]
    assert "exitcode:2" in err.replace(" ", "") and "Traceback" not in err.split("config error")[0], err[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()
