"""Runs under torchrun (2 ranks): several short RL runs in ONE launch, results to a JSON file.

    torchrun --nproc-per-node 2 tests/distributed/loop_worker.py OUT.json WORK_DIR SCENARIO [SCENARIO ...]

Scenarios (each a fresh build of every part, in this process):
- sync: GRPO with KL to a reference (identical at step 0), TIS, 2 mini-batches per step,
  responses of up to 3 tokens; the metrics of every optimizer step.
- layouts: the same 2 steps at EP2, EP1 (DP2) and TP2+SP (KL off); their metrics; EP2 also
  evaluates every version on 8 held-out prompts with the in-process engines, and saves a final
  checkpoint with the policy's HF weights in it (checkpoint.save_hf).
- uninterrupted: the kill-and-resume test's reference run (``resume_worker.CONFIG``), run
  first so the process is as fresh as the killed and resumed launches; its final weights.
- ckpt: ``run_checkpoint_checks.checkpoint_checks``.
- nonfinite: from step 1 on every advantage is NaN (injected), so every gradient is: those
  steps are skipped and counted, and the run stops after loop.max_consecutive_skipped=2.
- servers: ``rollout.backend=sglang`` with ``rollout.client.server_urls`` naming a running
  server (the embedded engine's, standing in for SGLang: same HTTP protocol) that holds other
  weights than the policy's (another random tiny model), sync mode,
  weights over the distributed transport (gloo); the loop must not start a server itself. It
  evaluates every version on the held-out prompts through the server, as EP2 does in-process.
- routing: 2 steps with routing replay R3 (the embedded engines' routes in the old-policy and
  training passes; bf16 engines, inference precision), routes dumped every step (the test
  runs ``tools/routing_report.py`` on them).
- dynamic: DAPO dynamic sampling (at most 2 extra rounds) on the untrained model, whose
  groups are mostly all-wrong: extra rounds run and the batch is completed at the cap.
- async: the quickstart task (max of four digits, answered in one token) for 12 steps in
  async mode: the engine as its own server process, weights over HTTP (tensor transport).
"""

import json
import os
import sys
import traceback

BASE = ["model.tiny_family=qwen3_moe", "train.steps=2", "train.global_batch=16", "train.micro_batch=4",
        "train.seq_len=16", "train.seed=3", "optim.lr=3e-3", "optim.weight_decay=0.0", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=3", "loop.rollout_batch_size=32", "data.toy_task=max_digit", "data.toy_num_prompts=64",
        "rewards.rewards=[{name: correct, fn: 'moe_rl.data.toy_tasks:exact_answer_reward'}]",
        "rewards.executor=serial", "rewards.progress=false", "metrics.progress=false", "checkpoint.save_at_end=false"]
LAYOUTS = {"ep2": ["parallel.expert_parallel=2"], "ep1": [], "tp2": ["parallel.tensor_parallel=2"]}
EVAL = ["eval.interval=1", "eval.num_prompts=8"]  # held-out evaluation in "ep2" (in-process) and "servers" (HTTP)
HF_AT_END = ["checkpoint.save_at_end=true", "checkpoint.save_hf=true"]  # "ep2": a final checkpoint with HF weights


def run_named(res: dict, name: str, args: list, after=None) -> None:
    """One RL run of a launch (collective): its records go to ``res[name]`` (and its held-out
    evaluations, when it wrote eval.jsonl, to ``res[name + "_eval"]``), or its traceback to
    ``res[name + "_error"]`` so the launch goes on with the next run; ``after(name)`` runs on
    success, before the run's process groups are torn down."""
    import torch.distributed as dist

    from moe_rl.config import load_config
    from moe_rl.config.run import RunConfig
    from moe_rl.launch import run_loop
    from moe_rl.parallel import groups as G

    cfg = load_config(RunConfig, None, args)
    if dist.get_rank() == 0:
        print(f"[worker] {name}", file=sys.stderr, flush=True)
    try:
        res[name] = run_loop(cfg)
        evals = os.path.join(cfg.output_dir, "eval.jsonl")
        if dist.get_rank() == 0 and os.path.exists(evals):
            res[name + "_eval"] = [json.loads(line) for line in open(evals)]
        if after is not None:
            after(name)
    except Exception:
        res[name + "_error"] = traceback.format_exc()[-4000:]
        print(res[name + "_error"], file=sys.stderr, flush=True)
    G.teardown()
    dist.barrier()


def main():
    out_path, work, scenarios = sys.argv[1], sys.argv[2], sys.argv[3:]
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401  (before the CPU substitutions)

    from moe_rl.config import load_config
    from moe_rl.config.run import RunConfig
    from moe_rl.launch import run_loop
    from moe_rl.parallel import groups as G
    from moe_rl.parallel.cpu_platform import activate_cpu_mode

    torch.set_num_threads(1)
    activate_cpu_mode()
    G.init_distributed()
    res = {}

    def loop(name, overrides):
        run_named(res, name, BASE + overrides + [f"output_dir={os.path.join(work, name)}"])

    for sc in scenarios:
        if sc == "uninterrupted":
            from resume_worker import CONFIG, capture_engines

            engines = capture_engines()
            run_dir = os.path.join(work, "uninterrupted")
            cfg = load_config(RunConfig, None, CONFIG + [f"output_dir={run_dir}"])
            res["uninterrupted"] = run_loop(cfg)
            if dist.get_rank() == 0:
                torch.save({k: v.clone() for k, v in engines[-1].model.state_dict().items()},
                           os.path.join(work, "uninterrupted.pt"))
            G.teardown()
            dist.barrier()
        elif sc == "ckpt":
            from moe_rl.models.tiny import save_tiny_hf
            from run_checkpoint_checks import checkpoint_checks

            hf = os.path.join(work, "ckpt_hf")
            if dist.get_rank() == 0:
                save_tiny_hf("qwen3_moe", hf, seed=0)
            dist.barrier()
            res["ckpt"] = checkpoint_checks(hf, os.path.join(work, "ckpt"))
            if "error" in res["ckpt"]:
                res["ckpt_error"] = res["ckpt"]["error"]
            G.teardown()
            dist.barrier()
        elif sc == "sync":
            loop("sync", ["parallel.expert_parallel=2", "algorithm.kl_beta=0.04", "algorithm.mismatch=tis"])
        elif sc == "nonfinite":
            from moe_rl import loop as L
            from moe_rl.train.trainer import RunStopped, Trainer

            real_step = Trainer.step

            def poisoned(self, mbs):
                if self.state.step >= 1:
                    for mb in mbs:
                        mb["adv"] = torch.full_like(mb["adv"], float("nan"))
                return real_step(self, mbs)

            Trainer.step = poisoned
            records = []
            real_log = L.RLLoop.log

            def keep_log(self, *a):
                out = real_log(self, *a)
                records.extend(out)
                return out

            L.RLLoop.log = keep_log
            cfg = load_config(RunConfig, None, BASE + [
                "parallel.expert_parallel=2", "algorithm.kl_beta=0.0", "train.steps=6", "train.global_batch=32",
                "checkpoint.interval=1", "loop.max_consecutive_skipped=2", f"output_dir={os.path.join(work, 'nonfinite')}"])
            try:
                run_loop(cfg)
                res["nonfinite_error"] = "the run did not stop"
            except RunStopped as e:
                res["nonfinite"] = {"message": str(e), "records": records}
            Trainer.step, L.RLLoop.log = real_step, real_log
            G.teardown()
            dist.barrier()
        elif sc == "servers":
            from moe_rl.launch import ensure_model, model_dir
            from moe_rl.rollout import http_rollout

            overrides = ["parallel.expert_parallel=2", "algorithm.kl_beta=0.0", "weights.transport=distributed",
                         "rollout.backend=sglang"] + EVAL
            cfg = load_config(RunConfig, None, BASE + overrides + [f"output_dir={os.path.join(work, 'servers')}"])
            box = [None]
            if dist.get_rank() == 0:  # the server holds other weights than the policy's
                import shutil

                from moe_rl.launch import tiny_vocab
                from moe_rl.models.tiny import save_tiny_hf

                ensure_model(cfg, model_dir(cfg))
                other = save_tiny_hf("qwen3_moe", os.path.join(work, "servers_other_hf"), seed=7,
                                     vocab_size=tiny_vocab(cfg))
                for f in os.listdir(model_dir(cfg)):
                    if f.startswith(("tokenizer", "special_tokens")):
                        shutil.copy(os.path.join(model_dir(cfg), f), other)
                server, url = http_rollout.start_engine_server(cfg, other)
                box[0] = url
            dist.broadcast_object_list(box, src=0)
            started = []
            real_start = http_rollout.start_servers
            http_rollout.start_servers = lambda *a: started.append(a) or real_start(*a)
            loop("servers", overrides + [f"rollout.client.server_urls=[{box[0]}]"])
            http_rollout.start_servers = real_start
            res["servers_started"] = len(started)
            if dist.get_rank() == 0:
                server.terminate()
                server.wait(timeout=30)
        elif sc == "async":
            loop("async", ["parallel.expert_parallel=2", "algorithm.kl_beta=0.0", "loop.mode=async",
                           "weights.transport=tensor", "train.steps=12", "train.seed=1", "rollout.max_new_tokens=1",
                           "rollout.n_samples_per_prompt=8", "loop.rollout_batch_size=128", "train.global_batch=128",
                           "train.micro_batch=64", "data.toy_num_prompts=2048"])
        elif sc == "dynamic":
            loop("dynamic", ["parallel.expert_parallel=2", "algorithm.kl_beta=0.0", "algorithm.dynamic_sampling=true",
                             "algorithm.max_extra_rounds=2"])
        elif sc == "routing":
            loop("routing", ["parallel.expert_parallel=2", "algorithm.kl_beta=0.0", "routing.replay=r3",
                             "routing.dump_every=1", "rollout.embedded.dtype=bfloat16"])
        elif sc == "layouts":
            for name, lay in LAYOUTS.items():
                loop(name, lay + ["algorithm.kl_beta=0.0"] + (EVAL + HF_AT_END if name == "ep2" else []))
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(res, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
