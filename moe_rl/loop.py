"""The RL driver: one pass of :meth:`RLLoop.step` is one policy version, in eight stages.

    (1) prompts -> (2) rollout -> (3) rewards -> (4) advantages -> (5) log-probs
    -> (6) loss + optimizer step(s) -> (7) weight sync -> (8) next rollout

``sync`` mode runs them in turn: the rollout of step k uses the weights of step k exactly.
``async`` mode (``RLLoop.step`` is the same; only stage 2 differs) hands stage 8 to a
background thread that generates step k+1's batch on the engine server while the trainer
runs stages 3-7 of step k, so a sample is at most ``loop.max_staleness`` versions old
(``rollout/staleness_mean``); the mismatch axis of the algorithm corrects for it.

Differences from the papers' loops, and why:
- old-policy log-probs are recomputed by the trainer once per rollout batch (stage 5), not
  taken from the engine: the engine's own log-probs (``rollout_logp``) only feed the
  mismatch correction and its metrics. With ``train.ppo_epochs`` > 1 every pass after the
  first trains on the same batch with those same old log-probs (PPO's epochs, GRPO's mu).
- DAPO dynamic sampling draws extra rounds of prompts (at most ``max_extra_rounds``); when
  the cap is hit the batch is completed with non-informative groups (zero advantage), so
  every step trains the same number of responses and the step's shapes stay fixed.
- KL in the reward (``algorithm.kl_placement=reward``) is scored in stage 4, on the whole batch,
  before stage 5's micro-batches exist; its policy log-probs route live, as the reference's do,
  even under R3/R2 (replaying there would need the trainer's whole-batch scoring to carry routes).

Held-out evaluation (``moe_rl/evaluation.py``, ``eval.interval``) runs before a step's
rollout with the weights that rollout uses, and once more after the last step.

The stages live with their components: rollout and sync in ``rollout/in_process.py`` (an
engine inside every rank) or ``rollout/http_rollout.py`` (engine servers: the embedded one
or SGLang), rewards in ``rewards/scoring.py``, log-probs and steps in ``train/trainer.py``,
the MoE routers' capture, replay (R2/R3) and metrics around stages 5 and 6 in ``routing/``.
Every rank runs the loop and holds the whole batch after stage 3; advantages are computed on
all of it (identical everywhere); training takes this rank's data-parallel shard.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from moe_rl.algorithms import compute_advantages
from moe_rl.algorithms.kl import adaptive_kl_coef, sequence_mean_kl
from moe_rl.algorithms.sampling import fill_informative, rollout_metrics
from moe_rl.checkpoint import run_state as ckpt
from moe_rl.config import to_yaml
from moe_rl.config.run import RunConfig
from moe_rl.data import train_batch as tb
from moe_rl.observability import MetricWriter, StageTimer
from moe_rl.observability.gpu import gpu_stats
from moe_rl.observability.progress import progress_bar
from moe_rl.parallel.stop_signal import SavedOnSignal, StopSignal
from moe_rl.rewards.scoring import Scorer
from moe_rl.routing import RoutingSession
from moe_rl.train.trainer import SkipCounter, Trainer


class RLLoop:
    """Owns every component of a run (built by :mod:`moe_rl.launch`)."""

    def __init__(self, cfg: RunConfig, parts: "Parts", stop: StopSignal | None = None) -> None:
        self.cfg, self.p = cfg, parts
        self.stop = stop if stop is not None else StopSignal("")  # checkpoint.save_on_signal
        self.timer = StageTimer()
        self.version = parts.start_step  # policy version = loop steps done
        self.skips = SkipCounter(*parts.skipped, limit=cfg.loop.max_consecutive_skipped,
                                 checkpoints=ckpt.checkpoint_root(cfg.output_dir))
        self.next_prompts = None  # async: the prompts the engine is already generating for
        self.resume_sampler = parts.prompts.state_dict()  # the data position a checkpoint records
        # KL-in-reward beta: algorithm.kl_beta, or adaptive with algorithm.kl_target (then the
        # checkpoint's value continues it on resume)
        adaptive = cfg.algorithm.kl_target > 0 and parts.kl_coef is not None
        self.kl_coef = parts.kl_coef if adaptive else cfg.algorithm.kl_beta
        tr = parts.trainer  # the policy's routers (collective under PP; a no-op for a dense model)
        self.routing = RoutingSession(cfg.routing, tr.built.chunks, tr.groups, tr.built.hf_config)

    # ----------------------------------------------------------------------- the loop
    def run(self) -> List[Dict[str, Any]]:
        """Steps from the resume point to ``train.steps``; returns this process's records."""
        records = []
        bar = progress_bar(self.cfg.train.steps, "steps", enabled=self.p.show_progress, leave=True)
        bar.update(self.p.start_step)
        try:
            for step in range(self.p.start_step, self.cfg.train.steps):
                self.evaluate(step)                              # held-out prompts, this step's policy
                records += self.step(step)
                bar.update(1)
                bar.set_postfix(reward=f"{records[-1]['rollout/reward_mean']:.3f}")
            self.evaluate(self.version, final=True)              # the final policy
        finally:
            self.routing.close()
        bar.close()
        return records

    def step(self, step: int) -> List[Dict[str, Any]]:
        t = self.timer
        t.reset()
        batch, rollout_m = self.collect(step)                    # (1) prompts, (2) rollout, (3) rewards
        self.prefetch(step + 1)                                  # (8) async only: the next rollout starts
        with t("advantages"):                                    #     now and overlaps (4)-(6)
            adv_m = self.advantages(batch)                       # (4)
        with t("logprobs"):                                      # (5) old (and reference) log-probs
            minibatches = self.logprobs(batch)
        records = []
        with t("train"), self.p.rollout.offloaded():             # (6) loss + optimizer step per mini-batch,
            for _ in range(self.cfg.train.ppo_epochs):           #     train.ppo_epochs passes over the batch
                for mbs in minibatches:
                    with self.routing.train_pass(mbs):           #     (R2/R3: the recorded routes)
                        m = self.p.trainer.step(mbs)
                    records.append(self.skips.count(m))
        with t("routing"):                                       #     routing drift and load
            rollout_m.update(self.route_metrics(step, minibatches))
        self.version += 1
        with t("sync"):                                          # (7) weights -> engine(s)
            self.p.rollout.sync_weights(self.version)            #     (async: after the next batch is in)
        saved = None
        if self._checkpoint_due(step):
            with t("checkpoint"):
                saved = self.save(step + 1)
        out = self.log(step, records, rollout_m, adv_m)
        if step + 1 < self.cfg.train.steps and self.stop.agreed():  # collective: any rank signalled
            path = saved or self.save(step + 1)
            raise SavedOnSignal(self.stop.signum.name, step + 1, path)
        return out

    # ------------------------------------------------------------------ (1)-(3) collect
    def collect(self, step: int):
        """Prompts, rollout and rewards of one step, with DAPO's extra rounds; returns the
        step's TrainBatch (every rank holds all of it) and the rollout metrics."""
        cfg, t, alg = self.cfg, self.timer, self.cfg.algorithm
        tokens = 0

        def one_round(rnd: int):
            nonlocal tokens
            with t("prompts"):
                prompts = self.next_prompts if rnd == 0 and self.next_prompts else self.p.prompts.next(cfg.prompts_per_step)
                self.next_prompts = None
                self.resume_sampler = self.p.prompts.state_dict()
            with t("rollout"):
                samples = self.p.rollout.generate(step, rnd, prompts)
            tokens += sum(len(s.response_ids) for s in samples)
            with t("rewards"):
                return self.p.scorer.score(prompts, samples, rnd)

        if alg.dynamic_sampling:
            groups, n_rounds, filled = fill_informative(one_round, lambda g: g["rewards"].tolist(),
                                                        num_groups=cfg.prompts_per_step,
                                                        max_extra_rounds=alg.max_extra_rounds)
        else:  # every group is kept
            groups, n_rounds, filled = one_round(0), 1, 0
        batch = self.p.scorer.to_batch(groups)
        m = rollout_metrics(batch.rewards_B, batch.group_ids_B, batch.lengths_B, batch.truncated_B).compute()
        m.update({f"rollout/reward_mean/{n}": float(v.mean()) for n, v in batch.named_rewards.items()})
        err_m, err_msg = self.p.scorer.error_metrics(groups)
        m.update(err_m)
        if err_msg:
            report(f"[moe_rl] step {step}: {err_msg}")
        m.update({"rollout/tokens_per_s": tokens / max(t.seconds.get("rollout", 0.0), 1e-9),
                  "rollout/rounds": float(n_rounds), "rollout/filled_groups": float(filled)})
        with t("rewards"):
            batch, select_m = self.p.scorer.select(batch)
        m.update(select_m)
        stale = (self.version - batch.versions_B).to(torch.float64)
        m.update({"rollout/staleness_mean": float(stale.mean()), "rollout/staleness_max": float(stale.max()),
                  "rollout/weight_version_min": float(batch.versions_B.min())})
        if float(stale.max()) > (cfg.loop.max_staleness if cfg.loop.mode == "async" else 0):
            raise AssertionError(f"step {step}: a sample is {float(stale.max()):.0f} versions stale")
        return batch, m

    def prefetch(self, step: int) -> None:
        """Async mode: take the next step's prompts and start generating them on the engine
        with the current weights; the batch comes back one policy version stale. A checkpoint
        records the data position before these prompts, so a resume regenerates them."""
        if self.cfg.loop.mode != "async" or step >= self.cfg.train.steps:
            return
        with self.timer("prompts"):
            self.next_prompts = self.p.prompts.next(self.cfg.prompts_per_step)
        self.p.rollout.prefetch(step, self.next_prompts)

    # ------------------------------------------------------------------ (4) advantages
    def advantages(self, batch: tb.TrainBatch) -> Dict[str, float]:
        alg, kl_m = self.cfg.algorithm, {}
        if alg.kl_beta > 0 and alg.kl_placement == "reward":  # r_t -= beta * k1 needs the reference first
            k1_BT = self.p.trainer.reward_kl(batch)
            batch.token_penalty_BT = self.kl_coef * k1_BT
            current = sequence_mean_kl(k1_BT, batch.mask_BT)
            kl_m = {"actor/reward_kl_penalty": current, "actor/reward_kl_penalty_coeff": self.kl_coef}
            if alg.kl_target > 0:  # the next batch's beta (adaptive, as verl's controller)
                self.kl_coef = adaptive_kl_coef(self.kl_coef, current, target=alg.kl_target,
                                                n_responses=batch.size, horizon=alg.kl_horizon)
        rewards = batch.named_rewards if alg.advantage == "gdpo" else batch.rewards_B
        adv, m = compute_advantages(alg, rewards, batch.group_ids_B, batch.mask_BT,
                                    token_penalty_BT=batch.token_penalty_BT)
        batch.adv_BT = adv
        return {**m.compute(), **kl_m}

    # ------------------------------------------------------------------ (5) log-probs
    def logprobs(self, batch: tb.TrainBatch) -> List[List[dict]]:
        """This rank's micro-batches of every mini-batch, with old (and reference) log-probs
        computed once, before the first optimizer step of the batch."""
        tr = self.p.trainer
        minibatches = tr.microbatches(batch, self.cfg.train.global_batch)
        flat = [mb for mbs in minibatches for mb in mbs]
        self.routing.attach(flat, batch.routes, batch.seq_lengths)
        alg = self.cfg.algorithm
        with self.routing.old_pass(flat):  # R3: the engine's routes; records the routes used (R2's)
            tr.score(flat, tr.built, "old_logp", entropy_key="old_entropy" if alg.selects_entropy else "")
        if alg.selects_entropy:  # top_entropy_quantile: each optimizer step's high-entropy tokens
            for mbs in minibatches:
                tr.select_high_entropy(mbs, alg.top_entropy_quantile)
        if alg.needs_reference and alg.kl_placement == "loss":
            tr.score(flat, tr.reference, "ref_logp")
        return minibatches

    def route_metrics(self, step: int, minibatches: List[List[dict]]) -> Dict[str, float]:
        """``routing/...`` of the step (collective): rollout->old, old->new (one forward pass
        after the update, routing live) and load; the routes saved every ``routing.dump_every``."""
        tr, rc = self.p.trainer, self.cfg.routing
        flat = [mb for mbs in minibatches for mb in mbs]
        if self.routing.active and rc.old_new and rc.records_old:
            with self.routing.new_pass(flat):
                tr.score(flat, tr.built, "new_logp")
        if rc.dump_every and (step + 1) % rc.dump_every == 0:
            self.routing.dump(flat, self.cfg.output_dir, step)
        return self.routing.metrics(flat)

    # ------------------------------------------------------------------ held-out evaluation
    def evaluate(self, version: int, *, final: bool = False) -> None:
        """``eval/*`` of policy version ``version`` (the engines' weights now) when it is due;
        to eval.jsonl and tensorboard at the optimizer steps done (collective)."""
        ev = self.p.evaluation
        if ev is None or not ev.due(version, final=final):
            return
        m = ev.run(self.p.rollout, self.p.scorer, version)
        self.p.writer.write_eval({"step": self.p.trainer.state.step, "policy_version": version, **m})
        n = self.cfg.eval.n_samples
        best = f", best@{n} {m['eval/reward_best_mean']:.3f}" if "eval/reward_best_mean" in m else ""
        report(f"[moe_rl] eval of policy version {version}: reward {m['eval/reward_mean']:.3f}{best} "
               f"on {len(ev.prompts)} held-out prompts")

    # ------------------------------------------------------------------ checkpoint, metrics
    def _checkpoint_due(self, step: int) -> bool:
        c = self.cfg.checkpoint
        last = step + 1 == self.cfg.train.steps
        return (c.interval and (step + 1) % c.interval == 0) or (last and c.save_at_end)

    def save(self, next_step: int) -> str:
        tr = self.p.trainer
        return ckpt.save(ckpt.checkpoint_root(self.cfg.output_dir), next_step, train_state=tr.state,
                         built=tr.built, groups=tr.groups, keep=self.cfg.checkpoint.keep,
                         config_text=to_yaml(self.cfg), hf_files=self.p.hf_dir or None,
                         hf_plan=self.p.plan if self.cfg.checkpoint.save_hf else None,
                         run_state={"weight_version": self.version, "sampler": self.resume_sampler,
                                    "kl_coef": self.kl_coef,
                                    "skipped": [self.skips.total, self.skips.run],
                                    "model": ckpt.model_identity(tr.built.hf_config),
                                    "layout": tr.groups.dims.to_dict()})

    def log(self, step: int, records: List[Dict[str, float]], rollout_m: Dict[str, float],
            adv_m: Dict[str, float]) -> List[Dict[str, Any]]:
        timing = self.timer.metrics()
        total = timing["timing/step_s"]
        timing.update({f"timing/{k}_frac": v / total for k, v in self.timer.seconds.items()})
        if self.cfg.metrics.gpu_stats:
            timing.update(gpu_stats())
        out = []
        per_epoch = len(records) // self.cfg.train.ppo_epochs
        for i, m in enumerate(records):
            rec = {"step": int(m.pop("train/optimizer_step")), "policy_version": step, "minibatch": i % per_epoch,
                   "epoch": i // per_epoch}
            rec.update(rollout_m)
            rec.update(adv_m)
            rec.update(m)
            rec.update(self.p.rollout.last_sync)
            rec.update(timing)
            rec["train/optimizer_step"] = float(rec["step"])
            self.p.writer.write(rec)
            out.append(rec)
        return out


# =========================================================================== the parts
@dataclasses.dataclass
class Parts:
    """What the loop drives; built by ``moe_rl.launch.build_parts``."""

    prompts: Any  # moe_rl.data.prompts.PromptStream
    rollout: Any  # moe_rl.rollout.in_process.InProcessRollout or moe_rl.rollout.http_rollout.ServerRollout
    scorer: Scorer
    trainer: Trainer
    writer: MetricWriter
    start_step: int = 0
    skipped: tuple = (0, 0)  # (total, consecutive) skipped optimizer steps at the resume point
    show_progress: bool = False
    hf_dir: str = ""  # the policy's HF directory: its config and tokenizer go into every checkpoint
    evaluation: Any = None  # moe_rl.evaluation.Evaluation, or None (eval.interval = 0)
    plan: Any = None  # moe_rl.weights.plan.ExportPlan of this layout (weight sync, checkpoint.save_hf)
    kl_coef: Optional[float] = None  # the KL-in-reward beta at the resume point (None: algorithm.kl_beta)


def report(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, file=sys.stderr, flush=True)
