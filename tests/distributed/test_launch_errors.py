"""``moe_rl.launch`` as a user runs it: bad data found once the ranks have started (the prompts
load after the process group, before the model is built) is a config error on every rank
(exit 2, one message), not a traceback per rank."""

from __future__ import annotations

import os

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


def test_sigusr1_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    """A time limit ahead (Slurm's ``--signal=B:USR1@N``, forwarded to the ranks): SIGUSR1 to ONE
    rank mid-run makes every rank finish the step, save a checkpoint after it and exit 5; the
    same command then resumes from that checkpoint and runs the remaining steps, each logged
    once."""
    import json
    import signal
    import threading
    import time

    from launcher import _children, finish, start_torchrun

    run = tmp_path / "run"
    args = [str(ROOT / "launch/configs/quickstart.yaml"), "train.steps=8", "checkpoint.interval=0",
            "loop.rollout_batch_size=64", "train.global_batch=64", "train.micro_batch=32",
            f"output_dir={run}", "metrics.progress=false"]
    proc = start_torchrun(ROOT / "moe_rl/launch.py", 2, *args)
    done: list = []
    waiter = threading.Thread(target=lambda: done.append(finish(proc, timeout=300, check=False)))
    waiter.start()
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and waiter.is_alive():
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    assert waiter.is_alive(), done[0].stderr[-3000:]
    ranks = [p for p in _children(proc.pid) if "moe_rl/launch.py" in open(f"/proc/{p}/cmdline").read()]
    assert len(ranks) == 2, ranks
    os.kill(ranks[1], signal.SIGUSR1)  # one rank only: the others learn it at the step's end
    waiter.join()
    p = done[0]
    err = p.stderr
    assert p.returncode != 0 and "exitcode:5" in err.replace(" ", ""), err[-3000:]
    steps = [json.loads(line)["policy_version"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(len(steps))) and 2 <= len(steps) < 8, steps
    saved = run / "checkpoints" / f"step_{len(steps):08d}"
    assert err.count(f"SIGUSR1: saved checkpoint {saved} (next step {len(steps)})") == 1, err[-3000:]
    assert sorted(x.name for x in (run / "checkpoints").iterdir() if x.name.startswith("step_")) == [saved.name]
    p = finish(start_torchrun(ROOT / "moe_rl/launch.py", 2, *args), timeout=300)
    assert f"resumed from {saved}" in p.stderr, p.stderr[-3000:]
    steps = [json.loads(line)["policy_version"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(8)), steps
