"""Which rollout servers a run uses, and what it checks before starting them
(``moe_rl/rollout/http_rollout.py``): the SGLang layout the weight sync must follow, and a
clear error when the interpreter that would launch SGLang has no sglang package."""

from __future__ import annotations

import os
import sys

import pytest

from moe_rl.config import load_config
from moe_rl.config.run import RunConfig
from moe_rl.rollout.http_rollout import check_sglang_installed, weight_sync_config


def cfg(*overrides):
    return load_config(RunConfig, None, list(overrides))


def test_sglang_engine_ranks_are_its_tp_size():
    assert weight_sync_config(cfg("rollout.backend=sglang", "rollout.sglang.tp_size=4")).engine_ranks == 4
    assert weight_sync_config(cfg("rollout.backend=sglang", "rollout.sglang.tp_size=4",
                                  "weights.engine_ranks=4")).engine_ranks == 4
    assert weight_sync_config(cfg("weights.engine_ranks=1")).engine_ranks == 1  # embedded: unchanged


@pytest.mark.parametrize("overrides, msg", [
    (["rollout.sglang.tp_size=4", "weights.engine_ranks=2"], "weights.engine_ranks (2) must equal rollout.sglang.tp_size (4)"),
    (["rollout.sglang.dp_size=2", "weights.transport=distributed"], "rollout.sglang.dp_size (2) > 1"),
])
def test_sglang_layouts_the_weight_sync_cannot_serve(overrides, msg):
    with pytest.raises(ValueError) as e:
        weight_sync_config(cfg("rollout.backend=sglang", *overrides))
    assert msg in str(e.value)


def test_dp_replicas_are_fine_for_the_tensor_transport():
    c = cfg("rollout.backend=sglang", "rollout.sglang.dp_size=2", "weights.transport=tensor")
    assert weight_sync_config(c).engine_ranks == 1


def test_missing_sglang_is_a_clear_error(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexec %s -I -S \"$@\"\n" % sys.executable)  # no site-packages: no sglang
    fake.chmod(0o755)
    with pytest.raises(ValueError) as e:
        check_sglang_installed(str(fake))
    assert "has no sglang package" in str(e.value) and str(fake) in str(e.value)
    with pytest.raises(ValueError, match="cannot be run"):
        check_sglang_installed(str(tmp_path / "no-such-python"))


def test_an_interpreter_with_sglang_passes():
    import importlib.util

    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not installed here")
    check_sglang_installed(sys.executable)


def test_preflight_stops_a_sglang_run_without_sglang(tmp_path, monkeypatch, capsys):
    """``python -m moe_rl.launch`` exits 2 before building anything."""
    from moe_rl import launch

    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("WORLD_SIZE", "1")
    rc = launch.main([f"output_dir={tmp_path / 'run'}", "rollout.backend=sglang",
                      f"rollout.sglang.python={fake}", "data.toy_task=max_digit"])
    assert rc == 2
    assert "has no sglang package" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
