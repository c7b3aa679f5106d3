"""Stages 2 and 7 of the loop with an embedded engine inside every training rank (``sync``
mode, no HTTP): generation split over the ranks, weights copied straight from the export
stream into each engine."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import time
from typing import TYPE_CHECKING, Dict, List

import torch
import torch.distributed as dist

from moe_rl.config.run import RunConfig
from moe_rl.observability.progress import progress_bar
from moe_rl.parallel.collectives import comm_device
from moe_rl.parallel.work_split import gather_lists, my_share
from moe_rl.rollout.embedded.tokenizer import TOKENIZER_FILES, has_tokenizer, load_tokenizer
from moe_rl.rollout.requests import make_requests
from moe_rl.rollout.types import Sample

if TYPE_CHECKING:
    from moe_rl.train.trainer import Trainer


class InProcessRollout:
    """Stage 2 and 7 with an embedded engine in every rank (``sync`` mode).

    Generation: the step's groups are split over all ranks, each rank generates its share
    on its engine, samples are gathered in group order. Weight sync: the export stream of the
    training layout (``moe_rl.weights``), each bucket broadcast from its sender to every rank
    and applied to the engine once all have arrived (all or nothing), then the log-prob probe
    (``weights.probe``) on every rank's engine. An adapter for
    in-process engines: it holds one HF-layout copy of the model per rank, fine for the
    small models an in-process engine serves; HTTP engines use ``moe_rl.weights.transport``.
    Stop strings (``rollout.stop``) are matched with the engine checkpoint's tokenizer: the
    engine's own (:func:`engine_tokenizer`, given to it so it stops on the tokenizer's EOS as
    the server's engine does), else loaded here as the server loads it; a checkpoint without
    one fails here.
    """

    def __init__(self, cfg: RunConfig, engine, plan, trainer: Trainer, *, show_progress: bool) -> None:
        self.cfg, self.engine, self.plan, self.trainer = cfg, engine, plan, trainer
        self.show_progress = show_progress
        self.tokenizer = stop_tokenizer(cfg, engine.cfg.model_path, loaded=getattr(engine, "tokenizer", None))
        self.keep_routes = keeps_routes(cfg, trainer.built.hf_config)
        self.last_sync: Dict[str, float] = {}

    def generate(self, step: int, rnd: int, prompts) -> List[Sample]:
        return self.run_requests(make_requests(self.cfg, step, rnd, prompts), f"rollout {step}")

    def run_requests(self, reqs, desc: str, *, keep_routes: bool | None = None) -> List[Sample]:
        """Every request's samples on every rank, in request order (collective: each rank
        generates its share on its engine)."""
        mine = [reqs[i] for i in my_share(len(reqs), dist.get_rank(), dist.get_world_size())]
        bar = progress_bar(sum(r.sampling.n for r in reqs), desc, enabled=self.show_progress)
        local = self.engine.generate(mine, tokenizer=self.tokenizer) if mine else []
        if not (self.keep_routes if keep_routes is None else keep_routes):
            local = without_routes(local)
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
        # every export collective first, in plan order on every rank (the broadcasts below have
        # other senders); each bucket is dropped once sent
        mine = collections.deque(export_buckets(self.plan, tr.built, tr.groups))
        named: List[tuple] = []
        rank, dev = dist.get_rank(), comm_device()
        engine_dev = next(self.engine.model.parameters()).device
        for b in self.plan.buckets:
            sent = mine.popleft().tensors if b.sender == rank else None
            # one flat message per dtype in the bucket (an fp32 expert bias beside bf16 weights)
            for dt in dict.fromkeys(s.dtype for s in b.tensors):
                idx = [i for i, s in enumerate(b.tensors) if s.dtype == dt]
                specs = [b.tensors[i] for i in idx]
                if sent is not None:
                    flat = torch.cat([sent[i].reshape(-1).to(getattr(torch, dt)) for i in idx]).to(dev)
                else:
                    flat = torch.empty(sum(math.prod(s.shape) for s in specs), dtype=getattr(torch, dt), device=dev)
                dist.broadcast(flat, src=b.sender)
                flat = flat.to(engine_dev)  # on NCCL it crossed on the GPU; the engine's copy lives there
                for s, part in zip(specs, torch.split(flat, [math.prod(s.shape) for s in specs])):
                    named.append((s.name, part.view(s.shape)))
        apply_update(self.engine.model, plan_update(self.engine.model, named))
        self.engine.weight_version = str(version)
        self.last_sync = {"weights/bytes": float(self.plan.nbytes), "weights/sync_s": time.perf_counter() - t0}
        if self.cfg.weights.probe_due(version):  # every rank's engine against the trainer, as for servers
            from moe_rl.weights.probe import probe_and_check

            names = [f"rank {r}'s in-process engine" for r in range(dist.get_world_size())]
            self.last_sync.update(probe_and_check(self.cfg.weights, version, None, tr.built, tr.groups, names,
                                                  engine=self.engine))

    def prefetch(self, step: int, prompts) -> None:
        raise AssertionError("the in-process engines serve sync mode only")

    def offloaded(self):
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


def check_stop_tokenizer(cfg: RunConfig, model_dir: str) -> None:
    """ValueError when ``rollout.stop`` is set and the engine checkpoint ``model_dir`` has no
    tokenizer to match the strings with (the embedded engine would refuse every request)."""
    if cfg.rollout.stop and not has_tokenizer(model_dir):
        files = " or ".join(TOKENIZER_FILES)
        raise ValueError(f"rollout.stop ({list(cfg.rollout.stop)!r:.120}) is matched on decoded text, but the "
                         f"engine checkpoint {model_dir or '(none given)'!r} has no tokenizer ({files}); save the "
                         "tokenizer there, or stop on token ids (rollout.stop_token_ids)")


def stop_tokenizer(cfg: RunConfig, model_dir: str, loaded=None):
    """The tokenizer of the engine checkpoint ``model_dir`` when ``rollout.stop`` needs one, else
    None; ``loaded``: that tokenizer if already loaded."""
    if not cfg.rollout.stop:
        return None
    check_stop_tokenizer(cfg, model_dir)
    return loaded if loaded is not None else load_tokenizer(
        model_dir, trust_remote_code=cfg.rollout.embedded.trust_remote_code)


def engine_tokenizer(cfg: RunConfig, model_dir: str):
    """The tokenizer to build the in-process engine with (``EmbeddedEngine(..., tokenizer=)``):
    the engine checkpoint's when it has one, as the server loads it (so both paths stop on the
    same EOS ids), else None."""
    if not has_tokenizer(model_dir):
        return None
    return load_tokenizer(model_dir, trust_remote_code=cfg.rollout.embedded.trust_remote_code)


def keeps_routes(cfg: RunConfig, hf_config) -> bool:
    """Whether the rollout keeps the engines' routes (``Sample.routed_experts_NLK``): R3 replays
    them, and routing capture compares them with the old policy's (``routing/*/rollout_old``).
    A dense model has none to keep."""
    from moe_rl.models import family_for

    wanted = cfg.routing.replay == "r3" or cfg.routing.capture
    return wanted and bool(list(family_for(hf_config).moe_layer_ids(hf_config)))


def without_routes(samples: List[Sample]) -> List[Sample]:
    """The samples without their routed experts, when nothing reads them (:func:`keeps_routes`):
    they would only grow what is gathered and broadcast."""
    return [dataclasses.replace(s, routed_experts_NLK=None) for s in samples]
