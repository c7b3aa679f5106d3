"""Gradient accumulation / data parallel invariance of the loss, and vocab-parallel log-probs.

One launch for the module: 2 gloo ranks (127.0.0.1, free port) run every check and
report max errors; the tests below read them.

1. For each aggregation mode (and configs with KL in the loss, mismatch corrections and the
   entropy bonus on top; the entropy is the model's, with its gradient), one
   global batch (8 responses, ragged lengths) is trained as: one single-process batch
   (the reference), 1, 2 and 4 uneven micro-batches in one process, and 2 DP ranks each
   with 2 micro-batches of uneven sizes, gradients summed over ranks. All must give the
   reference gradient to 1e-6 (float64). The step metrics reduced over micro-batches and
   ranks (sum/min/max all-reduce) must equal the single-batch metrics. One response is
   empty: it counts in N_seq wherever it lands.
2. Advantages with batch statistics (grpo std_scope=batch, rloo_normalize, the REINFORCE++
   and gdpo whitening, gpg's alpha; opo and pass_at_k as group-only controls): each rank
   computes its own groups (uneven: 1 and 3 groups) with ``dp_batch_sum`` and must give
   the single-process advantages of the whole batch; without the sum they would not.
3. Vocab-parallel log-prob / entropy on 2 TP ranks (a padded vocab, so the last shard
   has fewer real rows) equal the single-process full-vocab log_softmax + gather and
   entropy, and so do the hidden gradient and each rank's slice of the weight gradient.
4. ``all_gather_values`` of uneven (and empty) pieces is their concatenation in rank order, so
   the high-entropy threshold of a step split over DP ranks is the whole step's.
"""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_rl.algorithms.actor_loss import actor_loss
from moe_rl.algorithms.config import AlgorithmConfig
from moe_rl.algorithms.metrics import Metrics
from moe_rl.algorithms.advantages import compute_advantages
from moe_rl.algorithms.entropy_select import entropy_threshold
from moe_rl.parallel.collectives import all_gather_values
from moe_rl.train.global_counts import count_global, dp_batch_sum
from moe_rl.train.logprobs import token_logprobs_and_entropy

pytestmark = pytest.mark.distributed

WORLD = 2
D = torch.float64
B, T, H, V = 8, 7, 5, 11
LENS = [7, 2, 5, 0, 6, 3, 7, 4]  # response 3 is empty

CONFIGS = {
    "token-mean": dict(preset="grpo", kl_beta=0.0, loss_agg="token-mean"),
    "seq-mean-token-mean": dict(preset="grpo", kl_beta=0.0, loss_agg="seq-mean-token-mean"),
    "seq-mean-token-sum": dict(preset="grpo", kl_beta=0.0, loss_agg="seq-mean-token-sum"),
    "seq-mean-token-sum-norm": dict(preset="dr_grpo", max_response_len=T),
    "kl+tis+gspo_token": dict(preset="gspo_token", clip_low=0.05, clip_high=0.1, kl_beta=0.1, mismatch="tis"),
    "token-sum": dict(preset="grpo", kl_beta=0.0, loss_agg="token-sum"),
    "sapo+seq-tis": dict(preset="sapo", mismatch="seq-tis"),
    "vespo+tis": dict(preset="grpo", policy_loss="vespo", kl_beta=0.0, loss_agg="token-mean", mismatch="tis"),
    "kl-abs-st+seq-icepop": dict(preset="grpo", kl_beta=0.1, kl_estimator="abs", kl_straight_through=True,
                                 mismatch="seq-icepop"),
    "entropy-bonus+seq-mean-token-mean": dict(preset="grpo", kl_beta=0.0, entropy_coeff=0.3),
    "entropy-bonus+token-mean+kl": dict(preset="dapo", kl_beta=0.05, entropy_coeff=0.3),
}

# advantages: 4 groups of 3 responses, rank 0 holds group 0, rank 1 groups 1-3
ADV_GIDS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
ADV_LENS = [4, 0, 6, 2, 5, 6, 1, 3, 6, 5, 4, 2]
ADV_RANK_ROWS = [(0, 3), (3, 12)]
ADV_CONFIGS = {
    "grpo-batch-std": dict(preset="grpo", std_scope="batch"),
    "rloo-normalize": dict(preset="rloo", rloo_normalize=True),
    "reinforce_pp-gamma-kl": dict(preset="reinforce_pp", gamma=0.9),
    "reinforce_pp_baseline": dict(preset="reinforce_pp", advantage="reinforce_pp_baseline"),
    "gdpo": dict(preset="gdpo", reward_names=["acc", "fmt"], reward_weights=[1.0, 0.5]),
    "gpg": dict(preset="gpg"),
    "opo": dict(preset="opo"),
    "pass_at_k": dict(preset="pass_at_k"),
}
MICRO_SPLITS = {1: [8], 2: [3, 5], 4: [1, 2, 2, 3]}
DP_SPLITS = [[1, 2], [2, 3]]  # rank 0 holds 3 responses, rank 1 holds 5, each in 2 micro-batches


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, H, generator=g, dtype=D)
    tok = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[t < n for t in range(T)] for n in LENS])
    w0 = torch.randn(H, V, generator=g, dtype=D) * 0.3
    with torch.no_grad():
        lp0 = torch.log_softmax(x @ w0, -1).gather(-1, tok[..., None]).squeeze(-1)
    old = lp0 + 0.1 * torch.randn(B, T, generator=g, dtype=D)
    ref = lp0 - 0.2 * torch.rand(B, T, generator=g, dtype=D)
    roll = old + 0.3 * torch.randn(B, T, generator=g, dtype=D)
    adv = torch.randn(B, generator=g, dtype=D)[:, None].expand(B, T).clone()
    return dict(x=x, tok=tok, mask=mask, old=old, ref=ref, roll=roll, adv=adv), w0


def _grad(cfg, data, w0, parts, dp_group=None):
    """Sum of gradients over micro-batches ``parts`` (list of index ranges) of this rank."""
    w = w0.clone().requires_grad_()
    counts = count_global([data["mask"][a:b] for a, b in parts], dp_group=dp_group)
    metrics = Metrics()
    for a, b in parts:
        ls = torch.log_softmax(data["x"][a:b] @ w, -1)
        lp = ls.gather(-1, data["tok"][a:b, :, None]).squeeze(-1)
        ent = -(ls.exp() * ls).sum(-1)  # the policy's entropy, with its gradient (the entropy bonus uses it)
        loss, m = actor_loss(
            cfg, lp, data["old"][a:b], data["adv"][a:b], data["mask"][a:b], **counts.as_kwargs(),
            ref_logp_BT=data["ref"][a:b], rollout_logp_BT=data["roll"][a:b], entropy_BT=ent,
        )
        loss.backward()
        metrics.merge(m)
    return w.grad, metrics


def _ranges(sizes, offset=0):
    out, a = [], offset
    for s in sizes:
        out.append((a, a + s))
        a += s
    return out


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    group = dist.new_group(list(range(WORLD)))
    res = {}
    data, w0 = _batch()
    # 1. aggregation invariance
    for name, kw in CONFIGS.items():
        cfg = AlgorithmConfig(**kw)
        g_ref, m_ref = _grad(cfg, data, w0, [(0, B)])
        errs = {}
        for k, sizes in MICRO_SPLITS.items():
            g, _ = _grad(cfg, data, w0, _ranges(sizes))
            errs[f"micro{k}"] = (g - g_ref).abs().max().item()
        offset = 0 if rank == 0 else sum(DP_SPLITS[0])
        g, m = _grad(cfg, data, w0, _ranges(DP_SPLITS[rank], offset), dp_group=group)
        dist.all_reduce(g, group=group)
        errs["dp2"] = (g - g_ref).abs().max().item()
        packed = m.pack()
        dist.all_reduce(packed["sum"], group=group)
        dist.all_reduce(packed["min"], op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(packed["max"], op=dist.ReduceOp.MAX, group=group)
        got, want = m.unpack(packed).compute(), m_ref.compute()
        errs["metric_keys_equal"] = float(set(got) == set(want))
        errs["metrics"] = max(abs(got[k] - want[k]) for k in want)
        errs["grad_norm"] = g_ref.norm().item()
        res[name] = errs
    # 2. advantages with batch statistics: each rank its own groups, statistics summed over DP
    g = torch.Generator().manual_seed(3)
    n_adv = len(ADV_GIDS)
    gids = torch.tensor(ADV_GIDS)
    amask = torch.tensor([[t < n for t in range(T)] for n in ADV_LENS])
    acc = torch.randint(0, 3, (n_adv,), generator=g).to(D)
    fmt = torch.rand(n_adv, generator=g, dtype=D)
    pen = 0.01 * torch.randn(n_adv, T, generator=g, dtype=D)
    lo, hi = ADV_RANK_ROWS[rank]
    adv_res = {}
    for name, kw in ADV_CONFIGS.items():
        cfg = AlgorithmConfig(**kw)
        rewards = {"acc": acc, "fmt": fmt} if cfg.advantage == "gdpo" else acc
        part = {k: v[lo:hi] for k, v in rewards.items()} if isinstance(rewards, dict) else rewards[lo:hi]
        penalty = pen if cfg.kl_placement == "reward" and cfg.kl_beta > 0 else None
        want, _ = compute_advantages(cfg, rewards, gids, amask, token_penalty_BT=penalty)
        got, _ = compute_advantages(cfg, part, gids[lo:hi], amask[lo:hi], batch_sum=dp_batch_sum(group),
                                    token_penalty_BT=None if penalty is None else penalty[lo:hi])
        alone, _ = compute_advantages(cfg, part, gids[lo:hi], amask[lo:hi],
                                      token_penalty_BT=None if penalty is None else penalty[lo:hi])
        adv_res[name] = {"err": (got - want[lo:hi]).abs().max().item(),
                         "local_only_err": (alone - want[lo:hi]).abs().max().item(),
                         "scale": want.abs().max().item()}
    res["advantages"] = adv_res
    # 3. vocab-parallel log-probs on 2 TP ranks, padded vocab 13 -> 2 shards of 7 rows
    g = torch.Generator().manual_seed(2)
    Tn, Hn, Vpad, Vtrue = 23, 6, 14, 13
    h = torch.randn(Tn, Hn, generator=g, dtype=D)
    wfull = torch.randn(Vpad, Hn, generator=g, dtype=D)
    tgt = torch.randint(0, Vtrue, (Tn,), generator=g)
    g_lp, g_ent = torch.randn(Tn, generator=g, dtype=D), torch.randn(Tn, generator=g, dtype=D)
    hr, wr = h.clone().requires_grad_(), wfull.clone().requires_grad_()
    ls = torch.log_softmax((hr @ wr[:Vtrue].t()) / 0.8, -1)
    lp_r, ent_r = ls.gather(1, tgt[:, None]).squeeze(1), -(ls.exp() * ls).sum(-1)
    gh_r, gw_r = torch.autograd.grad((lp_r * g_lp).sum() + (ent_r * g_ent).sum(), (hr, wr))
    rows = Vpad // WORLD
    hs, ws = h.clone().requires_grad_(), wfull[rank * rows:(rank + 1) * rows].clone().requires_grad_()
    lp, ent = token_logprobs_and_entropy(hs, ws, tgt, temperature=0.8, tp_group=group, vocab_size=Vtrue,
                                         chunk_size=5)
    gh, gw = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (hs, ws))
    res["tp"] = {
        "logp": (lp - lp_r).abs().max().item(),
        "entropy": (ent - ent_r).abs().max().item(),
        "grad_hidden": (gh - gh_r).abs().max().item(),
        "grad_weight_shard": (gw - gw_r[rank * rows:(rank + 1) * rows]).abs().max().item(),
    }
    # 4. all_gather_values: uneven lengths (one rank empty in the second round), and the high-entropy
    #    threshold of a step held by two ranks = that of the whole step in one process
    g = torch.Generator().manual_seed(4)
    ent_all = torch.rand(5 + 9, generator=g, dtype=D)
    mine = ent_all[:5] if rank == 0 else ent_all[5:]
    got = all_gather_values(mine, group=group)
    empty_round = all_gather_values(mine if rank == 1 else mine[:0], group=group)
    res["gather"] = {"equal": bool(torch.equal(got, ent_all)), "empty_round": bool(torch.equal(empty_round, ent_all[5:])),
                     "threshold": entropy_threshold(got, 0.2), "threshold_ref": entropy_threshold(ent_all, 0.2),
                     "threshold_local": entropy_threshold(mine, 0.2)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("alg_dist")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [json.load(open(out / f"rank{r}.json")) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradient_invariant_to_micro_batches_and_dp(results, name):
    for rank in range(WORLD):
        e = results[rank][name]
        assert e["grad_norm"] > 1e-3  # the check is not vacuous
        for k in ("micro1", "micro2", "micro4", "dp2"):
            assert e[k] < 1e-6, (rank, name, k, e[k])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_metrics_reduce_exactly_over_micro_batches_and_dp(results, name):
    for rank in range(WORLD):
        e = results[rank][name]
        assert e["metric_keys_equal"] == 1.0
        assert e["metrics"] < 1e-9, (rank, name, e["metrics"])


def test_vocab_parallel_logprobs_match_full_vocab(results):
    for rank in range(WORLD):
        for k, v in results[rank]["tp"].items():
            assert v < 1e-10, (rank, k, v)


GROUP_ONLY = ("opo", "pass_at_k")  # no batch statistic: the same without the DP sum


@pytest.mark.parametrize("name", list(ADV_CONFIGS))
def test_advantage_batch_statistics_invariant_to_dp(results, name):
    for rank in range(WORLD):
        e = results[rank]["advantages"][name]
        assert e["scale"] > 0.1
        assert e["err"] < 1e-12, (rank, name, e)
        if name not in GROUP_ONLY:  # the check is not vacuous: this rank's statistics alone differ
            assert max(results[r]["advantages"][name]["local_only_err"] for r in range(WORLD)) > 1e-3, name


def test_all_gather_values_and_the_dp_entropy_threshold(results):
    for rank in range(WORLD):
        e = results[rank]["gather"]
        assert e["equal"] and e["empty_round"]
        assert e["threshold"] == e["threshold_ref"]
        assert e["threshold_local"] != e["threshold_ref"]  # without the gather each rank would pick its own
