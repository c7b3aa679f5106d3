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
  mismatch correction and its metrics.
- DAPO dynamic sampling draws extra rounds of prompts (at most ``max_extra_rounds``); when
  the cap is hit the batch is completed with non-informative groups (zero advantage), so
  every step trains the same number of responses and the step's shapes stay fixed.
- the overlong penalty is added to the scalar reward (GDPO's named rewards stay raw).

Parallel semantics: every rank runs the loop. Rollout and rewards are split over all ranks
(each holds an in-process engine and scores what it generated), then gathered, so every rank
holds the whole batch; advantages are computed on the whole batch (identical everywhere);
training takes this rank's data-parallel shard. Determinism: every group's sampling seed is
a function of (train.seed, step, round, group), so a resumed run regenerates exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from moe_rl.algorithms import compute_advantages
from moe_rl.algorithms.kl import kl_estimate
from moe_rl.algorithms.sampling import gfpo_select, overlong_filter_mask, overlong_penalty, rollout_metrics
from moe_rl.checkpoint import run_state as ckpt
from moe_rl.config import to_yaml
from moe_rl.config.run import RunConfig
from moe_rl.data import train_batch as tb
from moe_rl.observability import MetricWriter, StageTimer
from moe_rl.observability.gpu import gpu_stats
from moe_rl.observability.progress import progress_bar
from moe_rl.rewards.types import RewardInput
from moe_rl.rollout.types import RolloutRequest, Sample, SamplingParams, per_sample_seed


class RunStopped(RuntimeError):
    """The run stopped on purpose (too many skipped steps); the message says why."""


class RLLoop:
    """Owns every component of a run (built by :mod:`moe_rl.launch`)."""

    def __init__(self, cfg: RunConfig, parts: "Parts") -> None:
        self.cfg, self.p = cfg, parts
        self.timer = StageTimer()
        self.version = parts.start_step  # policy version = loop steps done
        self.skipped_total, self.skipped_run = parts.skipped
        self.next_prompts = None  # async: the prompts the engine is already generating for
        self.resume_sampler = parts.prompts.state_dict()  # the data position a checkpoint records

    # ----------------------------------------------------------------------- the loop
    def run(self) -> List[Dict[str, Any]]:
        """Steps from the resume point to ``train.steps``; returns this process's records."""
        records = []
        bar = progress_bar(self.cfg.train.steps, "steps", enabled=self.p.show_progress, leave=True)
        bar.update(self.p.start_step)
        for step in range(self.p.start_step, self.cfg.train.steps):
            records += self.step(step)
            bar.update(1)
            bar.set_postfix(reward=f"{records[-1]['rollout/reward_mean']:.3f}")
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
        with t("train"), self.p.rollout.offloaded():             # (6) loss + optimizer step per mini-batch
            for mbs in minibatches:
                records.append(self.train(mbs))
        self.version += 1
        with t("sync"):                                          # (7) weights -> engine(s)
            self.p.rollout.sync_weights(self.version)            #     (async: after the next batch is in)
        if self._checkpoint_due(step):
            with t("checkpoint"):
                self.save(step + 1)
        return self.log(step, records, rollout_m, adv_m)

    # ------------------------------------------------------------------ (1)-(3) collect
    def collect(self, step: int):
        """Prompts, rollout and rewards of one step, with DAPO's extra rounds; returns the
        step's TrainBatch (every rank holds all of it) and the rollout metrics."""
        cfg, t, alg = self.cfg, self.timer, self.cfg.algorithm
        rounds = 1 + (alg.max_extra_rounds if alg.dynamic_sampling else 0)
        kept, spare, n_rounds, tokens = [], [], 0, 0
        for rnd in range(rounds):
            with t("prompts"):
                prompts = self.next_prompts if rnd == 0 and self.next_prompts else self.p.prompts.next(cfg.prompts_per_step)
                self.next_prompts = None
                self.resume_sampler = self.p.prompts.state_dict()
            with t("rollout"):
                samples = self.p.rollout.generate(step, rnd, prompts)
            tokens += sum(len(s.response_ids) for s in samples)
            with t("rewards"):
                groups = self.p.scorer.score(prompts, samples, rnd)
            n_rounds += 1
            if not alg.dynamic_sampling:
                kept = groups
                break
            for g in groups:
                (kept if len(set(g["rewards"].tolist())) > 1 else spare).append(g)
            if len(kept) >= cfg.prompts_per_step:
                break
        filled = max(0, cfg.prompts_per_step - len(kept))
        groups = kept[:cfg.prompts_per_step] + spare[len(spare) - filled:]
        batch = self.p.scorer.to_batch(groups)
        m = rollout_metrics(batch.rewards_B, batch.group_ids_B, batch.lengths_B, batch.truncated_B).compute()
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
        alg = self.cfg.algorithm
        if alg.kl_beta > 0 and alg.kl_placement == "reward":  # r_t -= beta * k1 needs the reference first
            ref = self.p.trainer.score_batch(batch, self.p.trainer.reference)
            old = self.p.trainer.score_batch(batch, self.p.trainer.built)
            batch.token_penalty_BT = alg.kl_beta * kl_estimate(old, ref, "k1").detach() * batch.mask_BT
        rewards = batch.named_rewards if alg.advantage == "gdpo" else batch.rewards_B
        adv, m = compute_advantages(alg, rewards, batch.group_ids_B, batch.mask_BT,
                                    token_penalty_BT=batch.token_penalty_BT)
        batch.adv_BT = adv
        return m.compute()

    # ------------------------------------------------------------------ (5) log-probs
    def logprobs(self, batch: tb.TrainBatch) -> List[List[dict]]:
        """This rank's micro-batches of every mini-batch, with old (and reference) log-probs
        computed once, before the first optimizer step of the batch."""
        tr = self.p.trainer
        minibatches = tr.microbatches(batch, self.cfg.train.global_batch)
        flat = [mb for mbs in minibatches for mb in mbs]
        tr.score(flat, tr.built, "old_logp")
        if self.cfg.algorithm.needs_reference and self.cfg.algorithm.kl_placement == "loss":
            tr.score(flat, tr.reference, "ref_logp")
        return minibatches

    # ------------------------------------------------------------------ (6) train
    def train(self, mbs: List[dict]) -> Dict[str, float]:
        m = self.p.trainer.step(mbs)
        if m["train/skipped"]:
            self.skipped_total += 1
            self.skipped_run += 1
            if self.skipped_run >= self.cfg.loop.max_consecutive_skipped:
                raise RunStopped(
                    f"{self.skipped_run} optimizer steps in a row had a non-finite loss or gradient "
                    f"(loop.max_consecutive_skipped={self.cfg.loop.max_consecutive_skipped}); stopping. "
                    f"The newest complete checkpoint under {ckpt.checkpoint_root(self.cfg.output_dir)} is intact.")
        else:
            self.skipped_run = 0
        m["train/skipped_steps"] = float(self.skipped_total)
        return m

    # ------------------------------------------------------------------ checkpoint, metrics
    def _checkpoint_due(self, step: int) -> bool:
        c = self.cfg.checkpoint
        last = step + 1 == self.cfg.train.steps
        return (c.interval and (step + 1) % c.interval == 0) or (last and c.save_at_end)

    def save(self, next_step: int) -> str:
        tr = self.p.trainer
        return ckpt.save(ckpt.checkpoint_root(self.cfg.output_dir), next_step, train_state=tr.state,
                         built=tr.built, groups=tr.groups, keep=self.cfg.checkpoint.keep,
                         config_text=to_yaml(self.cfg),
                         run_state={"weight_version": self.version, "sampler": self.resume_sampler,
                                    "skipped": [self.skipped_total, self.skipped_run],
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
        for i, m in enumerate(records):
            rec = {"step": int(m.pop("train/optimizer_step")), "policy_version": step, "minibatch": i}
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
    rollout: Any  # InProcessRollout or AsyncServerRollout
    scorer: "Scorer"
    trainer: "Trainer"
    writer: MetricWriter
    start_step: int = 0
    skipped: tuple = (0, 0)  # (total, consecutive) skipped optimizer steps at the resume point
    show_progress: bool = False


def group_seed(seed: int, step: int, rnd: int, group: int) -> int:
    """The sampling seed of one group: a pure function of the run seed and its position."""
    return per_sample_seed(per_sample_seed(per_sample_seed(seed, step + 1), rnd + 1), group + 1)


def make_requests(cfg: RunConfig, step: int, rnd: int, prompts) -> List[RolloutRequest]:
    r = cfg.rollout
    return [RolloutRequest(
        prompt_ids=list(p.input_ids),
        sampling=SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                top_k=r.top_k, n=r.n_samples_per_prompt,
                                sampling_seed=group_seed(cfg.train.seed, step, rnd, g)),
        group_id=g) for g, p in enumerate(prompts)]


def my_share(n: int, rank: int, world: int) -> range:
    """Contiguous share ``rank`` of ``n`` items over ``world`` ranks (sizes differ by at most 1)."""
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return range(int(bounds[rank]), int(bounds[rank + 1]))


def gather_lists(local: list) -> list:
    """Every rank's list, concatenated in rank order (all ranks receive it)."""
    box: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, local)
    return [x for part in box for x in part]


class InProcessRollout:
    """Stage 2 and 7 with an embedded engine in every rank (``sync`` mode).

    Generation: the step's groups are split over all ranks, each rank generates its share
    on its engine, samples are gathered in group order. Weight sync: the export stream of the
    training layout (``moe_rl.weights``), each bucket broadcast from its sender to every rank
    and applied to the engine once all have arrived (all or nothing). An adapter for
    in-process engines: it holds one HF-layout copy of the model per rank, fine for the
    small models an in-process engine serves; HTTP engines use ``moe_rl.weights.transport``.
    """

    def __init__(self, cfg: RunConfig, engine, plan, trainer: "Trainer", *, show_progress: bool) -> None:
        self.cfg, self.engine, self.plan, self.trainer = cfg, engine, plan, trainer
        self.show_progress = show_progress
        self.last_sync: Dict[str, float] = {}

    def generate(self, step: int, rnd: int, prompts) -> List[Sample]:
        reqs = make_requests(self.cfg, step, rnd, prompts)
        mine = [reqs[i] for i in my_share(len(reqs), dist.get_rank(), dist.get_world_size())]
        bar = progress_bar(len(reqs) * self.cfg.rollout.n_samples_per_prompt, f"rollout {step}",
                           enabled=self.show_progress)
        local = self.engine.generate(mine) if mine else []
        local = [dataclasses.replace(s, routed_experts_TLK=None) for s in local]  # not used by the loop
        out = gather_lists(local)
        bar.update(len(out))
        bar.close()
        return out

    @torch.no_grad()
    def sync_weights(self, version: int) -> None:
        from moe_rl.rollout.embedded.weight_update import apply_update, plan_update
        from moe_rl.weights.export import export_buckets

        t0 = time.perf_counter()
        tr = self.trainer
        mine = iter(list(export_buckets(self.plan, tr.built, tr.groups)))
        named: List[tuple] = []
        rank = dist.get_rank()
        for b in self.plan.buckets:
            specs = b.tensors
            dtype = getattr(torch, specs[0].dtype)
            if b.sender == rank:
                eb = next(mine)
                flat = torch.cat([t.reshape(-1).to(dtype) for t in eb.tensors])
            else:
                flat = torch.empty(sum(math.prod(s.shape) for s in specs), dtype=dtype)
            dist.broadcast(flat, src=b.sender)
            for s, part in zip(specs, torch.split(flat, [math.prod(s.shape) for s in specs])):
                named.append((s.name, part.view(s.shape)))
        apply_update(self.engine.model, plan_update(self.engine.model, named))
        self.engine.weight_version = str(version)
        self.last_sync = {"weights/bytes": float(self.plan.nbytes), "weights/sync_s": time.perf_counter() - t0}

    def prefetch(self, step: int, prompts) -> None:
        raise AssertionError("the in-process engines serve sync mode only")

    def offloaded(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


class ServerRollout:
    """Stages 2, 7 and 8 against engine servers over HTTP (SGLang's protocol): the async mode,
    and the sync mode when ``rollout.client.server_urls`` names servers.

    With no URLs, rank 0 starts the embedded engine as its own server process on a free
    loopback port (and stops it at the end). Rank 0 drives generation through the
    ``RolloutClient`` (in a background thread for a prefetched batch) and broadcasts the
    samples; weight sync is ``moe_rl.weights.sync.WeightSync`` (every rank takes part in the
    export, rank 0 pauses, commits and resumes the engines). Before a sync the prefetched
    generation is waited for, so every group is one weight version. In sync mode on GPUs
    the engines release their memory during training (``offloaded``)."""

    def __init__(self, cfg: RunConfig, hf_dir: str, plan, trainer: "Trainer", *, show_progress: bool) -> None:
        import concurrent.futures as cf

        from moe_rl.rollout.client import RolloutClient
        from moe_rl.weights.sync import WeightSync

        self.cfg, self.trainer, self.show_progress = cfg, trainer, show_progress
        self.server = None
        urls = list(cfg.rollout.client.server_urls)
        if not urls and dist.get_rank() == 0:
            self.server, url = start_engine_server(cfg, hf_dir)
            urls = [url]
        box = [urls]
        dist.broadcast_object_list(box, src=0)
        client_cfg = dataclasses.replace(cfg.rollout.client, server_urls=box[0], return_routed_experts=False)
        self.client = RolloutClient(client_cfg)
        self.sync = WeightSync(cfg.weights, self.client, plan, trainer.groups, hf_dir=hf_dir)
        self.pool = cf.ThreadPoolExecutor(1, thread_name_prefix="prefetch") if dist.get_rank() == 0 else None
        self.pending: Optional[tuple] = None  # (step, future on rank 0)
        self.last_sync: Dict[str, float] = {}

    def _generate_rank0(self, step: int, rnd: int, prompts) -> List[Sample]:
        reqs = make_requests(self.cfg, step, rnd, prompts)
        return [dataclasses.replace(s, routed_experts_TLK=None) for s in self.client.generate(reqs)]

    def generate(self, step: int, rnd: int, prompts) -> List[Sample]:
        box: List[Any] = [None]
        if dist.get_rank() == 0:
            if self.pending is not None and self.pending[0] == step and rnd == 0:
                box[0] = self.pending[1].result()
            else:
                box[0] = self._generate_rank0(step, rnd, prompts)
        if self.pending is not None and self.pending[0] == step:
            self.pending = None
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def prefetch(self, step: int, prompts) -> None:
        fut = self.pool.submit(self._generate_rank0, step, 0, prompts) if self.pool is not None else None
        self.pending = (step, fut)

    def sync_weights(self, version: int) -> None:
        if self.pending is not None and self.pool is not None:
            self.pending[1].exception()  # wait: the batch in flight keeps the version it started with
        self.last_sync = self.sync.sync(self.trainer.built, version)

    @contextlib.contextmanager
    def offloaded(self):
        colocated = self.cfg.loop.mode == "sync" and torch.cuda.is_available()
        if colocated and dist.get_rank() == 0:
            self.client.release_memory_occupation()
        try:
            yield
        finally:
            if colocated and dist.get_rank() == 0:
                self.client.resume_memory_occupation()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.sync.close()
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(timeout=10)
            except Exception:  # noqa: BLE001 - it is going away either way
                self.server.kill()


def start_engine_server(cfg: RunConfig, hf_dir: str):
    """The embedded engine as its own server process on a free loopback port; waits for
    ``/health`` (``rollout.sglang.startup_timeout_s``) and returns (process, URL)."""
    import socket
    import subprocess

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    e = cfg.rollout.embedded
    cmd = [sys.executable, "-m", "moe_rl.rollout.embedded.server", "--model", e.model_path or hf_dir,
           "--host", "127.0.0.1", "--port", str(port), "--max-running", str(e.max_running),
           "--weight-version", "0", "--dtype", e.dtype, "--no-routed-experts",
           "--num-threads", str(e.num_threads or 1)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + cfg.rollout.sglang.startup_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the engine server exited with code {proc.returncode} before answering: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the engine server did not answer {url}/health within {cfg.rollout.sglang.startup_timeout_s} s")


class Scorer:
    """Stage 3: detokenize each response once and score it with every named reward; then the
    shaping and filters that act before the step (overlong penalty, GFPO selection, overlong
    filtering). Every rank holds every sample; each scores a contiguous share (on its own
    reward executor) and the scores are gathered, so all ranks end with all rewards."""

    def __init__(self, cfg: RunConfig, tokenizer, evaluator) -> None:
        self.cfg, self.tokenizer, self.evaluator = cfg, tokenizer, evaluator

    def score(self, prompts, samples: List[Sample], rnd: int) -> List[Dict[str, Any]]:
        G = self.cfg.rollout.n_samples_per_prompt
        share = my_share(len(samples), dist.get_rank(), dist.get_world_size())
        inputs = [RewardInput(response=self.tokenizer.decode(samples[i].response_ids, skip_special_tokens=True),
                              label=prompts[samples[i].group_id].record.label, prompt=prompts[samples[i].group_id].text,
                              metadata=prompts[samples[i].group_id].record.metadata) for i in share]
        rb = self.evaluator.evaluate(inputs, desc="rewards") if inputs else None
        local = [(float(rb.total()[k]), rb.values[k]) for k in range(len(inputs))] if rb else []
        scored = gather_lists(local)
        groups = []
        for g in range(len(prompts)):
            rows = list(range(g * G, (g + 1) * G))
            assert all(samples[i].group_id == g for i in rows)
            groups.append({"samples": [samples[i] for i in rows], "round": rnd,
                           "rewards": torch.tensor([scored[i][0] for i in rows], dtype=torch.float32),
                           "named": {n: torch.tensor([scored[i][1][n] for i in rows], dtype=torch.float32)
                                     for n in scored[rows[0]][1]}})
        return groups

    def to_batch(self, groups: List[Dict[str, Any]]) -> tb.TrainBatch:
        samples, rewards, named = [], [], {}
        for gid, g in enumerate(groups):  # renumber: groups of several rounds get distinct ids
            samples += [dataclasses.replace(s, group_id=gid) for s in g["samples"]]
            rewards.append(g["rewards"])
            for n, v in g["named"].items():
                named.setdefault(n, []).append(v)
        batch = tb.from_samples(samples, torch.cat(rewards), {n: torch.cat(v) for n, v in named.items()})
        alg = self.cfg.algorithm
        if alg.overlong_shaping:
            batch.rewards_B = batch.rewards_B + overlong_penalty(
                batch.lengths_B, max_len=alg.max_response_len, cache_len=alg.overlong_cache_len).to(torch.float32)
        return batch

    def select(self, batch: tb.TrainBatch):
        alg, m = self.cfg.algorithm, {}
        if alg.gfpo_keep:
            keep = gfpo_select(batch.group_ids_B, batch.lengths_B, batch.rewards_B, keep=alg.gfpo_keep,
                               metric=alg.gfpo_metric)
            batch = batch.select(keep.nonzero().flatten().tolist())
        if alg.overlong_filter:
            batch.mask_BT = overlong_filter_mask(batch.mask_BT, batch.truncated_B)
            m["rollout/overlong_filtered_frac"] = float(batch.truncated_B.float().mean())
        return batch, m


class Trainer:
    """Stages 5 and 6 on the Megatron policy: micro-batches, log-prob scoring, actor steps."""

    def __init__(self, cfg: RunConfig, built, state, groups, reference=None) -> None:
        self.cfg, self.built, self.state, self.groups, self.reference = cfg, built, state, groups, reference
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def microbatches(self, batch: tb.TrainBatch, global_batch: int) -> List[List[dict]]:
        """Mini-batches of ``global_batch`` responses (in batch order), this rank's DP shard of
        each, packed into micro-batches of at most ``train.micro_batch`` rows and
        ``train.micro_batch x train.seq_len`` padded tokens; the same count on every rank."""
        g, t = self.groups, self.cfg.train
        per = global_batch // g.dims.dp
        lens = batch.seq_lengths
        shards = []
        for start in range(0, batch.size, global_batch):
            rows = list(range(start + g.dp_rank * per, start + (g.dp_rank + 1) * per))
            shards.append(rows)
        counts = torch.tensor([max(len(tb.plan_microbatches([lens[i] for i in rows], token_budget=t.micro_batch * t.seq_len,
                                                            max_rows=t.micro_batch)) for rows in shards)])
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # every rank runs as many forwards (EP exchanges tokens)
        pad = g.dims.tp if g.dims.sp else 1
        out = []
        for rows in shards:
            split = tb.split_rows([lens[i] for i in rows], int(counts))
            out.append([tb.to_microbatch(batch, [rows[j] for j in part], pad_multiple=pad, device=self.device)
                        for part in split])
        return out

    @torch.no_grad()
    def score(self, microbatches: List[dict], built, key: str) -> None:
        """``mb[key]`` = log pi(targets) [B, S] of ``built`` for every micro-batch (forward only).
        Only the last pipeline stage computes it; the others hold zeros (they never read it)."""
        from moe_rl.train.policy_head import emit_hidden_states, sequence_logprobs
        from moe_rl.train.schedule import forward_backward

        vocab = built.hf_config.vocab_size

        def loss_fn(hidden, mb):
            logp, _ = sequence_logprobs(hidden, built.module, mb["targets"], self.groups, vocab_size=vocab,
                                        temperature=self.cfg.temperature)
            mb[key] = logp.detach()
            return logp.sum() * 0.0, {}

        for mb in microbatches:
            mb[key] = torch.zeros(mb["tokens"].shape, dtype=torch.float32, device=self.device)
        with emit_hidden_states(built.module):
            forward_backward(built.module, microbatches, loss_fn, self.groups, forward_only=True)

    def score_batch(self, batch: tb.TrainBatch, built) -> torch.Tensor:
        """Response-space log-probs [B, T] of the whole batch under ``built`` (every rank gets all)."""
        mbs = [tb.to_microbatch(batch, [i], device=self.device) for i in range(batch.size)]
        self.score(mbs, built, "logp")
        out = torch.cat([tb.response_values(batch, mb, mb["logp"]) for mb in mbs])
        if self.groups.dims.pp > 1:
            from moe_rl.parallel.groups import pipeline_first_last_ranks

            dist.broadcast(out, src=pipeline_first_last_ranks(self.groups)[1], group=self.groups.pp_group)
        return out

    def step(self, mbs: List[dict]) -> Dict[str, float]:
        from moe_rl.train.actor_step import actor_step

        alg = self.cfg.algorithm
        if alg.needs_response_advantage:
            for mb in mbs:  # one advantage per response: its first valid token's
                first = mb["mask"].float().argmax(-1)
                mb["adv"] = mb["adv"].gather(1, first[:, None])[:, 0]
        with skip_non_finite(self.state.optimizer):
            m = actor_step(self.state, self.built, mbs, alg, self.groups, temperature=self.cfg.temperature)
        m["actor/grad_norm"] = m.pop("train/grad_norm")
        m["actor/lr"] = m.pop("train/lr")
        m["train/optimizer_step"] = self.state.step - 1
        return m


@contextlib.contextmanager
def skip_non_finite(optimizer):
    """Megatron skips an update only when an fp16 loss scaler finds an overflow; with fp32 or
    bf16 a NaN or inf gradient would be clipped and applied, ruining every weight. Scoped to
    this optimizer instance: the gradient norm is computed first (the same collective the step
    makes) and a non-finite one reports the step as skipped (``update_successful`` False),
    which ``optimizer_step`` counts and which advances neither weights nor LR schedule."""
    original = optimizer.step

    def step():
        if optimizer.prepare_grads():
            return False, None, None
        norm = optimizer.get_grad_norm()
        if norm is not None and not math.isfinite(norm):
            return False, norm, None
        return original()  # prepares again (an idempotent copy for fp32/bf16) and steps

    optimizer.step = step
    try:
        yield
    finally:
        del optimizer.step


def report(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, file=sys.stderr, flush=True)
