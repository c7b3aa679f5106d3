"""tools/routing_report.py on a synthetic run: the plots exist and decode, the summary names the
worst layers planted in the metrics and the trend, route dumps feed the load section, and a run
without routing metrics is a clear error (exit code 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "routing_report.py"
PLOTS = ("flip_frac_layers.png", "flip_frac_heatmap.png", "expert_load.png", "drift_pairs.png")
LAYERS = (1, 3, 5, 7)  # global indices of the MoE layers (layer 0, 2, ... dense)
STEPS = range(9)


def _flip(pair: str, layer: int, step: int) -> float:
    # rollout->old: layer 5 is worst and everything rises with the step; old->new: layer 3 worst, flat.
    if pair == "rollout_old":
        return (0.30 if layer == 5 else 0.02 * layer) + 0.01 * step
    return 0.20 if layer == 3 else 0.01


def _write_run(run: Path, *, routing: bool = True, dumps: bool = True) -> None:
    run.mkdir(parents=True)
    with open(run / "metrics.jsonl", "w") as f:
        for s in STEPS:
            rec = {"step": s, "actor/pg_loss": 0.1}
            if routing:
                for pair in ("rollout_old", "old_new"):
                    for metric in ("flip_frac", "topk_overlap", "router_kl"):
                        vals = []
                        for l in LAYERS:
                            v = _flip(pair, l, s) if metric == "flip_frac" else (
                                1 - _flip(pair, l, s) / 2 if metric == "topk_overlap" else _flip(pair, l, s) / 10)
                            rec[f"routing/{metric}/{pair}/layer_{l}"] = v
                            vals.append(v)
                        rec[f"routing/{metric}/{pair}"] = sum(vals) / len(vals)
                    rec[f"routing/any_layer_flip_frac/{pair}"] = min(1.0, 2 * rec[f"routing/flip_frac/{pair}"])
                for l in LAYERS:
                    rec[f"routing/load_max_over_mean/layer_{l}"] = 1.0 + 0.1 * l
                    rec[f"routing/load_cv/layer_{l}"] = 0.05 * l
                    rec[f"routing/dead_experts/layer_{l}"] = float(l == 7)
                rec["routing/load_max_over_mean"] = 1.4
                rec["routing/replay_mismatch_frac"] = 0.0
            f.write(json.dumps(rec) + "\n")
    if dumps:
        from moe_rl.routing.report import write_route_dump

        g = torch.Generator().manual_seed(0)
        for s in (4, 8):
            routes = {l: torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(64)]) for l in LAYERS}
            routes[3] = torch.tensor([[0, 1]] * 64)  # layer 3 collapses onto experts 0 and 1
            path = write_route_dump(str(run), s, routes, 8)
            assert path == str(run / "routes" / f"step_{s:08d}.pt")


def _first_row(text: str, heading: str) -> str:
    """The first data row of the first table under ``heading``."""
    rows = [l for l in text.split(heading)[1].splitlines() if l.startswith("| ")]
    return rows[1]  # rows[0] is the header


def _cli(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    base = tmp_path_factory.mktemp("routing_report")
    _write_run(base / "run")
    r = _cli(base / "run", "--out", base / "out", "--top", "3")
    assert r.returncode == 0, r.stderr
    return base / "out", r


def test_plots_exist_and_decode(report):
    import matplotlib.image as mpimg

    out, r = report
    for name in PLOTS:
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (name, img.shape)
        assert img[..., :3].std() > 0.01, f"{name} is blank"
        assert f"wrote {out / name}" in r.stdout
    assert not list(out.glob("*.tmp.*"))  # atomic writes leave no temporaries


def test_summary_names_worst_layers_trend_and_load(report):
    text = (report[0] / "summary.md").read_text()
    assert "Worst layer for rollout -> old: **layer 5**" in text
    assert "Worst layer for old -> new: **layer 3**" in text
    # layer-mean rollout->old flip fraction over steps 0..8; thirds are steps 0-2 and 6-8
    mean = [sum(_flip("rollout_old", l, s) for l in LAYERS) / len(LAYERS) for s in STEPS]
    first, last = sum(mean[:3]) / 3, sum(mean[-3:]) / 3
    assert f"| flip_frac | rollout -> old | {first:.4g} | {last:.4g} | rising |" in text
    assert f"| flip_frac | old -> new | {0.0575:.4g} | {0.0575:.4g} | flat |" in text
    # load from the latest dump (step 8): layer 3 uses 2 of 8 experts -> max/mean 4, 6 dead
    assert "route dump of step 8" in text
    assert _first_row(text, "## Expert load") == "| 3 | 4 | 6 |"
    assert "| routing/replay_mismatch_frac | 0 | 0 |" in text
    for name in PLOTS:
        assert f"]({name})" in text


def test_load_from_metrics_without_dumps(tmp_path):
    from moe_rl.routing.report import write_report

    _write_run(tmp_path / "run", dumps=False)
    paths = write_report(str(tmp_path / "run"), str(tmp_path / "out"))
    assert (tmp_path / "out" / "expert_load.png").is_file() and len(paths) == 5
    text = (tmp_path / "out" / "summary.md").read_text()
    assert _first_row(text, "## Expert load") == "| 7 | 1.7 | 0.35 | 1 |"  # most imbalanced layer first


def test_run_without_routing_metrics_is_an_error(tmp_path):
    _write_run(tmp_path / "dense", routing=False, dumps=False)
    r = _cli(tmp_path / "dense", "--out", tmp_path / "out")
    assert r.returncode == 2
    assert str(tmp_path / "dense" / "metrics.jsonl") in r.stderr and "no routing metrics" in r.stderr
    assert not (tmp_path / "out" / "summary.md").exists()

    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import routing_report
    finally:
        sys.path.pop(0)
    assert routing_report.main([str(tmp_path / "nothing"), "--out", str(tmp_path / "out")]) == 2


def test_dump_format(tmp_path):
    from moe_rl.routing.report import load_dumps, write_route_dump

    routes = {5: torch.tensor([[0, 3], [2, 1]]), 9: torch.tensor([[1, 2], [0, 3]])}
    write_route_dump(str(tmp_path), 12, routes, 4)
    d = torch.load(tmp_path / "routes" / "step_00000012.pt", weights_only=True)
    assert d["format"] == 1 and d["step"] == 12 and d["num_experts"] == 4 and d["pass"] == "old"
    assert d["routes"][5].dtype == torch.int16 and d["routes"][9].tolist() == [[1, 2], [0, 3]]
    [dump] = load_dumps(str(tmp_path))
    assert dump.step == 12 and sorted(dump.routes) == [5, 9]
    with pytest.raises(ValueError, match="same shape"):
        write_route_dump(str(tmp_path), 13, {1: torch.zeros(2, 2), 2: torch.zeros(3, 2)}, 4)


def test_torn_dump_is_named(tmp_path):
    from moe_rl.routing.report import ReportError, write_report

    _write_run(tmp_path / "run", dumps=False)
    (tmp_path / "run" / "routes").mkdir()
    (tmp_path / "run" / "routes" / "step_00000003.pt").write_bytes(b"not a zip")
    with pytest.raises(ReportError, match="step_00000003.pt"):
        write_report(str(tmp_path / "run"), str(tmp_path / "out"))


def test_one_point_per_loop_step_when_a_batch_trains_in_several_optimizer_steps(tmp_path):
    """Two optimizer steps per rollout batch repeat the batch's routing values in both records:
    the report keeps one point per loop step (policy_version), the numbering of route dumps."""
    from moe_rl.routing.report import load_history, summary_markdown

    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as f:
        for v in range(3):
            for mb in range(2):
                f.write(json.dumps({"step": 2 * v + mb, "policy_version": v, "minibatch": mb,
                                    "routing/flip_frac/rollout_old": 0.0, "routing/flip_frac/old_new": 0.1 * v,
                                    "routing/flip_frac/rollout_old/layer_1": 0.0,
                                    "routing/flip_frac/old_new/layer_1": 0.1 * v}) + "\n")
    h = load_history(str(run))
    assert h.steps() == [0, 1, 2]
    assert h.drift[("flip_frac", "old_new", 1)] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    text = summary_markdown(h, [], [], run_dir=str(run))
    assert "3 steps with routing metrics, steps 0..2" in text
    assert "No layer changed experts for rollout" in text  # a pair that never flipped names no worst layer
