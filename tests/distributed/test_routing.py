"""Routing capture and replay (R2/R3) in Megatron's passes, on CPU/gloo, in one 2-rank launch
(``routing_worker.py``) on a tiny Qwen3-MoE (4 MoE layers, 8 experts, top-2).

References: the embedded engine's routes (HF transformers' routers, fp32) for the captured
ones; a pass whose router NATURALLY picks the replayed experts (logits pushed down elsewhere)
for the replayed outputs; the engine's log-probs for the rollout -> old mismatch.
"""

from __future__ import annotations

import json
import time

import pytest

from launcher import ROOT, torchrun

pytestmark = pytest.mark.distributed

LAYOUTS = ["EP1", "EP2", "TP2", "PP2"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from moe_rl.models.tiny import save_tiny_hf

    tmp = tmp_path_factory.mktemp("routing")
    hf_dir = save_tiny_hf("qwen3_moe", tmp / "qwen3_moe", seed=0)
    ds_dir = save_tiny_hf("deepseek_v3", tmp / "deepseek_v3", seed=0, first_k_dense_replace=2)
    out = tmp / "routing.json"
    t0 = time.time()
    torchrun(ROOT / "tests/distributed/routing_worker.py", 2, str(out), hf_dir, ds_dir)
    res = json.loads(out.read_text())
    print(f"\nrouting launch {time.time() - t0:.1f} s: worker up after {res['worker_start'] - t0:.1f} s, "
          f"init {res['imports_s']:.1f} s, engines {res['engine_s']:.1f} s, checks "
          f"{res['total_s'] - res['imports_s'] - res['engine_s']:.1f} s")
    return res


def _layout(results, i):
    rec = results["layouts"][i]
    assert "error" not in rec, rec["error"]
    return rec


@pytest.mark.parametrize("i", range(len(LAYOUTS)), ids=LAYOUTS)
def test_capture_matches_engine_routes_at_every_layout(results, i):
    rec = _layout(results, i)
    # every position of every row, prompt included, every layer: the trainer's routers chose
    # what the HF engine's routers chose (fp32, same weights)
    assert rec["capture_vs_engine_diff_frac"] == 0.0, rec["layout"]
    assert rec["metrics_capture"]["routing/flip_frac/rollout_old"] == 0.0
    assert rec["metrics_capture"]["routing/topk_overlap/rollout_old"] == 1.0
    # and identical across layouts (EP1, EP2, TP2 with sequence parallelism, PP2)
    assert rec["captured"] == _layout(results, 0)["captured"]
    assert rec["dump_matches_engine"]  # gather_routes: every real token once per layer


@pytest.mark.parametrize("i", range(len(LAYOUTS)), ids=LAYOUTS)
def test_r2_replay_uses_the_recorded_routes_and_keeps_router_gradients(results, i):
    rec = _layout(results, i)
    print(f"{rec['layout']}: flip after router perturbation live {rec['flip_live_after_perturb']:.3f}, "
          f"replayed {rec['flip_replayed']}")
    assert rec["flip_live_after_perturb"] > 0.05  # the perturbation does move live routes
    # the layers ran the replayed (old) experts ...
    assert rec["flip_replayed"] == 0.0 and rec["any_flip_replayed"] == 0.0
    # ... while the routers' own choices, which the drift metrics record, are the perturbed ones:
    # the first MoE layer sees the same input as in the live pass and chooses the same experts
    # (later layers see the outputs of the replayed experts, so their choices differ from live)
    assert rec["flip_choice_under_replay_first_layer"] == rec["flip_live_first_layer"] > 0.05
    assert rec["flip_choice_under_replay"] > 0.05
    assert rec["replay_mismatch_frac"] == 0.0 and rec["replay_fallback_frac"] == 0.0
    # every router got a gradient through the re-gathered gate weights
    assert sorted(rec["router_grad_abs_sum"]) == ["0", "1", "2", "3"]
    assert all(g > 0 for g in rec["router_grad_abs_sum"].values())
    assert rec["global_replay_registry"] == 0  # nothing left in Megatron's process-global list


def test_replayed_outputs_equal_a_natural_pass_with_those_experts(results):
    rec = _layout(results, 1)
    print(f"replayed vs natural: hidden {rec['replay_vs_natural_hidden_maxdiff']:.2e}, "
          f"logp {rec['replay_vs_natural_logp_maxdiff']:.2e}; live vs replayed logp "
          f"{rec['live_vs_replayed_logp_maxdiff']:.2e}")
    assert rec["replay_vs_natural_hidden_maxdiff"] < 1e-5
    assert rec["replay_vs_natural_logp_maxdiff"] < 1e-5
    assert rec["live_vs_replayed_logp_maxdiff"] > 1e-3  # the comparison can fail
    # wall time of a forward pass over 2 micro-batches (information only: the machine is shared)
    print("forward pass s (EP2): " + ", ".join(f"{k} {v:.4f}" for k, v in rec["pass_s"].items()))


def test_self_check_fires_when_replay_does_not_happen(results):
    rec = _layout(results, 1)
    assert rec["stale_router_error"] and "layer 1 consumed 0" in rec["stale_router_error"]
    assert rec["dropped_replay_error"] and "layers [1] lost their replay object" in rec["dropped_replay_error"]
    assert rec["missing_layer_error"] and "would route live" in rec["missing_layer_error"]
    assert rec["live_replay_error"] and "layer 2 sent" in rec["live_replay_error"]
    assert "replay_mismatch_frac > 0" in rec["live_replay_error"]
    assert rec["flip_replayed_after_adversarial"] == 0.0


def test_r3_end_to_end_at_ep2(results):
    rec = results["r3"]
    assert "error" not in rec, rec["error"]
    none, r3 = rec["r3"]["none"], rec["r3"]["r3"]
    print(f"rollout(bf16 engine)->old(fp32 trainer), EP2: mismatch/k3 without R3 {none['k3']:.3e}, "
          f"with R3 {r3['k3']:.3e}; flip_frac/rollout_old {none['flip_rollout_old']:.4f} -> "
          f"{r3['flip_rollout_old']}")
    assert none["flip_rollout_old"] > 0  # bf16 inference routes drift from the fp32 trainer's
    # R3 runs the engine's experts in every layer ...
    assert r3["used_routes_vs_engine_diff"] == 0.0 and none["used_routes_vs_engine_diff"] > 0
    assert r3["mismatch"] == 0.0 and r3["fallback"] == 0.0
    assert r3["k3"] < none["k3"]
    # ... and rollout->old still measures the drift it neutralises, the old policy's own routing:
    # in the first MoE layer (same input either way) exactly what it is without replay; later
    # layers see the outputs of the engine's experts, so their choices differ from live ones
    assert r3["flip_rollout_old_first_layer"] == none["flip_rollout_old_first_layer"]
    assert r3["flip_rollout_old"] > 0 and r3["any_flip_rollout_old"] > 0 and r3["old_routes_vs_engine_diff"] > 0
    # the policy's replay is its own: the reference, run inside it, routed live both times
    assert none["ref_routes"] == r3["ref_routes"]
    # R3 with two rows the engine gave no routes for: exactly their tokens fall back to live routing
    for mode in ("r3_partial", "r3_partial_nocapture"):  # the second with routing.capture=false
        part = rec["r3"][mode]
        print(f"R3 with 2 of 16 rows unrouted ({mode}): replay_fallback_frac {part['fallback']:.4f} "
              f"(their share of tokens {part['fallback_expected']:.4f})")
        assert part["fallback"] == pytest.approx(part["fallback_expected"], abs=1e-12) and part["fallback"] > 0
        assert part["mismatch"] == 0.0 and part["used_routes_vs_engine_diff"] == 0.0  # the routed rows replayed
        # ... and in a training pass those rows replay the old pass's routes (not live), the others the engine's
        assert part["train_fallback"] == 0.0 and part["train_mismatch"] == 0.0, mode
        assert part["train_missing_vs_old_diff"] == 0.0 and part["train_routed_vs_engine_diff"] == 0.0, mode
    assert rec["registry_before_session"] == 8 and rec["registry_with_none_session"] == 8
    assert rec["registry_with_r3_session"] == 4  # the policy's 4 routers left Megatron's global list


def test_deepseek_v3_routes_are_keyed_by_global_layer_at_pp2(results):
    # sigmoid scores, group-limited top-k, layers 0 and 1 dense: pipeline stage 0 has no MoE
    # layer, stage 1 holds layers 2 and 3; routes and metrics are keyed 2 and 3
    rec = results["deepseek_v3"]
    assert "error" not in rec, rec["error"]
    assert rec["capture_vs_engine_diff_frac"] == 0.0 and rec["dump_matches_engine"]
    assert rec["metric_layers"] == [2, 3]
    assert rec["flip_live_after_perturb"] > 0.05 and rec["flip_replayed"] == 0.0
    assert rec["replay_mismatch_frac"] == 0.0
    assert sorted(rec["router_grad_abs_sum"]) == ["2", "3"]
    assert all(g > 0 for g in rec["router_grad_abs_sum"].values())
