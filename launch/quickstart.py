"""Quickstart: a tiny MoE on Megatron-Core, parity-checked against transformers, trained a
few steps through Megatron's real schedule, DDP and distributed optimizer.

    torchrun --nproc-per-node 2 launch/quickstart.py [launch/configs/quickstart.yaml] [key=value ...]

(``bash launch/quickstart.sh`` installs everything and runs exactly this on CPU.)
"""

from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    import torch
    import torch.distributed as dist
    import transformers  # before the CPU substitutions (it inspects torch.cuda at import)

    from moe_rl.config import ConfigError, load_config
    from moe_rl.config.run import RunConfig
    from moe_rl.models import family_for
    from moe_rl.models.tiny import ensure_tiny_hf
    from moe_rl.parallel import ParallelDims
    from moe_rl.parallel import groups as G
    from moe_rl.parallel.cpu_platform import activate_cpu_mode
    from moe_rl.train.cross_entropy import step_loss, token_cross_entropy
    from moe_rl.train.model import build_model, load_hf_weights
    from moe_rl.train.optimizer import optimizer_step, wrap_for_training
    from moe_rl.train.parity import LOGIT_TOLERANCE, logit_parity
    from moe_rl.train.schedule import forward_backward

    path = argv[0] if argv and not "=" in argv[0] else None
    overrides = argv[1:] if path else argv
    try:
        cfg = load_config(RunConfig, path, overrides)
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if cfg.algorithm != load_config(RunConfig, None, []).algorithm:
        # a knob that is read and silently not used is worse than an error
        print("config error: algorithm.* is not used by the quickstart yet (it trains with "
              "cross-entropy until the RL loop exists); remove it", file=sys.stderr)
        return 2
    on_cpu = not torch.cuda.is_available()
    if on_cpu:
        torch.set_num_threads(1)
        activate_cpu_mode()
    G.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()

    def say(*a):
        if rank == 0:
            print(*a, flush=True)

    hf_dir = cfg.model.hf_dir
    if hf_dir is None:
        hf_dir = os.path.join(cfg.output_dir, "hf_tiny_" + cfg.model.tiny_family)
        if rank == 0:  # a directory without its weights (an interrupted write) is rebuilt
            ensure_tiny_hf(cfg.model.tiny_family, hf_dir, seed=cfg.train.seed)
        dist.barrier()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    try:
        dims = ParallelDims.build(cfg.parallel, world, family_for(hf.config).shape(hf.config))
    except ValueError as e:
        say(f"layout error: {e}")
        return 2
    groups = G.setup(dims, seed=cfg.train.seed)
    say(f"[moe_rl] {hf.config.model_type}: {hf.config.num_hidden_layers} layers, "
        f"{getattr(hf.config, 'num_experts', 0)} experts, layout {dims.describe()}, "
        f"{'CPU/gloo' if on_cpu else 'GPU/nccl'}")

    par = logit_parity(hf, hf_dir, groups)
    say(f"[parity] max |logit diff| vs transformers = {par['max_abs_diff']:.2e} "
        f"(logits up to {par['max_abs_logit']:.2f}, tolerance {LOGIT_TOLERANCE:g})")

    # Training: a learnable toy language (arithmetic progressions mod V), token-mean CE over
    # the global number of tokens of each step.
    built = build_model(hf.config, groups, params_dtype=getattr(torch, cfg.model.params_dtype),
                        moe_aux_loss_coeff=cfg.train.moe_aux_loss_coeff)
    load_hf_weights(built, hf_dir, groups)
    state = wrap_for_training(built.module, cfg.optim, groups)
    state.model.train()
    t = cfg.train
    if t.global_batch % (dims.dp * t.micro_batch):
        say(f"train.global_batch ({t.global_batch}) must be divisible by data-parallel "
            f"({dims.dp}) x train.micro_batch ({t.micro_batch})")
        return 2
    V = hf.config.vocab_size
    device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(t.seed)
    per_rank = t.global_batch // dims.dp
    for step in range(1, t.steps + 1):
        start = torch.randint(3, V, (t.global_batch, 1), generator=g)
        stride = torch.randint(1, 7, (t.global_batch, 1), generator=g)
        seqs = 3 + (start + stride * torch.arange(t.seq_len + 1)) % (V - 3)
        mine = seqs[groups.dp_rank * per_rank:(groups.dp_rank + 1) * per_rank].to(device)
        n_tokens = float(t.global_batch * t.seq_len)
        mbs = [{"tokens": mine[i:i + t.micro_batch, :-1], "labels": mine[i:i + t.micro_batch, 1:]}
               for i in range(0, per_rank, t.micro_batch)]

        t0 = time.perf_counter()
        out = forward_backward(state.model, mbs, token_cross_entropy(n_tokens), groups)
        m = optimizer_step(state)
        loss = step_loss(out, groups)
        say(f"[train] step {step}/{t.steps} loss={loss:.4f} grad_norm={m['train/grad_norm']:.4f} "
            f"lr={m['train/lr']:.2e} time={time.perf_counter() - t0:.2f}s")
    G.teardown()
    dist.barrier()
    dist.destroy_process_group()
    ok = par["max_abs_diff"] <= LOGIT_TOLERANCE
    say(f"[moe_rl] done: parity {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
