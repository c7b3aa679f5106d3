"""The RL loop at the virtual-pipeline (PP2 x VPP2) and context-parallel (CP2) layouts on 2 gloo
ranks (CPU), with routing replay R3 and capture, the KL, the entropy bonus and the high-entropy
token selection (its threshold over the step's tokens on every DP rank) in the loss: the same
steps, routing metrics and weight-probe log-probs as the plain layout (EP1/PP1), and a VPP run
resumed from its own checkpoint; the layout rules refuse what cannot work, naming the numbers.
Also at the plain layout: two passes over one rollout batch (train.ppo_epochs=2), whose first pass
is the plain run's first step (that run has no held-out evaluation, the others evaluate every
version: it changes nothing of training), and the held-out evaluation against HF transformers."""

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
    """One launch: plain, vpp (checkpoint every step), vpp_resumed (from vpp's first), cp, epochs, rpp,
    rpp_vpp and rpp_vpp_resumed (KL in the reward)."""
    work = tmp_path_factory.mktemp("loop_layouts")
    out = work / "out.json"
    torchrun(ROOT / "tests/distributed/loop_layouts_worker.py", 2, str(out), str(work), timeout=300)
    res = json.loads(out.read_text())
    errors = {k: v for k, v in res.items() if k.endswith("_error")}
    assert not errors, errors
    res["work"] = str(work)
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


def test_held_out_evaluation_every_version(runs, tmp_path):
    """eval.interval=1: versions 0, 1 and 2 (the final) evaluated on 16 held-out prompts, the same at every
    layout (each engine got the same synced weights). Version 0 is the untrained tiny model: its greedy
    answers from HF transformers' own generate, scored by the toy task's exact-answer reward, give the same
    eval/reward_mean, and the same mean of a text-hash reward (weight 0), which any differing response
    would move (the embedded engine, its scheduler and the reward executor are not in that path)."""
    import transformers

    from moe_rl.config import load_config
    from moe_rl.config.run import RunConfig
    from moe_rl.data.toy_tasks import exact_answer_reward
    from moe_rl.evaluation import load_eval_prompts
    from moe_rl.launch import model_dir
    from moe_rl.rewards.types import RewardInput
    import torch
    from loop_layouts_worker import BASE, EVAL, text_hash_reward

    for name in ("plain", "vpp", "cp"):
        ev = runs[name + "_eval"]
        assert [(r["policy_version"], r["step"]) for r in ev] == [(0, 0), (1, 2), (2, 4)], name
        assert all(r["eval/num_prompts"] == 16 and r["eval/reward_error_frac/correct"] == 0.0 for r in ev)
        for a, b in zip(runs["plain_eval"], ev):
            assert a["eval/reward_mean"] == b["eval/reward_mean"] and a["eval/response_len_mean"] == b["eval/response_len_mean"]
    # train.steps=0 in the finished run's output_dir: its newest checkpoint (version 2) evaluated again, the
    # same record rewritten in place, no training record added
    assert runs["vpp_eval_only"] == [] and runs["vpp_metrics_again"] == 4
    assert [{k: v for k, v in r.items() if k != "timing/eval_s"} for r in runs["vpp_eval_only_eval"]] == [
        {k: v for k, v in r.items() if k != "timing/eval_s"} for r in runs["vpp_eval"]]
    # the resumed run evaluates from its resume point on: versions 1 and 2, as the uninterrupted one did
    assert [(r["policy_version"], r["eval/reward_mean"]) for r in runs["vpp_resumed_eval"]] == [
        (r["policy_version"], r["eval/reward_mean"]) for r in runs["vpp_eval"][1:]]

    cfg = load_config(RunConfig, None, BASE + EVAL + [f"output_dir={runs['work']}/plain"])
    hf = model_dir(cfg)
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    prompts = load_eval_prompts(cfg, tok)
    assert len(prompts) == 16

    scores, hashes = [], []
    for p in prompts:
        ids = torch.tensor([p.input_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.rollout.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        scores.append(exact_answer_reward(RewardInput(response=text, label=p.record.label)))
        hashes.append(text_hash_reward(RewardInput(response=text, label=p.record.label)))
    v0 = runs["plain_eval"][0]
    assert v0["eval/reward_mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-12)
    # rewards are kept in float32 (the scorer's tensors): 1e-6, far below the 1/16000 one differing response moves it
    assert v0["eval/reward_mean/text"] == pytest.approx(sum(hashes) / len(hashes), abs=1e-6)
    assert len(set(hashes)) > 4  # the responses differ from prompt to prompt


def test_checkpoints_hold_the_policy_as_an_hf_model(runs):
    """checkpoint.save_hf at PP2 x VPP2: each checkpoint's hf/ is a model directory transformers loads
    by itself (config, tokenizer, safetensors shards + index written by the export stream of every
    stage); the last one scores the probe tokens as the trainer's final policy does."""
    import os

    import torch
    import transformers

    from moe_rl.checkpoint import run_state as rs

    root = rs.checkpoint_root(f"{runs['work']}/vpp")
    for step in (1, 2):
        files = set(os.listdir(os.path.join(rs.step_dir(root, step), "hf")))
        assert {"config.json", "model.safetensors.index.json"} <= files and any(f.startswith("tokenizer") for f in files)
    hf = rs.step_dir(root, 2) + "/hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).logits.float()[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(logp, torch.tensor(runs["vpp_probe"]), rtol=LAYOUT_TOL, atol=LAYOUT_TOL)
    # the step-1 checkpoint holds other weights (one loop step earlier)
    first = transformers.AutoModelForCausalLM.from_pretrained(rs.step_dir(root, 1) + "/hf", dtype=torch.float32)
    assert not torch.equal(first.lm_head.weight, model.lm_head.weight)


def test_kl_in_the_reward_with_the_adaptive_beta(runs):
    """REINFORCE++ with the KL in the reward and kl_target: at step 0 the policy is its reference (KL 0);
    each batch's beta is the previous one moved by the controller's formula, written out here from the
    logged KLs; PP2 x VPP2 (the whole-batch scoring broadcast from the last stage) gives the plain
    layout's steps; a run resumed from loop step 1 continues with the saved beta, not kl_beta."""
    from moe_rl.observability import is_volatile

    target, horizon, n = 0.002, 64, 32  # RPP's kl_target, kl_horizon; 32 responses per batch
    recs = runs["rpp"]
    by_version = {r["policy_version"]: r for r in recs}
    assert sorted(by_version) == [0, 1, 2]
    assert by_version[0]["actor/reward_kl_penalty"] == 0.0 and by_version[0]["actor/reward_kl_penalty_coeff"] == 0.05
    for v in (1, 2):
        prev, cur = by_version[v - 1], by_version[v]
        err = min(max(prev["actor/reward_kl_penalty"] / target - 1, -0.2), 0.2)
        assert cur["actor/reward_kl_penalty_coeff"] == pytest.approx(
            prev["actor/reward_kl_penalty_coeff"] * (1 + err * n / horizon), rel=1e-12)
    # k1 can be negative on a sample; after one update the policy has left its reference
    assert by_version[1]["actor/reward_kl_penalty"] != 0 and by_version[2]["actor/reward_kl_penalty_coeff"] != 0.05
    for a, b in zip(recs, runs["rpp_vpp"]):
        for k in ("actor/reward_kl_penalty", "actor/reward_kl_penalty_coeff", "actor/pg_loss", "actor/grad_norm"):
            assert _close(a[k], b[k]), (a["step"], k, a[k], b[k])
    assert runs["rpp_vpp_checkpoints"][0] == "step_00000001"
    whole, resumed = runs["rpp_vpp"][2:], runs["rpp_vpp_resumed"]
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == [2, 3, 4, 5]
    for a, b in zip(whole, resumed):
        assert {k: v for k, v in a.items() if not is_volatile(k)} == {k: v for k, v in b.items() if not is_volatile(k)}
