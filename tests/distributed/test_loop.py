"""The RL loop and its run checkpoints on 2 gloo ranks (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher import ROOT, torchrun

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def loop_runs(tmp_path_factory):
    """One launch: the kill-and-resume reference run, run checkpoints, the sync scenario, the
    same steps at three layouts, non-finite steps, async mode, the loop against given
    server URLs, routing replay R3 and dynamic sampling."""
    work = tmp_path_factory.mktemp("loop")
    out = work / "out.json"
    torchrun(ROOT / "tests/distributed/loop_worker.py", 2, str(out), str(work), "uninterrupted", "ckpt", "sync",
             "layouts", "nonfinite", "async", "servers", "routing", "dynamic", timeout=560)
    res = json.loads(out.read_text())
    errors = {k: v for k, v in res.items() if k.endswith("_error")}
    assert not errors, errors
    return work, res


def test_sync_run_logs_every_metric_and_starts_on_policy(loop_runs):
    import math

    from moe_rl.observability import REQUIRED_STEP_METRICS
    from moe_rl.observability.writer import read_metrics

    work, res = loop_runs
    recs = res["sync"]
    assert [r["step"] for r in recs] == [0, 1, 2, 3]  # 2 steps x 2 mini-batches
    assert [(r["policy_version"], r["minibatch"]) for r in recs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in recs:
        missing = [k for k in REQUIRED_STEP_METRICS + ("actor/kl_loss",) if k not in r]
        assert not missing, missing
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, bad
        assert r["rollout/staleness_mean"] == 0.0 and r["rollout/weight_version_min"] == r["policy_version"]
        assert r["rollout/reward_error_frac/correct"] == 0.0  # a reward that never fails
        assert any(k.startswith("timing/") for k in r)
    # every sync of the in-process engines ends with the log-prob probe on each rank's engine
    synced = [r for r in recs if "weights/sync_s" in r]
    assert synced and all(r["weights/probe_logprob_diff"] < 1e-4 for r in synced), synced
    first = recs[0]
    # old log-probs are recomputed by the trainer: the first mini-batch is exactly on-policy,
    # and the reference is the same model, so its KL is exactly zero
    assert first["actor/ratio_mean"] == first["actor/ratio_min"] == first["actor/ratio_max"] == 1.0
    assert first["actor/clipfrac"] == 0.0 and first["actor/ppo_kl"] == 0.0 and first["actor/kl_loss"] == 0.0
    assert recs[1]["actor/ppo_kl"] != 0.0  # the second mini-batch sees the first step's update
    # rank 0 wrote the same records, and real tensorboard event files
    on_disk = read_metrics(str(work / "sync" / "metrics.jsonl"))
    assert [r["step"] for r in on_disk] == [0, 1, 2, 3]
    assert on_disk[3]["actor/pg_loss"] == recs[3]["actor/pg_loss"]
    assert list((work / "sync" / "tb").glob("events.out.tfevents.*"))


def test_every_logged_metric_is_documented(loop_runs):
    """docs/metrics.md names (in backticks) every key any run of the launch logged; per-layer
    keys as ``.../layer_<i>``, per-reward ones as ``rollout/reward_mean/<name>`` (and
    ``reward_error_frac``, and their ``eval/`` forms: evaluation records are in the launch too)."""
    import re

    def records(x):
        if isinstance(x, dict):
            if "policy_version" in x:  # a loop record
                yield x
            else:
                for v in x.values():
                    yield from records(v)
        elif isinstance(x, list):
            for v in x:
                yield from records(v)

    recs = list(records(loop_runs[1]))
    per_reward = r"^(rollout|eval)/(reward_mean|reward_error_frac)/.+$"
    keys = {re.sub(per_reward, r"\1/\2/<name>", re.sub(r"layer_\d+$", "layer_<i>", k)) for r in recs for k in r}
    assert len(recs) > 40 and any(k.startswith("routing/") for k in keys), (len(recs), sorted(keys))
    doc = (ROOT / "docs" / "metrics.md").read_text()
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"{len(missing)} logged metric(s) not in docs/metrics.md: {missing}"


def _moe_layers(run_dir):
    """The MoE layers of the run's tiny Qwen3-MoE, by HF's rule: every ``decoder_sparse_step``-th
    layer that ``mlp_only_layers`` does not name."""
    (hf,) = [p for p in run_dir.iterdir() if p.name.startswith("hf_tiny")]
    c = json.loads((hf / "config.json").read_text())
    assert c["model_type"] == "qwen3_moe"
    return [i for i in range(c["num_hidden_layers"])
            if i not in c["mlp_only_layers"] and (i + 1) % c["decoder_sparse_step"] == 0]


def _check_routing_metrics(recs, layers):
    assert len(layers) >= 2
    for r in recs:
        for pair in ("rollout_old", "old_new"):
            for m in ("flip_frac", "topk_overlap", "any_layer_flip_frac"):
                assert 0.0 <= r[f"routing/{m}/{pair}"] <= 1.0, (r["step"], m, pair)
            for layer in layers:
                assert 0.0 <= r[f"routing/flip_frac/{pair}/layer_{layer}"] <= 1.0
            assert f"routing/flip_frac/{pair}/layer_{max(layers) + 1}" not in r
        assert r["routing/router_kl/old_new"] >= 0.0  # the engine gives no router distribution
        for m in ("load_max_over_mean", "load_cv", "dead_experts"):
            assert all(f"routing/{m}/layer_{layer}" in r for layer in layers) and f"routing/{m}" in r
        assert r["routing/load_max_over_mean"] >= 1.0
        # the optimizer step moved the routers: some token's experts changed old -> new
        assert r["routing/flip_frac/old_new"] > 0.0


def test_dynamic_sampling_draws_extra_rounds_and_completes_the_batch_at_the_cap(loop_runs):
    """DAPO's rule: rounds run until the step has prompts_per_step informative groups or the cap
    (1 + max_extra_rounds) is hit; then, and only then, non-informative groups fill the batch,
    so the trained batch keeps its size and its all-equal fraction is the filled share."""
    _, res = loop_runs
    recs = res["dynamic"]
    prompts_per_step, cap = 32 // 4, 3  # loop.rollout_batch_size / n_samples_per_prompt; 1 + 2 extra
    assert len(recs) == 4  # 2 steps x 2 mini-batches
    for r in recs:
        rounds, filled = r["rollout/rounds"], r["rollout/filled_groups"]
        assert 1 <= rounds <= cap and 0 <= filled <= prompts_per_step
        assert filled == 0 or rounds == cap, r  # filling only at the cap
        assert r["rollout/zero_std_group_frac"] == pytest.approx(filled / prompts_per_step)
    # the untrained policy answers the max-digit task mostly wrong: some step needs extra rounds
    assert any(r["rollout/rounds"] > 1 for r in recs)


def test_routing_metrics_every_step_without_replay(loop_runs):
    work, res = loop_runs
    recs = res["sync"]
    _check_routing_metrics(recs, _moe_layers(work / "sync"))
    assert not any(k.startswith("routing/replay_") for r in recs for k in r)  # routing.replay=none
    assert not (work / "sync" / "routes").exists()  # routing.dump_every=0


def test_routing_replay_r3_in_the_loop_and_its_report(loop_runs, tmp_path):
    """R3: the old-policy and training passes ran exactly the (bf16) engines' routes, every step
    (the replay's self-check: no replayed token routed elsewhere, none fell back to live
    routing), while rollout->old records how the old policy's own routers would have differed;
    the routes dumped every step feed tools/routing_report.py."""
    import subprocess
    import sys

    work, res = loop_runs
    recs = res["routing"]
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    _check_routing_metrics(recs, _moe_layers(work / "routing"))
    for r in recs:
        assert r["routing/replay_mismatch_frac"] == 0.0 and r["routing/replay_fallback_frac"] == 0.0
        assert 0.0 <= r["routing/flip_frac/rollout_old"] <= r["routing/any_layer_flip_frac/rollout_old"] < 0.2
    assert sorted(p.name for p in (work / "routing" / "routes").iterdir()) == ["step_00000000.pt", "step_00000001.pt"]
    p = subprocess.run([sys.executable, str(ROOT / "tools/routing_report.py"), str(work / "routing"),
                        "--out", str(tmp_path / "report")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    written = {q.name for q in (tmp_path / "report").iterdir()}
    assert {"flip_frac_layers.png", "flip_frac_heatmap.png", "expert_load.png", "drift_pairs.png",
            "summary.md"} <= written, written
    assert all((tmp_path / "report" / n).stat().st_size > 0 for n in written)


def test_run_checkpoint_resumes_bitwise_and_reshards(loop_runs):
    res = loop_runs[1]["ckpt"]
    # the same two steps after a save/load as without one: loss and grad norm bit for bit
    assert res["resumed"] == res["uninterrupted"]
    # every parameter has its own Adam step again after the load
    assert res["steps_distinct"] == res["num_params_state"] > 0
    assert res["state"] == {"step": 2, "optimizer_step": 2, "sampler": {"epoch": 0, "position": 8}}
    assert res["found"] == {"complete": [2], "partial": [".tmp-step_00000006", "step_00000005"]}
    # saved at EP2, loaded at TP2+SP: fp32 logits of two implementations of the same layout math
    assert res["reshard_max_diff"] < 1e-4


LAYOUT_TOL = 1e-5  # relative: fp32, the same math at another parallel layout (measured <= 5e-7)


def test_layouts_give_the_same_two_steps(loop_runs):
    _, res = loop_runs
    ref = res["ep2"]
    for name in ("ep1", "tp2"):
        other = res[name]
        assert len(other) == len(ref) == 4
        for a, b in zip(ref, other):
            assert a["rollout/reward_mean"] == b["rollout/reward_mean"]
            assert a["rollout/response_len_mean"] == b["rollout/response_len_mean"]
            for k in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/ppo_kl"):
                assert abs(a[k] - b[k]) <= LAYOUT_TOL * max(1.0, abs(a[k])), (name, a["step"], k, a[k], b[k])


def _stable(recs):
    from moe_rl.observability import is_volatile

    return [{k: v for k, v in r.items() if not is_volatile(k)} for r in recs]


def test_sigkill_anywhere_then_resume_is_bitwise_identical(tmp_path, loop_runs):
    """Kill the whole job (SIGKILL, both ranks and torchrun) at a random point, resume, kill it
    again inside a checkpoint write, resume: every step's metrics (all but wall-time ones) and
    the final weights equal the run that was never interrupted, bit for bit, and the
    half-written checkpoint is reported and never loaded."""
    import os
    import random

    import torch

    from moe_rl.observability.writer import read_metrics

    seed = int(os.environ.get("MOE_RL_TEST_KILL_SEED", random.randrange(1 << 30)))
    r = random.Random(seed)
    first = f"{r.choice(['rollout', 'train', 'sync'])}:{r.randrange(0, 4)}"
    second = f"{r.choice(['ckpt_write', 'ckpt_marker'])}:3"
    print(f"kill points {first} then {second} (MOE_RL_TEST_KILL_SEED={seed})")
    worker = ROOT / "tests/distributed/resume_worker.py"
    work = loop_runs[0]  # the uninterrupted run: "a"
    for kill in (first, second):
        p = torchrun(worker, 2, str(tmp_path / "b"), kill, str(tmp_path / "b.pt"), timeout=300, check=False)
        assert p.returncode != 0 and "[worker] SIGKILL" in p.stderr, (kill, p.returncode, p.stderr[-3000:])
    partial = tmp_path / "b" / "checkpoints" / (".tmp-step_00000004" if second.startswith("ckpt_write") else "step_00000004")
    assert partial.exists()
    p = torchrun(worker, 2, str(tmp_path / "b"), "none", str(tmp_path / "b.pt"), timeout=300)
    assert f"ignoring partial checkpoint {partial}" in p.stderr
    assert "resumed from " + str(tmp_path / "b" / "checkpoints" / "step_00000002") in p.stderr

    a = read_metrics(str(work / "uninterrupted" / "metrics.jsonl"))
    b = read_metrics(str(tmp_path / "b" / "metrics.jsonl"))
    assert [x["step"] for x in a] == [x["step"] for x in b] == list(range(12))
    for x, y in zip(_stable(a), _stable(b)):
        assert x == y, (seed, {k: (x[k], y.get(k)) for k in x if x[k] != y.get(k)})
    wa, wb = torch.load(work / "uninterrupted.pt"), torch.load(tmp_path / "b.pt")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), seed


def test_async_runs_one_version_behind_and_learns(loop_runs):
    """The engine server generates step k+1 while the trainer trains on step k: from the
    second step on every sample is exactly one policy version old (the bound), and the
    policy still learns the quickstart task."""
    recs = loop_runs[1]["async"]
    assert [r["rollout/staleness_max"] for r in recs] == [0.0] + [1.0] * 11
    assert [r["rollout/weight_version_min"] for r in recs] == [0.0] + [float(k) for k in range(11)]
    assert all(r["weights/probe_logprob_diff"] < 1e-3 for r in recs)  # the engine got the trainer's weights
    # the server returned every sample's routes over HTTP: the trainer compared them with its own
    assert all(0.0 <= r["routing/flip_frac/rollout_old"] <= 1.0 for r in recs)
    first = sum(r["rollout/reward_mean"] for r in recs[:3]) / 3
    last = sum(r["rollout/reward_mean"] for r in recs[-3:]) / 3
    assert first < 0.2 and last > first + 0.15, (first, last)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(loop_runs):
    from moe_rl.checkpoint import run_state as rs

    work, res = loop_runs
    out = res["nonfinite"]
    assert "2 optimizer steps in a row had a non-finite loss or gradient" in out["message"]
    recs = out["records"]
    # step 0 trained; step 1 was skipped and logged; step 2's skip stopped the run before its log
    assert [(r["step"], r["train/skipped"], r["train/skipped_steps"]) for r in recs] == [(0, 0.0, 0.0), (1, 1.0, 1.0)]
    assert recs[0]["actor/lr"] > 0
    # the last good checkpoint (after step 1's skip changed nothing) is intact and complete
    found = rs.scan(str(work / "nonfinite" / "checkpoints"))
    assert [s for s, _ in found.complete] == [1, 2] and not found.partial


def test_sglang_backend_with_given_servers_generates_and_syncs_through_them(loop_runs):
    """``rollout.backend=sglang`` with ``rollout.client.server_urls``: the loop starts no server,
    makes the given one serve the policy's weights first (a sync to version 0, since their
    weights are unknown), generates through it and syncs over the distributed transport
    after every step; the engine's log-probs then equal the trainer's."""
    res = loop_runs[1]
    assert res["servers_started"] == 0
    recs = res["servers"]
    assert [(r["policy_version"], r["rollout/weight_version_min"], r["rollout/staleness_max"]) for r in recs] == [
        (0, 0.0, 0.0)] * 2 + [(1, 1.0, 0.0)] * 2  # 2 steps x 2 mini-batches
    first = recs[0]
    assert first["actor/ratio_mean"] == first["actor/ratio_min"] == first["actor/ratio_max"] == 1.0
    # the server started on another model; step 0's samples already carry the policy's own
    # log-probs (engine vs trainer, fp32), so the first sync happened before the first rollout
    assert abs(first["mismatch/k1"]) < 1e-4, first["mismatch/k1"]
    for r in recs:
        assert r["weights/probe_logprob_diff"] < 1e-3 and r["weights/bytes"] > 0, r
        assert "routing/flip_frac/rollout_old" in r  # routes from the given server, with the trainer's layout


def test_held_out_evaluation_through_the_server_equals_the_in_process_engines(loop_runs):
    """eval.interval=1 with the run's engines behind HTTP (run_requests on rank 0, broadcast) and
    in-process (each rank its share, gathered): versions 0, 1, 2 recorded at optimizer steps 0, 2, 4.
    Version 0 is the same policy (the server was synced to it before any rollout): the same greedy
    answers, so the same metrics; training was not disturbed (ep2's steps equal ep1's and tp2's)."""
    res = loop_runs[1]
    srv, local = res["servers_eval"], res["ep2_eval"]
    for ev in (srv, local):
        assert [(r["policy_version"], r["step"], r["eval/num_prompts"]) for r in ev] == [(0, 0, 8), (1, 2, 8), (2, 4, 8)]
    keys = ("eval/reward_mean", "eval/response_len_mean", "eval/truncated_frac")
    assert {k: srv[0][k] for k in keys} == {k: local[0][k] for k in keys}
    assert 0 < srv[0]["eval/response_len_mean"] <= 3


def test_checkpoint_hf_weights_at_ep2_equal_the_converters(loop_runs, tmp_path):
    """checkpoint.save_hf at EP2 (each rank exports its own experts): the final checkpoint's hf/ holds
    exactly the tensors tools/convert_checkpoint.py makes of that checkpoint's Megatron state (another
    code path: the distributed checkpoint read back in one process), bit for bit, and transformers
    loads it."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from moe_rl.checkpoint import run_state as rs
    from moe_rl.checkpoint.convert import convert

    work, _ = loop_runs
    step = rs.step_dir(rs.checkpoint_root(str(work / "ep2")), 2)
    ours, ref_dir = Path(step) / "hf", tmp_path / "converted"
    convert(step, ref_dir, to="hf")

    def tensors(d):
        out = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    a, b = tensors(ours), tensors(ref_dir)
    assert a.keys() == b.keys() and any(".mlp.experts." in k for k in a)
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]
    model = transformers.AutoModelForCausalLM.from_pretrained(ours)
    assert model.config.model_type == "qwen3_moe"
