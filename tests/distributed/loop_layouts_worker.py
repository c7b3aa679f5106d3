"""Runs under torchrun (2 ranks): the RL loop at the virtual-pipeline and context-parallel
layouts, in ONE launch, results to a JSON file.

    torchrun --nproc-per-node 2 tests/distributed/loop_layouts_worker.py OUT.json WORK_DIR

Runs (each a fresh build of every part; the tiny Qwen3-MoE has 4 layers):
- plain: EP1 / PP1 (DP2), the reference;
- vpp: PP2 x VPP2 (one layer per model chunk, Megatron's interleaved schedule), saving a run
  checkpoint after every step;
- vpp_resumed: a new run directory holding only the vpp run's first checkpoint, resumed at
  the same layout (it runs the second step);
- cp: CP2 (each sequence split over both ranks; routes captured on both CP ranks' chunks).
Each run: 2 steps of 2 mini-batches, KL to a reference model in the loss (the reference
scored at the layout too), routing replay R3 (the engine's routes replayed in
the old-policy and training passes; under CP each rank replays its chunks' positions); its per-mini-batch records, and the weight probe's
trainer log-probs (``moe_rl.weights.probe.trainer_logprobs``) of the final policy on a fixed
batch of 7-token sequences (padded for CP inside).
"""

import json
import os
import shutil
import sys

BASE = ["model.tiny_family=qwen3_moe", "train.steps=2", "train.global_batch=16", "train.micro_batch=4",
        "train.seq_len=16", "train.seed=3", "optim.lr=3e-3", "optim.weight_decay=0.0", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=3", "loop.rollout_batch_size=32", "data.toy_task=max_digit", "data.toy_num_prompts=64",
        "algorithm.kl_beta=0.04", "algorithm.entropy_coeff=0.01", "algorithm.top_entropy_quantile=0.5",
        "routing.replay=r3", "rewards.rewards=[{name: correct, fn: 'moe_rl.data.toy_tasks:exact_answer_reward'}, "
        "{name: text, fn: 'loop_layouts_worker:text_hash_reward', weight: 0.0}]",
        "rewards.executor=serial", "rewards.progress=false", "metrics.progress=false", "checkpoint.save_at_end=false"]
VPP = ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"]
EVAL = ["eval.interval=1", "eval.num_prompts=16"]  # held-out evaluation of versions 0, 1, 2 (not in "epochs")
RPP = ["algorithm.preset=reinforce_pp", "algorithm.kl_beta=0.05", "algorithm.kl_target=0.002", "algorithm.kl_horizon=64",
       "train.steps=3"]
RUNS = {"plain": EVAL,
        "vpp": EVAL + VPP + ["checkpoint.interval=1", "checkpoint.save_hf=true"],
        "cp": EVAL + ["parallel.context_parallel=2"],
        "epochs": ["train.steps=1", "train.ppo_epochs=2"],
        # KL in the reward (REINFORCE++), the adaptive beta: plain, and PP2 x VPP2 resumed from step 1
        "rpp": RPP,
        "rpp_vpp": RPP + VPP + ["checkpoint.interval=1", "checkpoint.keep=0"]}
RESUMED = {"vpp": EVAL + VPP, "rpp_vpp": RPP + VPP}  # run again from the checkpoint of loop step 1


def text_hash_reward(sample) -> float:
    """A reward that tells responses apart (a hash of the text in [0, 1)), weight 0 in these runs: its
    held-out mean checks the evaluation's responses one by one against HF transformers'."""
    import zlib

    return (zlib.crc32(sample.response.encode()) % 1000) / 1000


def main():
    out_path, work = sys.argv[1], sys.argv[2]
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401  (before the CPU substitutions)

    from loop_worker import run_named  # noqa: E402  (this script's directory is on sys.path)
    from moe_rl.checkpoint import run_state as rs
    from moe_rl.parallel import groups as G
    from moe_rl.parallel.cpu_platform import activate_cpu_mode
    from moe_rl.train.trainer import Trainer
    from moe_rl.weights.probe import trainer_logprobs

    trainers = []
    init = Trainer.__init__

    def keep_trainer(self, *a, **k):
        trainers.append(self)
        init(self, *a, **k)

    Trainer.__init__ = keep_trainer

    torch.set_num_threads(1)
    activate_cpu_mode()
    G.init_distributed()
    res = {}

    def probe(name):
        tr = trainers[-1]
        tokens = torch.randint(0, tr.built.hf_config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
        res[name + "_probe"] = trainer_logprobs(tr.built, tr.groups, tokens)[:, :-1].tolist()

    def loop(name, overrides):
        run_named(res, name, BASE + overrides + [f"output_dir={os.path.join(work, name)}"], after=probe)

    for name, overrides in RUNS.items():
        loop(name, overrides)
        if name in RESUMED:
            src, dst = rs.checkpoint_root(os.path.join(work, name)), rs.checkpoint_root(os.path.join(work, name + "_resumed"))
            if dist.get_rank() == 0:
                res[name + "_checkpoints"] = sorted(os.listdir(src)) if os.path.isdir(src) else []
                if os.path.isdir(rs.step_dir(src, 1)):
                    shutil.copytree(rs.step_dir(src, 1), rs.step_dir(dst, 1))
            dist.barrier()
            loop(name + "_resumed", RESUMED[name] + ["checkpoint.resume=true"])
        if name == "vpp":  # evaluate only (train.steps=0): the finished run's policy, from its newest checkpoint
            run_named(res, "vpp_eval_only", BASE + EVAL + VPP + ["train.steps=0", f"output_dir={os.path.join(work, name)}"])
            if dist.get_rank() == 0:  # (its eval.jsonl, rewritten in place: res["vpp_eval_only_eval"])
                res["vpp_metrics_again"] = len(open(os.path.join(work, name, "metrics.jsonl")).readlines())
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
