"""Runs under torchrun (2 ranks): one RL run of the kill-and-resume test, optionally SIGKILLed.

    torchrun --nproc-per-node 2 tests/distributed/resume_worker.py RUN_DIR KILL WEIGHTS_OUT

KILL is "none" or "<point>:<step>": the whole job (both ranks and torchrun) is SIGKILLed at
that point of that loop step, as a machine failure would:
- rollout: while generating the step's samples;
- train: inside the optimizer step of the first mini-batch, after the update was applied;
- sync: after the new weights reached the engines, before the step's metrics are written;
- ckpt_write: inside the checkpoint write of that step, after every rank wrote its shards,
  before the directory is published (a .tmp- directory remains);
- ckpt_marker: after the checkpoint directory was renamed into place, before its marker.
A run that finishes writes rank 0's engine weights (the final policy, HF layout) to WEIGHTS_OUT.
"""

import os
import signal
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # tests/launcher.py

CONFIG = ["model.tiny_family=qwen3_moe", "parallel.expert_parallel=2", "train.steps=6", "train.global_batch=16",
          "train.micro_batch=4", "train.seq_len=16", "train.seed=5", "optim.lr=3e-3", "optim.weight_decay=0.01",
          "rollout.n_samples_per_prompt=4", "rollout.max_new_tokens=2", "loop.rollout_batch_size=32",
          "algorithm.kl_beta=0.02", "data.toy_task=max_digit", "data.toy_num_prompts=64",
          "rewards.rewards=[{name: correct, fn: 'moe_rl.data.toy_tasks:exact_answer_reward'}]",
          "rewards.executor=serial", "rewards.progress=false", "metrics.progress=false",
          "checkpoint.interval=2", "checkpoint.keep=3"]


def capture_engines() -> list:
    """Keep a reference to every in-process engine the loop builds (their weights are the
    final policy, HF layout, once a run ends)."""
    from moe_rl.rollout.in_process import InProcessRollout

    engines = []
    init = InProcessRollout.__init__

    def keep_engine(self, cfg, engine, *a, **k):
        engines.append(engine)
        init(self, cfg, engine, *a, **k)

    InProcessRollout.__init__ = keep_engine
    return engines


def main():
    run_dir, kill, weights_out = sys.argv[1], sys.argv[2], sys.argv[3]
    import torch
    import torch.distributed as dist
    import transformers  # noqa: F401  (before the CPU substitutions)

    from moe_rl import loop
    from moe_rl.checkpoint import run_state as rs
    from moe_rl.config import load_config
    from moe_rl.config.run import RunConfig
    from moe_rl.launch import run_loop
    from moe_rl.parallel import groups as G
    from moe_rl.parallel.cpu_platform import activate_cpu_mode
    from moe_rl.rollout.in_process import InProcessRollout
    from moe_rl.train.trainer import Trainer

    torch.set_num_threads(1)
    activate_cpu_mode()
    G.init_distributed()
    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, (os.getpid(), os.getppid()))

    def die(where):
        """SIGKILL every process of the job: torchrun, the ranks and what they started
        (Megatron's checkpoint writer keeps a spawned multiprocessing Manager per rank)."""
        if dist.get_rank() == 0:
            from launcher import _children

            print(f"[worker] SIGKILL {where}", file=sys.stderr, flush=True)
            agent = pids[0][1]
            for pid in [agent] + [p for p in _children(agent) if p != os.getpid()]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.kill(os.getpid(), signal.SIGKILL)
        else:
            import time
            time.sleep(60)  # rank 0 kills us

    # every hook point must exist whichever one this run kills at, so that a refactor that
    # moves one breaks the test on every seed, not only on the seeds that draw it
    hooks = [(InProcessRollout, "generate"), (Trainer, "step"),
             (InProcessRollout, "sync_weights"), (rs, "os"), (rs, "write_file"), (rs, "MARKER")]
    missing = [f"{getattr(o, '__name__', o)}.{a}" for o, a in hooks if not hasattr(o, a)]
    assert not missing, f"kill hooks point at what no longer exists: {missing}"
    point, at = (kill.split(":") + ["-1"])[:2]
    at = int(at)
    current = {"step": -1}
    step_fn = loop.RLLoop.step

    def step(self, s):
        current["step"] = s
        return step_fn(self, s)

    loop.RLLoop.step = step
    engines = capture_engines()
    if point == "rollout":
        gen = InProcessRollout.generate

        def generate(self, s, rnd, prompts):
            if s == at:
                die(f"during the rollout of step {s}")
            return gen(self, s, rnd, prompts)

        InProcessRollout.generate = generate
    elif point == "train":
        tstep = Trainer.step

        def train_step(self, mbs):
            m = tstep(self, mbs)
            if current["step"] == at:
                die(f"inside the optimizer step of step {at}")
            return m

        Trainer.step = train_step
    elif point == "sync":
        sync = InProcessRollout.sync_weights

        def sync_weights(self, version):
            sync(self, version)
            if version == at + 1:
                die(f"after the weight sync of step {at}")

        InProcessRollout.sync_weights = sync_weights
    elif point == "ckpt_write":
        rename = rs.os.rename

        class _OS:
            def __getattr__(self, name):
                return getattr(os, name)

            @staticmethod
            def rename(src, dst):
                if dst.endswith(f"step_{at + 1:08d}"):
                    die(f"in the checkpoint write after step {at}, before its rename")
                return rename(src, dst)

        rs.os = _OS()
    elif point == "ckpt_marker":
        write = rs.write_file

        def write_file(path, fill):
            if path.endswith(rs.MARKER) and f"step_{at + 1:08d}" in path:
                die(f"in the checkpoint write after step {at}, before its marker")
            return write(path, fill)

        rs.write_file = write_file

    cfg = load_config(RunConfig, None, CONFIG + [f"output_dir={run_dir}"])
    run_loop(cfg)
    if dist.get_rank() == 0:
        torch.save({k: v.clone() for k, v in engines[-1].model.state_dict().items()}, weights_out)
    G.teardown()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
