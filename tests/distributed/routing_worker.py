"""Runs under torchrun (2 ranks): routing capture, replay and their self-checks, many checks
in ONE launch; results to a JSON file read by ``test_routing.py``.

    torchrun --nproc-per-node 2 tests/distributed/routing_worker.py OUT.json HF_DIR [DEEPSEEK_DIR]

HF_DIR is a tiny Qwen3-MoE (softmax router, every layer MoE); DEEPSEEK_DIR a tiny DeepSeek-V3
(sigmoid router with group-limited top-k) whose first two layers are dense, run at PP=2 only, so
pipeline stage 0 holds no MoE layer at all.

The batch comes from the embedded engine (HF transformers) on the same tiny checkpoint: an
fp32 engine, whose routes are the independent reference for the captured ones, and a bf16
engine (the same weights at inference precision), whose routes drift from the fp32 trainer's
and are what R3 replays.
"""

import contextlib
import json
import os
import sys
import time
import traceback

LAYOUTS = [{"ep": 1}, {"ep": 2}, {"tp": 2}, {"pp": 2}]


def log(msg):
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"[worker] {msg}", file=sys.stderr, flush=True)


def generate(hf_dir, dtype, seed):
    """Rank 0 samples 8 prompts x 2 with the embedded engine; every rank gets the samples."""
    import torch
    import torch.distributed as dist

    from moe_rl.rollout.config import EmbeddedEngineConfig
    from moe_rl.rollout.embedded.engine import EmbeddedEngine
    from moe_rl.rollout.types import RolloutRequest, SamplingParams

    box = [None]
    if dist.get_rank() == 0:
        g = torch.Generator().manual_seed(seed)
        lens = [4, 9, 6, 12, 3, 7, 10, 5]
        reqs = [RolloutRequest(torch.randint(3, 512, (n,), generator=g).tolist(),
                               SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True, n=2,
                                              sampling_seed=seed * 100 + i), group_id=i)
                for i, n in enumerate(lens)]
        eng = EmbeddedEngine(EmbeddedEngineConfig(model_path=hf_dir, dtype=dtype, max_running=16, weight_version="0"))
        box[0] = eng.generate(reqs)
    dist.broadcast_object_list(box, src=0)
    return box[0]


def microbatches(batch, groups, n_mb=2):
    """This DP rank's half of the batch rows as ``n_mb`` micro-batches."""
    from moe_rl.data import train_batch as tb

    per = batch.size // groups.dims.dp
    rows = list(range(groups.dp_rank * per, (groups.dp_rank + 1) * per))
    lens = batch.seq_lengths
    split = tb.split_rows([lens[i] for i in rows], n_mb)
    pad = groups.dims.tp if groups.dims.sp else 1
    return [tb.to_microbatch(batch, [rows[j] for j in part], pad_multiple=pad) for part in split]


def run_pass(built, mbs, groups, key, *, train=False):
    """Log-probs of ``mb["targets"]`` into ``mb[key]`` and the final hidden states into
    ``mb[key + "_hidden"]`` (last stage); with ``train`` also backward of sum(logp * mask)."""
    import torch

    from moe_rl.train.policy_head import emit_hidden_states, sequence_logprobs
    from moe_rl.train.schedule import forward_backward

    vocab = built.hf_config.vocab_size

    def loss_fn(hidden, mb):
        logp, _ = sequence_logprobs(hidden, built.module, mb["targets"], groups, vocab_size=vocab)
        mb[key] = logp.detach()
        mb[key + "_hidden"] = hidden.detach().clone()
        return (logp * mb["mask"]).sum() * (1.0 if train else 0.0), {}

    for mb in mbs:
        mb[key] = torch.zeros(mb["tokens"].shape)
    with emit_hidden_states(built.module), torch.set_grad_enabled(train):
        forward_backward(built.module, mbs, loss_fn, groups, forward_only=not train)


def gather_rows(batch, mbs, groups, key):
    """Every row's response log-probs (from the last stage) and the routes under ``key`` (every
    stage's layers), on every rank: {row: (logp [T], {layer: [n, K]})}."""
    import torch.distributed as dist

    from moe_rl.data import train_batch as tb

    local = {}
    for mb in mbs:
        r = mb.get(key)
        lp = tb.response_values(batch, mb, mb["old_logp"]) if "old_logp" in mb else None
        for b, i in enumerate(mb["rows"].tolist()):
            n = batch.seq_lengths[i]
            routes = {} if r is None else {l: r.experts_BSLK[b, :n, j].long().tolist()
                                           for j, l in enumerate(r.layer_ids)}
            local[i] = (lp[b, :len(batch.response_ids[i])].tolist() if lp is not None and groups.is_last_stage
                        else None, routes)
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, local)
    out = {}
    for part in box:
        for i, (lp, routes) in part.items():
            old_lp, old_routes = out.get(i, (None, {}))
            out[i] = (lp if lp is not None else old_lp, {**old_routes, **routes})
    return out


def engine_routes_table(samples, layer_ids):
    return {i: {l: s.routed_experts_NLK[:, j].long().tolist() for j, l in enumerate(layer_ids)}
            for i, s in enumerate(samples)}


def perturb_routers(routing, seed, scale):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, router in routing.routers:
            w = router.weight
            w.add_(torch.randn(w.shape, generator=g) * scale * float(w.std()))


def sets_equal_frac(a_rows, b_rows, layers):
    """Fraction of (row, position, layer) whose expert SETS differ."""
    diff = tot = 0
    for i in a_rows:
        for l in layers:
            for x, y in zip(a_rows[i][l], b_rows[i][l]):
                tot += 1
                diff += sorted(x) != sorted(y)
    return diff / max(tot, 1)


def layout_checks(lay, hf, hf_dir, batch_fp32, samples_fp32, rec):
    import torch
    import torch.distributed as dist

    from moe_rl.models import family_for
    from moe_rl.parallel import ParallelConfig, ParallelDims
    from moe_rl.parallel import groups as G
    from moe_rl.routing import RoutingConfig, RoutingSession, attach_engine_routes
    from moe_rl.train.model import build_model, load_hf_weights

    fam = family_for(hf.config)
    layer_ids = fam.moe_layer_ids(hf.config)
    E = fam.num_experts(hf.config)
    cfg = ParallelConfig(tensor_parallel=lay.get("tp", 1), pipeline_parallel=lay.get("pp", 1),
                         expert_parallel=lay.get("ep", 1))
    dims = ParallelDims.build(cfg, dist.get_world_size(), fam.shape(hf.config))
    rec["layout"] = dims.describe()
    groups = G.setup(dims)
    try:
        built = build_model(hf.config, groups)
        load_hf_weights(built, hf_dir, groups)
        built.module.eval()
        routing = RoutingSession(RoutingConfig(replay="r2"), [built.module], groups, hf.config)
        mbs = microbatches(batch_fp32, groups)
        attach_engine_routes(mbs, [s.routed_experts_NLK for s in samples_fp32], batch_fp32.seq_lengths,
                             layer_ids, num_experts=E)
        # 1. capture vs the fp32 engine's routes (HF forward), every position incl. the prompt
        with routing.old_pass(mbs):
            run_pass(built, mbs, groups, "old_logp")
        rows = gather_rows(batch_fp32, mbs, groups, "routes_old")
        rec["captured"] = {str(i): rows[i][1] for i in sorted(rows)}
        rec["capture_vs_engine_diff_frac"] = sets_equal_frac({i: rows[i][1] for i in rows},
                                                             engine_routes_table(samples_fp32, layer_ids), layer_ids)
        m = routing.metrics(mbs)
        rec["metrics_capture"] = {k: v for k, v in m.items() if "/layer_" not in k}
        rec["metric_layers"] = sorted({int(k.rsplit("_", 1)[1]) for k in m if "/layer_" in k})
        dump = routing.gather_routes(mbs)
        if dist.get_rank() == 0:  # the dump holds every real token once per layer, whatever the layout
            ref = {l: sorted(tuple(sorted(x)) for s in samples_fp32 for x in s.routed_experts_NLK[:, j].tolist())
                   for j, l in enumerate(layer_ids)}
            rec["dump_matches_engine"] = sorted(dump) == layer_ids and all(
                sorted(tuple(sorted(x)) for x in dump[l].tolist()) == ref[l] for l in layer_ids)
        # 2. R2: routers perturbed; a live pass flips, a replayed pass uses exactly the old routes
        perturb_routers(routing, seed=5, scale=0.6)
        with routing.new_pass(mbs):
            run_pass(built, mbs, groups, "live_logp")
        m = routing.metrics(mbs)
        rec["flip_live_after_perturb"] = m["routing/flip_frac/old_new"]
        first = f"routing/flip_frac/old_new/layer_{min(routing.moe_layer_ids)}"
        rec["flip_live_first_layer"] = m[first]
        with routing.train_pass(mbs), routing.capture(mbs, "routes_new", used=True):
            run_pass(built, mbs, groups, "replay_logp", train=True)
        m = routing.metrics(mbs)
        rec["flip_replayed"] = m["routing/flip_frac/old_new"]
        rec["any_flip_replayed"] = m["routing/any_layer_flip_frac/old_new"]
        rec["replay_mismatch_frac"] = m["routing/replay_mismatch_frac"]
        rec["replay_fallback_frac"] = m["routing/replay_fallback_frac"]
        # the same replayed pass, recording the routers' own choices: what they would have done
        with routing.train_pass(mbs), routing.capture(mbs, "routes_new"):
            run_pass(built, mbs, groups, "replay_logp")
        m = routing.metrics(mbs)
        rec["flip_choice_under_replay"] = m["routing/flip_frac/old_new"]
        rec["flip_choice_under_replay_first_layer"] = m[first]
        grads = {layer: float(r.weight.grad.abs().sum()) if r.weight.grad is not None else 0.0
                 for layer, r in routing.routers}
        box = [None] * dist.get_world_size()
        dist.all_gather_object(box, grads)  # every stage's routers
        rec["router_grad_abs_sum"] = {str(k): v for part in box for k, v in part.items()}
        rec["global_replay_registry"] = _registry_size()
        if lay == {"ep": 2}:
            ep2_checks(built, groups, routing, mbs, batch_fp32, rec)
        routing.close()
    finally:
        built = routing = None
        G.teardown()
        dist.barrier()


def _registry_size():
    from megatron.core.transformer.moe.router_replay import RouterReplay

    return len(RouterReplay.global_router_replay_instances)


def ep2_checks(built, groups, routing, mbs, batch, rec):
    """Outputs of a replayed pass equal a natural pass choosing the same experts; the
    self-check fires on routes a router never consumes; timings."""
    import copy

    import torch

    from moe_rl.routing import ReplayError
    from moe_rl.routing.layout import to_router_order

    one = [mbs[0]]
    with routing.train_pass(one):
        run_pass(built, one, groups, "replayed")
    # the natural pass: every router's logits pushed down by 1000 outside the replayed experts,
    # so its own top-k picks them; the logits AT those experts (hence the gate weights) are the
    # live ones, untouched
    r_old = one[0]["routes_old"]
    originals = []
    for layer, router in routing.routers:
        j = r_old.layer_ids.index(layer)
        idx_NK = to_router_order(r_old.experts_BSLK[:, :, j], tp_rank=groups.tp_rank, tp=groups.dims.tp,
                                 sp=groups.dims.sp).long()
        orig = router.gating

        def gating(x, _orig=orig, _idx=idx_NK):
            logits = _orig(x)
            flat = logits.reshape(-1, logits.shape[-1])
            keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, _idx, True)
            return torch.where(keep, flat, flat - 1000.0).reshape(logits.shape)

        router.gating = gating
        originals.append(router)
    try:
        run_pass(built, one, groups, "natural")
    finally:
        for router in originals:
            del router.gating
    mb = one[0]
    rec["replay_vs_natural_hidden_maxdiff"] = float((mb["replayed_hidden"] - mb["natural_hidden"]).abs().max())
    rec["replay_vs_natural_logp_maxdiff"] = float((mb["replayed"] - mb["natural"]).abs().max())
    with routing.new_pass(one):  # the live (unpatched, unreplayed) pass differs
        run_pass(built, one, groups, "live")
    rec["live_vs_replayed_logp_maxdiff"] = float((mb["replayed"] - mb["live"]).abs().max())
    one[0].pop("routes_new", None)

    # timings of a forward-only pass over both micro-batches
    def timed(ctx_fn, n=3):
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            with ctx_fn():
                run_pass(built, mbs, groups, "t")
            ts.append(time.perf_counter() - t0)
        for m in mbs:
            m.pop("routes_t", None)
        return sorted(ts)[n // 2]

    import contextlib

    rec["pass_s"] = {
        "plain": timed(contextlib.nullcontext),
        "capture": timed(lambda: routing.capture(mbs, "routes_t")),
        "replay": timed(lambda: routing.train_pass(mbs)),
    }
    routing.cfg.router_probs = False
    rec["pass_s"]["capture_no_probs"] = timed(lambda: routing.capture(mbs, "routes_t"))
    routing.cfg.router_probs = True
    routing.metrics(mbs)

    # adversarial 1: a router module swapped for a copy after replay was installed (routes go to
    # the stale object, which never runs): the consumption check must fire
    layer_obj = next(m for m in built.module.modules() if getattr(getattr(m, "mlp", None), "router", None)
                     is routing.routers[1][1])
    stale = layer_obj.mlp.router
    fresh = copy.copy(stale)  # same weights, its own hooks and no replay object: a rebuilt router
    for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
        setattr(fresh, name, type(getattr(stale, name))())
    fresh.router_replay = None
    layer_obj.mlp.router = fresh
    try:
        with routing.train_pass(mbs):
            run_pass(built, mbs, groups, "adv")
        rec["stale_router_error"] = None
    except ReplayError as e:
        rec["stale_router_error"] = str(e)
    finally:
        layer_obj.mlp.router = stale
    # adversarial 2: a router whose replay object was dropped after install
    saved = stale.router_replay
    stale.router_replay = None
    try:
        with routing.train_pass(mbs):
            run_pass(built, mbs, groups, "adv")
        rec["dropped_replay_error"] = None
    except ReplayError as e:
        rec["dropped_replay_error"] = str(e)
    finally:
        stale.router_replay = saved
    # adversarial 3: a replay object that is asked but routes live (a broken replay path): the
    # routers' output differs from the replayed experts (routers are perturbed, live != old)
    rr = routing.routers[2][1].router_replay

    def live_only(scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        rr.calls += 1
        return default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)

    rr.get_replay_topk = live_only
    try:
        with routing.train_pass(mbs):
            run_pass(built, mbs, groups, "adv")
        rec["live_replay_error"] = None
    except ReplayError as e:
        rec["live_replay_error"] = str(e)
    finally:
        del rr.get_replay_topk
    # adversarial 4: routes missing a layer of this stage
    r = mbs[0]["routes_old"]
    mbs[0]["routes_old"] = r.layers(r.layer_ids[1:])
    try:
        with routing.train_pass(mbs):
            pass
        rec["missing_layer_error"] = None
    except ValueError as e:
        rec["missing_layer_error"] = str(e)
    finally:
        mbs[0]["routes_old"] = r
    # the session still works after the failures
    with routing.train_pass(mbs), routing.capture(mbs, "routes_new", used=True):
        run_pass(built, mbs, groups, "after")
    m = routing.metrics(mbs)
    rec["flip_replayed_after_adversarial"] = m["routing/flip_frac/old_new"]


def r3_checks(hf, hf_dir, batch_bf16, samples_bf16, rec):
    """R3 at EP=2: rollout (bf16 engine) -> old (fp32 trainer) mismatch with and without R3, on
    the same batch and weights; the policy's replay does not touch a second model (reference)."""
    import torch
    import torch.distributed as dist

    from moe_rl.algorithms.mismatch import mismatch_weights
    from moe_rl.models import family_for
    from moe_rl.parallel import ParallelConfig, ParallelDims
    from moe_rl.parallel import groups as G
    from moe_rl.routing import RoutingConfig, RoutingSession, attach_engine_routes
    from moe_rl.train.model import build_model, load_hf_weights

    fam = family_for(hf.config)
    layer_ids = fam.moe_layer_ids(hf.config)
    dims = ParallelDims.build(ParallelConfig(expert_parallel=2), dist.get_world_size(), fam.shape(hf.config))
    groups = G.setup(dims)
    try:
        # built with Megatron's flag: its instances go to the global registry, the session takes
        # them out; the reference (flag on, no session) keeps its own there
        built = build_model(hf.config, groups, moe_enable_routing_replay=True)
        load_hf_weights(built, hf_dir, groups)
        ref = build_model(hf.config, groups, moe_enable_routing_replay=True)
        load_hf_weights(ref, hf_dir, groups)
        built.module.eval()
        ref.module.eval()
        rec["registry_before_session"] = _registry_size()
        routes_B = [s.routed_experts_NLK for s in samples_bf16]
        out = {}
        for mode in ("none", "r3", "r3_partial", "r3_partial_nocapture"):
            routing = RoutingSession(RoutingConfig(replay=mode[:2] if mode != "none" else mode,
                                                   capture=not mode.endswith("nocapture")), [built.module],
                                     groups, hf.config)
            ref_routing = RoutingSession(RoutingConfig(replay="none"), [ref.module], groups, hf.config)
            rec[f"registry_with_{mode}_session"] = _registry_size()
            mbs = microbatches(batch_bf16, groups)
            missing = [0, 5] if mode.startswith("r3_partial") else []  # rows the engine gave no routes for
            attach_engine_routes(mbs, [None if i in missing else r for i, r in enumerate(routes_B)],
                                 batch_bf16.seq_lengths, layer_ids, num_experts=fam.num_experts(hf.config))
            ref_mbs = microbatches(batch_bf16, groups)
            with routing.old_pass(mbs):
                with ref_routing.capture(ref_mbs, "routes_old"):  # the reference runs inside the policy's replay
                    run_pass(ref, ref_mbs, groups, "ref_logp")
                run_pass(built, mbs, groups, "old_logp")
            m = routing.metrics(mbs)
            rows = gather_rows(batch_bf16, mbs, groups, "routes_old")  # the old policy's own choices
            with routing.replay(mbs, "routes_rollout") if mode != "none" else contextlib.nullcontext(), \
                    routing.capture(mbs, "routes_used", used=True):
                run_pass(built, mbs, groups, "used_logp")
            used_rows = gather_rows(batch_bf16, mbs, groups, "routes_used")  # the experts the layers ran
            train = {}
            if mode.startswith("r3_partial"):  # a training pass: the unrouted rows replay the old pass's routes
                # an "update" of the routers first (the same on every rank), so live routing would differ
                from moe_rl.routing.capture import moe_routers

                routing.metrics(mbs)  # takes the replay counters of the passes above
                gen = torch.Generator().manual_seed(7)
                with torch.no_grad():
                    for _, router in moe_routers([built.module]):
                        router.weight.add_(torch.randn(router.weight.shape, generator=gen) * router.weight.std())
                with routing.train_pass(mbs), routing.capture(mbs, "routes_train", used=True):
                    run_pass(built, mbs, groups, "train_logp")
                tm = routing.metrics(mbs)
                train_rows = gather_rows(batch_bf16, mbs, groups, "routes_train")
                train = {"train_fallback": tm["routing/replay_fallback_frac"],
                         "train_mismatch": tm["routing/replay_mismatch_frac"],
                         "train_missing_vs_old_diff": sets_equal_frac(
                             {i: train_rows[i][1] for i in missing}, {i: rows[i][1] for i in missing}, layer_ids),
                         "train_routed_vs_engine_diff": sets_equal_frac(
                             {i: train_rows[i][1] for i in train_rows if i not in missing},
                             engine_routes_table(samples_bf16, layer_ids), layer_ids)}
            ref_rows = gather_rows(batch_bf16, ref_mbs, groups, "routes_old")
            old = torch.zeros_like(batch_bf16.rollout_logp_BT)
            for i, (lp, _) in rows.items():
                old[i, :len(lp)] = torch.tensor(lp)
            _, mm = mismatch_weights(old, batch_bf16.rollout_logp_BT, batch_bf16.mask_BT, "none")
            out[mode] = {"k3": mm.compute()["mismatch/k3"], "k1": mm.compute()["mismatch/k1"],
                         "flip_rollout_old": m["routing/flip_frac/rollout_old"],
                         "flip_rollout_old_first_layer": m[f"routing/flip_frac/rollout_old/layer_{layer_ids[0]}"],
                         "any_flip_rollout_old": m["routing/any_layer_flip_frac/rollout_old"],
                         "fallback": m.get("routing/replay_fallback_frac"),
                         "fallback_expected": sum(batch_bf16.seq_lengths[i] for i in missing)
                         / sum(batch_bf16.seq_lengths),
                         "mismatch": m.get("routing/replay_mismatch_frac"),
                         "ref_routes": {str(i): ref_rows[i][1] for i in sorted(ref_rows)},
                         "old_routes_vs_engine_diff": sets_equal_frac(
                             {i: rows[i][1] for i in rows}, engine_routes_table(samples_bf16, layer_ids), layer_ids),

                         "used_routes_vs_engine_diff": sets_equal_frac(
                             {i: used_rows[i][1] for i in used_rows if i not in missing},
                             engine_routes_table(samples_bf16, layer_ids), layer_ids), **train}
            routing.close()
            ref_routing.close()
        rec["r3"] = out
    finally:
        built = ref = routing = ref_routing = None
        G.teardown()
        dist.barrier()


def main():
    t_main = time.time()
    out_path, hf_dir = sys.argv[1], sys.argv[2]
    import torch
    import torch.distributed as dist
    import transformers

    from moe_rl.data import train_batch as tb
    from moe_rl.parallel import groups as G
    from moe_rl.parallel.cpu_platform import activate_cpu_mode

    torch.set_num_threads(1)
    activate_cpu_mode()
    G.init_distributed()
    t_start = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    t_ready = time.perf_counter()
    init_s = time.time() - t_main  # imports, CPU mode, process group, HF config
    samples_fp32 = generate(hf_dir, "float32", seed=1)
    samples_bf16 = generate(hf_dir, "bfloat16", seed=2)
    batch_fp32 = tb.from_samples(samples_fp32, torch.zeros(len(samples_fp32)))
    batch_bf16 = tb.from_samples(samples_bf16, torch.zeros(len(samples_bf16)))
    results = {"layouts": [], "engine_s": time.perf_counter() - t_ready, "imports_s": init_s,
               "worker_start": t_main}
    for lay in LAYOUTS:
        rec = {"spec": lay}
        t0 = time.perf_counter()
        log(f"layout {lay}")
        try:
            layout_checks(lay, hf, hf_dir, batch_fp32, samples_fp32, rec)
        except Exception:
            rec["error"] = traceback.format_exc()[-4000:]
        rec["seconds"] = time.perf_counter() - t0
        results["layouts"].append(rec)
    rec = {}
    t0 = time.perf_counter()
    log("r3")
    try:
        r3_checks(hf, hf_dir, batch_bf16, samples_bf16, rec)
    except Exception:
        rec["error"] = traceback.format_exc()[-4000:]
    rec["seconds"] = time.perf_counter() - t0
    results["r3"] = rec
    if len(sys.argv) > 3:
        ds_dir = sys.argv[3]
        log("deepseek_v3 pp2")
        rec = {"spec": {"pp": 2}}
        t0 = time.perf_counter()
        try:
            ds = transformers.AutoModelForCausalLM.from_pretrained(ds_dir, dtype=torch.float32).eval()
            samples_ds = generate(ds_dir, "float32", seed=3)
            batch_ds = tb.from_samples(samples_ds, torch.zeros(len(samples_ds)))
            layout_checks({"pp": 2}, ds, ds_dir, batch_ds, samples_ds, rec)
        except Exception:
            rec["error"] = traceback.format_exc()[-4000:]
        rec.pop("captured", None)
        rec["seconds"] = time.perf_counter() - t0
        results["deepseek_v3"] = rec
    results["total_s"] = time.perf_counter() - t_start + init_s
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(out_path + ".tmp", out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
