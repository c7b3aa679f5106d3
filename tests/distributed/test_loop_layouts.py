"""The RL loop at the virtual-pipeline (PP2 x VPP2) and context-parallel (CP2) layouts on 2 gloo
ranks (CPU), with routing replay R3 and capture, the KL, the entropy bonus and the high-entropy
token selection (its threshold over the step's tokens on every DP rank) in the loss: the same
steps, routing metrics and weight-probe log-probs as the plain layout (EP1/PP1), and a VPP run
resumed from its own checkpoint; the layout rules refuse what cannot work, naming the numbers.
Also at the plain layout: two passes over one rollout batch (train.ppo_epochs=2), whose first pass
is the plain run's first step."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from launcher import ROOT, torchrun

pytestmark = pytest.mark.distributed

LAYOUT_TOL = 1e-5  # relative, as tests/distributed/test_loop.py: fp32, the same math at another layout
COMPARED = ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/ppo_kl", "actor/clipfrac", "actor/kl_loss",
            "actor/entropy_loss", "actor/entropy_kept_frac")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch: plain, vpp (checkpoint every step), vpp_resumed (from vpp's first), cp, epochs."""
    work = tmp_path_factory.mktemp("loop_layouts")
    out = work / "out.json"
    torchrun(ROOT / "tests/distributed/loop_layouts_worker.py", 2, str(out), str(work), timeout=300)
    res = json.loads(out.read_text())
    errors = {k: v for k, v in res.items() if k.endswith("_error")}
    assert not errors, errors
    return res


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= LAYOUT_TOL * max(1.0, abs(a))


@pytest.mark.parametrize("layout", ["vpp", "cp"])
def test_layout_gives_the_plain_layouts_steps(runs, layout):
    ref, other = runs["plain"], runs[layout]
    assert [r["step"] for r in other] == [r["step"] for r in ref] == [0, 1, 2, 3]  # 2 steps x 2 mini-batches
    assert all(r["actor/grad_norm"] > 0 for r in ref)  # something was learned and is compared
    assert ref[1]["actor/kl_loss"] > 0  # the reference's log-probs enter the loss
    assert ref[0]["actor/entropy_loss"] > 0  # the entropy bonus (its gradient through the head) is on
    # top_entropy_quantile=0.5: about half the tokens train, the threshold taken over both DP ranks (plain)
    # or one (vpp, cp), the old pass's entropies gathered over the CP ranks' halves (cp)
    assert all(0.3 < r["actor/entropy_kept_frac"] < 0.7 for r in ref)
    for a, b in zip(ref, other):
        assert a["rollout/reward_mean"] == b["rollout/reward_mean"]
        assert a["rollout/response_len_mean"] == b["rollout/response_len_mean"]
        for k in COMPARED:
            assert _close(a[k], b[k]), (layout, a["step"], k, a[k], b[k])
        # R3 ran: every token replayed the engine's route (under CP: its rank's positions)
        assert b["routing/replay_fallback_frac"] == b["routing/replay_mismatch_frac"] == 0.0


@pytest.mark.parametrize("layout", ["vpp", "cp"])
def test_weight_probe_scores_at_the_layout(runs, layout):
    """The probe's trainer log-probs of the final policy (through the head and every chunk;
    7 tokens padded for CP) equal the plain layout's."""
    import torch

    ref, got = torch.tensor(runs["plain_probe"]), torch.tensor(runs[layout + "_probe"])
    assert ref.shape == got.shape == (2, 6) and (ref < 0).all()
    torch.testing.assert_close(got, ref, rtol=LAYOUT_TOL, atol=LAYOUT_TOL)


@pytest.mark.parametrize("layout", ["vpp", "cp"])
def test_routing_capture_gives_the_plain_layouts_metrics(runs, layout):
    """Routing capture over the model chunks (VPP) and over both CP ranks' sequence chunks, put
    back in position order (CP): every MoE layer's drift against the engine's routes, old->new
    drift and load, as at the plain layout."""
    for a, b in zip(runs["plain"], runs[layout]):
        keys = sorted(k for k in a if k.startswith("routing/"))
        assert "routing/flip_frac/old_new/layer_3" in keys
        assert keys == sorted(k for k in b if k.startswith("routing/"))
        for k in keys:
            assert _close(a[k], b[k]), (a["step"], k, a[k], b[k])


def test_vpp_run_resumes_from_its_checkpoint(runs):
    from moe_rl.observability import is_volatile

    assert runs["vpp_checkpoints"] == ["step_00000001", "step_00000002"]
    whole, resumed = runs["vpp"][2:], runs["vpp_resumed"]
    assert [r["step"] for r in resumed] == [2, 3]  # the second step only
    for a, b in zip(whole, resumed):
        stable = {k for k in a if not is_volatile(k)}
        assert stable == {k for k in b if not is_volatile(k)}
        diff = {k: (a[k], b[k]) for k in stable if a[k] != b[k]}
        assert not diff, diff  # same layout, same checkpoint: bitwise the uninterrupted run


def _config(*overrides):
    from moe_rl.config import load_config
    from moe_rl.config.run import RunConfig

    return load_config(RunConfig, None, ["model.tiny_family=qwen3_moe", *overrides])


def test_layout_rules_refuse_with_the_numbers():
    from moe_rl.train.trainer import check_microbatching

    vpp = ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2", "loop.rollout_batch_size=24",
           "rollout.n_samples_per_prompt=4", "train.micro_batch=4"]
    with pytest.raises(ValueError, match=r"train.global_batch \(12\) must be a multiple of train.micro_batch \(4\) "
                                         r"x parallel.pipeline_parallel \(2\) = 8"):
        _config(*vpp, "train.global_batch=12")
    cfg = _config(*vpp, "train.global_batch=8")  # 8 rows, 2 micro-batches of 4 at DP1
    check_microbatching(cfg, SimpleNamespace(dp=1, pp=2, vpp=2))
    with pytest.raises(ValueError, match=r"\(8\) / data-parallel \(2\) = 4 responses per rank must be a multiple of "
                                         r"train.micro_batch \(4\) x pipeline_parallel \(2\) = 8"):
        check_microbatching(cfg, SimpleNamespace(dp=2, pp=2, vpp=2))
    check_microbatching(cfg, SimpleNamespace(dp=2, pp=2, vpp=1))  # 1F1B takes any count and shape


def test_ppo_epochs_pass_twice_over_the_batch(runs):
    """train.ppo_epochs=2: the step's two mini-batches are trained twice, four optimizer steps on one
    rollout batch. The first pass is the plain run's first loop step, bit for bit; the second pass
    trains on the same batch against the same old log-probs, so it is off-policy (the ratio moved)."""
    from moe_rl.observability import is_volatile

    plain, ep = runs["plain"], runs["epochs"]
    assert [(r["step"], r["policy_version"], r["epoch"], r["minibatch"]) for r in ep] == [
        (0, 0, 0, 0), (1, 0, 0, 1), (2, 0, 1, 0), (3, 0, 1, 1)]
    for a, b in zip(plain[:2], ep[:2]):
        keys = [k for k in a if not is_volatile(k) and not k.startswith(("weights/", "routing/"))]
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    for r in ep[2:]:
        assert r["rollout/reward_mean"] == ep[0]["rollout/reward_mean"]  # the same batch
        assert r["actor/ppo_kl"] != 0.0 and r["actor/ratio_max"] != r["actor/ratio_min"]
