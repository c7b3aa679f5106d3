"""Run checkpoints of a tiny Qwen3-MoE at EP2 with the distributed optimizer, on 2 gloo ranks
(called by ``loop_worker.py``, scenario "ckpt"; returns a dict of results).

- roundtrip: 2 steps, save, 2 more steps; a fresh model + optimizer loaded from the save runs
  the same 2 steps: losses and grad norms must be bitwise equal (Adam's per-parameter step
  included: with one shared step tensor the bias correction drifts after the first step).
- partial: a save interrupted before its rename (a .tmp- directory) and a directory without
  its completion marker are reported as partial, never as the newest checkpoint.
- reshard: the EP2 save loads into the model at TP2 (another layout); logits agree.
"""

import json
import os
import sys
import traceback


def checkpoint_checks(hf_dir, work):
    import torch
    import torch.distributed as dist
    import transformers

    from moe_rl.checkpoint import run_state as rs
    from moe_rl.models import family_for
    from moe_rl.parallel import ParallelConfig, ParallelDims
    from moe_rl.parallel import groups as G
    from moe_rl.train.config import OptimConfig
    from moe_rl.train.cross_entropy import step_loss, token_cross_entropy
    from moe_rl.train.model import build_model, load_hf_weights
    from moe_rl.train.optimizer import optimizer_step, wrap_for_training
    from moe_rl.train.parity import megatron_logits, random_tokens
    from moe_rl.train.schedule import forward_backward

    rank = dist.get_rank()
    hf_cfg = transformers.AutoConfig.from_pretrained(hf_dir)
    shape = family_for(hf_cfg).shape(hf_cfg)
    ep2 = ParallelDims.build(ParallelConfig(expert_parallel=2), 2, shape)
    res = {}
    V = hf_cfg.vocab_size

    def fresh(dims):
        groups = G.setup(dims, seed=7)
        built = build_model(hf_cfg, groups)
        load_hf_weights(built, hf_dir, groups)
        st = wrap_for_training(built.module, OptimConfig(lr=3e-3, weight_decay=0.01, clip_grad=1.0), groups)
        st.model.train()
        return groups, built, st

    def steps(groups, st, first, n):
        out = []
        for s in range(first, first + n):
            toks = random_tokens(V, 4, 17, seed=100 + s)
            mine = toks[groups.dp_rank * 2:(groups.dp_rank + 1) * 2]
            mbs = [{"tokens": mine[i:i + 1, :-1], "labels": mine[i:i + 1, 1:]} for i in range(2)]
            fb = forward_backward(st.model, mbs, token_cross_entropy(4 * 16.0), groups)
            m = optimizer_step(st)
            out.append([step_loss(fb, groups), m["train/grad_norm"]])
        return out

    root = os.path.join(work, "checkpoints")
    try:
        groups, built, st = fresh(ep2)
        steps(groups, st, 0, 2)
        rs.save(root, 2, train_state=st, built=built, groups=groups,
                run_state={"model": rs.model_identity(hf_cfg), "sampler": {"epoch": 0, "position": 8}},
                config_text="a: 1\n", keep=2)
        res["uninterrupted"] = steps(groups, st, 2, 2)
        del built, st
        G.teardown()
        groups, built, st = fresh(ep2)
        state = rs.load(rs.step_dir(root, 2), train_state=st, built=built, groups=groups)
        toks = [random_tokens(V, 2, 16, seed=5)]
        ref = megatron_logits(built, toks, groups)  # the saved weights at EP2
        ref = ref[0] if ref else None
        st.model.train()
        res["resumed"] = steps(groups, st, 2, 2)
        res["state"] = {k: state[k] for k in ("step", "optimizer_step", "sampler")}
        res["steps_distinct"] = len({id(s["step"]) for o in rs._distributed_optimizers(st.optimizer)
                                     for s in o.optimizer.state.values()})
        res["num_params_state"] = sum(len(o.optimizer.state) for o in rs._distributed_optimizers(st.optimizer))
        # a later save interrupted before the rename, one interrupted before its marker
        if rank == 0:
            os.makedirs(os.path.join(root, ".tmp-step_00000006", "model_optim"))
            os.makedirs(os.path.join(root, "step_00000005", "model_optim"))
            with open(os.path.join(root, "step_00000005", rs.RUN_STATE), "w") as f:
                json.dump({"step": 5}, f)
        dist.barrier()
        found = rs.scan(root)
        res["found"] = {"complete": [s for s, _ in found.complete], "partial": [os.path.basename(p) for p in found.partial]}
        # the EP2 model part at TP2 (model only: another layout of the same weights)
        del built, st
        G.teardown()
        tp2 = ParallelDims.build(ParallelConfig(tensor_parallel=2), 2, shape)
        groups = G.setup(tp2, seed=7)
        built = build_model(hf_cfg, groups)
        from megatron.core import dist_checkpointing

        sd = dist_checkpointing.load({"model": built.module.sharded_state_dict()},
                                     os.path.join(rs.step_dir(root, 2), "model_optim"))
        built.module.load_state_dict(sd["model"])
        other = megatron_logits(built, toks, groups)
        if other and ref is not None:
            res["reshard_max_diff"] = float((other[0] - ref).abs().max())
        del built
        G.teardown()
    except Exception:
        res["error"] = traceback.format_exc()[-4000:]
        print(res["error"], file=sys.stderr, flush=True)
    return res
