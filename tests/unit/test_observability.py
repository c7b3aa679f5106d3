"""Metric writer, timers, GPU stats: JSONL and real tensorboard event files, resume truncation."""

from __future__ import annotations

import json
import math
import time

from moe_rl.observability import MetricsConfig, MetricWriter, StageTimer
from moe_rl.observability.gpu import gpu_stats
from moe_rl.observability.writer import read_metrics


def _tb_scalars(tb_dir):
    """(tag, step, value) of every scalar in the event files, read by tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_jsonl_and_tensorboard_hold_every_step(tmp_path):
    cfg = MetricsConfig(progress=False)
    with MetricWriter(str(tmp_path), cfg) as w:
        for s in range(3):
            w.write({"step": s, "rollout/reward_mean": 0.25 * s, "actor/pg_loss": -0.1 * s, "note": "text"})
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in recs] == [0, 1, 2]
    assert recs[2]["rollout/reward_mean"] == 0.5 and recs[2]["note"] == "text"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    sc = _tb_scalars(tmp_path / "tb")
    assert sc["rollout/reward_mean"] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert "note" not in sc and "step" not in sc


def test_resume_drops_the_steps_that_run_again(tmp_path):
    cfg = MetricsConfig(progress=False)
    with MetricWriter(str(tmp_path), cfg) as w:
        for s in range(4):
            w.write({"step": s, "x": float(s)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "x": 4.')  # torn by a kill mid-write
    with MetricWriter(str(tmp_path), cfg, start_step=2) as w:
        for s in range(2, 4):
            w.write({"step": s, "x": 10.0 + s})
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["x"]) for r in recs] == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0)]
    assert _tb_scalars(tmp_path / "tb")["x"] == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0)]


def test_disabled_writer_touches_nothing(tmp_path):
    w = MetricWriter(str(tmp_path / "out"), MetricsConfig(), enabled=False)
    w.write({"step": 0, "x": 1.0})
    w.close()
    assert not (tmp_path / "out").exists()


def test_wandb_asked_but_absent_is_reported_not_fatal(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with MetricWriter(str(tmp_path), MetricsConfig(wandb=True, tensorboard=False)) as w:
        w.write({"step": 0, "x": 1.0})
    assert "wandb package is not installed" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["x"] == 1.0


def test_stage_timer_names_and_accumulates():
    t = StageTimer()
    with t("rollout"):
        time.sleep(0.02)
    with t("rollout"):
        time.sleep(0.01)
    with t("train"):
        pass
    m = t.metrics()
    assert m["timing/rollout_s"] >= 0.03 and set(m) == {"timing/rollout_s", "timing/train_s", "timing/step_s"}
    assert m["timing/step_s"] >= m["timing/rollout_s"] + m["timing/train_s"]
    t.reset()
    assert set(t.metrics()) == {"timing/step_s"}


def test_gpu_stats_absent_without_gpu():
    import torch

    stats = gpu_stats()
    if not torch.cuda.is_available():
        assert stats == {}
    else:
        assert all(math.isfinite(v) for v in stats.values()) and "gpu/mem_used_gb" in stats
