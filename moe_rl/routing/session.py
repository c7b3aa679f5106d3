"""One model instance's routing: capture in its passes, replay R2/R3, and the step's exact
routing metrics.

Legend: B sequences, S positions of a micro-batch, T = B*S tokens, L MoE layers, K top-k,
E experts.

Routes travel in the trainer's micro-batch dicts (the ones ``moe_rl.data.train_batch``
packs) under the keys ``moe_rl.routing.layout`` names (``routes_rollout``, ``routes_old``,
``routes_new``, ``route_valid``), each a :class:`~moe_rl.routing.layout.Routes` [B, S, L, K].
Padding never counts in a metric.

Parallel semantics: every rank creates the session for its part of the model (collective:
:class:`~moe_rl.routing.replay.ModelReplay` all-gathers over the pipeline group) and runs the
same passes with its own micro-batches. :meth:`RoutingSession.metrics` is collective over the
whole world and returns the same dict on every rank. Counts are exact: each (data-parallel
shard, layer) is counted once (on TP rank 0: after the capture's sequence-parallel gather every
TP rank holds the same routes), summed over the world; ``any_layer_flip_frac`` ORs the token
flips of every pipeline stage first.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Sequence

import torch
import torch.distributed as dist

from moe_rl.parallel.collectives import all_reduce
from moe_rl.routing import metrics as M
from moe_rl.routing.capture import RouteCapture, moe_routers
from moe_rl.routing.config import RoutingConfig
from moe_rl.routing.layout import (NEW, OLD, R3_TRAIN, ROLLOUT, VALID, attach_engine_routes, attach_positions,
                                   fill_missing)
from moe_rl.routing.replay import ModelReplay


class RoutingSession:
    """Capture, replay and metrics for ONE model instance (policy or reference): its replay
    state is its own, never shared through Megatron's global registry."""

    def __init__(self, cfg: RoutingConfig, model_chunks: Sequence[torch.nn.Module], groups, hf_config) -> None:
        from moe_rl.models import family_for

        fam = family_for(hf_config)
        self.cfg, self.groups = cfg, groups
        self.moe_layer_ids = list(fam.moe_layer_ids(hf_config))
        self.num_experts = fam.num_experts(hf_config) if self.moe_layer_ids else 0
        self.topk = int(getattr(hf_config, "num_experts_per_tok", 0) or 0)
        self.routers = moe_routers(model_chunks)
        self.local_layers = [layer for layer, _ in self.routers]
        if cfg.replay != "none" and not self.moe_layer_ids:
            # replay that was asked for and cannot happen must not look as if it did
            raise ValueError(f"routing.replay={cfg.replay} needs a MoE model; {hf_config.model_type} "
                             "has no MoE layers (set routing.replay=none)")
        self.replayer = None
        if cfg.replay != "none":
            self.replayer = ModelReplay(self.routers, groups, moe_layer_ids=self.moe_layer_ids)
        self.seconds = {"capture": 0.0}  # host time in the capture hooks and gathers since metrics()

    @property
    def active(self) -> bool:
        """The model has MoE layers (a dense model has nothing to capture or replay)."""
        return bool(self.moe_layer_ids)

    def close(self) -> None:
        if self.replayer is not None:
            self.replayer.close()

    # ----------------------------------------------------------------------- primitives
    @contextlib.contextmanager
    def capture(self, mbs: Sequence[dict], key: str, *, used: bool = False) -> Iterator[None]:
        """Record the routes of the pass run inside the block into ``mb[key]`` (every TP rank
        of a stage must run it: the sequence-parallel slices are gathered at the end): the
        routers' own choices, or with ``used`` the experts the layers ran (they differ only in
        a replayed pass, where ``used`` gives the replayed routes)."""
        cap = RouteCapture(self.routers, num_experts=self.num_experts, topk=self.topk, groups=self.groups,
                           probs=self.cfg.router_probs, used=used).start()
        ok = False
        try:
            yield
            ok = True
        finally:
            if not ok:
                cap.remove()
        routes = cap.finish([tuple(mb["tokens"].shape) for mb in mbs])
        for mb, r in zip(mbs, routes):
            r.valid_BS = mb.get(VALID)
            mb[key] = r
        self.seconds["capture"] += cap.seconds

    @contextlib.contextmanager
    def replay(self, mbs: Sequence[dict], key: str) -> Iterator[None]:
        """Replay ``mb[key]`` in each micro-batch of the pass run inside the block."""
        if self.replayer is None:
            raise RuntimeError("routing replay is off for this model (routing.replay=none, or no MoE layer)")
        missing = [m for m, mb in enumerate(mbs) if key not in mb]
        if missing:
            raise ValueError(f"micro-batches {missing} have no {key!r} to replay")
        d, g = self.groups.dims, self.groups
        # under CP a router sees only its rank's chunks of each sequence: replay those positions
        with self.replayer.replay([mb[key].cp_slice(d.cp, g.cp_rank) for mb in mbs]):
            yield

    def attach(self, mbs: Sequence[dict], routes_B, seq_lengths: Sequence[int]) -> None:
        """Before the old-policy pass: each micro-batch's ``route_valid`` and, where the batch
        has engine routes (``TrainBatch.routes``), its ``routes_rollout``. Without any engine
        route R3 is refused by the replay itself (no ``routes_rollout`` to replay)."""
        if not self.active:
            return
        if routes_B is not None and any(r is not None for r in routes_B):
            attach_engine_routes(mbs, routes_B, seq_lengths, self.moe_layer_ids, num_experts=self.num_experts)
        else:
            attach_positions(mbs, seq_lengths)

    # ------------------------------------------------------------- the loop's three passes
    @contextlib.contextmanager
    def old_pass(self, mbs: Sequence[dict]) -> Iterator[None]:
        """Around stage 5's old-policy scoring: R3 replays ``routes_rollout``; the old policy's
        own routing (its routers' choices, which R3 overrides) is recorded as ``routes_old``
        (metrics, and R2's source)."""
        with contextlib.ExitStack() as stack:
            if self.active and self.cfg.replay == "r3":
                stack.enter_context(self.replay(mbs, ROLLOUT))
            if self.active and self.cfg.records_old:
                stack.enter_context(self.capture(mbs, OLD))
            yield

    @contextlib.contextmanager
    def train_pass(self, mbs: Sequence[dict]) -> Iterator[None]:
        """Around a training step's forward/backward: R2 replays ``routes_old``; R3
        ``routes_rollout``, where a token has no engine route (a sample the engine returned
        without routes) the old policy's route from the old pass, so the ratio's numerator and
        denominator route those tokens alike (live routing there would drift with every
        update; R3 records ``routes_old`` whatever ``routing.capture`` says); without replay it
        does nothing."""
        with contextlib.ExitStack() as stack:
            if self.active and self.cfg.replay == "r2":
                stack.enter_context(self.replay(mbs, OLD))
            elif self.active and self.cfg.replay == "r3":
                key = R3_TRAIN if all(ROLLOUT in mb for mb in mbs) else ROLLOUT  # else replay() names it
                for mb in mbs if key == R3_TRAIN else ():
                    if R3_TRAIN not in mb:
                        mb[R3_TRAIN] = fill_missing(mb[ROLLOUT], mb[OLD]) if OLD in mb else mb[ROLLOUT]
                stack.enter_context(self.replay(mbs, key))
            yield

    @contextlib.contextmanager
    def new_pass(self, mbs: Sequence[dict]) -> Iterator[None]:
        """Around a forward-only pass after the update (live routing): records ``routes_new``."""
        with contextlib.ExitStack() as stack:
            if self.active:
                stack.enter_context(self.capture(mbs, NEW))
            yield

    def gather_routes(self, mbs: Sequence[dict], key: str = OLD, dst: int = 0) -> dict[int, torch.Tensor] | None:
        """Every real token's routes under ``key``, all layers, on rank ``dst`` (None elsewhere):
        ``{global layer: [T, K]}``, tokens in data-parallel rank order, then micro-batch, row and
        position order (the same T tokens in every layer) -- what
        ``moe_rl.routing.report.write_route_dump`` saves. Collective over the world."""
        g = self.groups
        local: dict[int, torch.Tensor] = {}
        if self._counted():
            for j, layer in enumerate(self.local_layers):
                parts = []
                for mb in mbs:
                    r = mb[key].layers([layer])
                    valid = mb[VALID] if VALID in mb else torch.ones(r.experts_BSLK.shape[:2], dtype=torch.bool)
                    parts.append(r.experts_BSLK[:, :, 0][valid.to(r.experts_BSLK.device)].cpu())
                local[layer] = torch.cat(parts) if parts else torch.empty(0, self.topk)
        box: list = [None] * dist.get_world_size() if dist.get_rank() == dst else None
        dist.gather_object((g.dp_rank, local), box, dst=dst)
        if box is None:
            return None
        per_layer: dict[int, list] = {}
        for dp_rank, part in box:
            for layer, t in part.items():
                per_layer.setdefault(layer, []).append((dp_rank, t))
        return {layer: torch.cat([t for _, t in sorted(v, key=lambda x: x[0])]) for layer, v in sorted(per_layer.items())}

    def dump(self, mbs: Sequence[dict], run_dir: str, step: int) -> None:
        """Save the old-policy pass's routes of step ``step`` for ``tools/routing_report.py``
        (``routing.dump_every``). Collective over the world; rank 0 writes. Nothing without
        MoE layers or without recorded routes (``routing.capture`` off and no R2)."""
        if not (self.active and self.cfg.records_old):
            return
        routes = self.gather_routes(mbs)
        if routes is not None:
            from moe_rl.routing.report import write_route_dump

            write_route_dump(run_dir, step, routes, self.num_experts)

    # -------------------------------------------------------------------------- metrics
    def metrics(self, mbs: Sequence[dict]) -> dict[str, float]:
        """The step's routing metrics from the routes in ``mbs`` (this rank's micro-batches of
        the whole batch): drift ``rollout_old`` (with ``routes_rollout`` and ``routes_old``),
        ``old_new`` (with ``routes_old`` and ``routes_new``), load (from ``routes_old``), the
        replay counters since the last call (``routing/replay_fallback_frac``,
        ``routing/replay_mismatch_frac``), and this rank's host time in the capture and replay
        hooks and in this call (``timing/routing_{capture,replay,metrics}_s``). Collective over
        the world; every rank gets the same routing values. Pops ``routes_new`` (used once)."""
        if not self.active or not mbs:
            return {}
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        if all(ROLLOUT in mb and OLD in mb for mb in mbs):
            out.update(self._drift(mbs, ROLLOUT, OLD, "rollout_old"))
        if all(OLD in mb and NEW in mb for mb in mbs):
            out.update(self._drift(mbs, OLD, NEW, "old_new"))
        if all(OLD in mb for mb in mbs):
            out.update(self._load(mbs))
        if self.replayer is not None:
            c = self.replayer.take_counts()
            t = all_reduce(torch.tensor([c.tokens, c.fallback, c.mismatch], dtype=torch.int64))
            tokens, fallback, mismatch = t.tolist()
            out["routing/replay_fallback_frac"] = fallback / tokens if tokens else 0.0
            out["routing/replay_mismatch_frac"] = mismatch / tokens if tokens else 0.0
        for mb in mbs:
            mb.pop(NEW, None)
        out["timing/routing_capture_s"] = self.seconds["capture"]
        if self.replayer is not None:
            out["timing/routing_replay_s"] = self.replayer.seconds
            self.replayer.seconds = 0.0
        self.seconds = {"capture": 0.0}
        out["timing/routing_metrics_s"] = time.perf_counter() - t0
        return out

    def _counted(self) -> bool:
        """This rank's copy of the captured routes is the one counted: TP and CP ranks hold the
        same whole-sequence routes after the capture's gather."""
        return self.groups.tp_rank == 0 and self.groups.cp_rank == 0

    def _drift(self, mbs: Sequence[dict], key_a: str, key_b: str, pair: str) -> dict[str, float]:
        g, local, all_ids = self.groups, self.local_layers, self.moe_layer_ids
        L_all = len(all_ids)
        pos = torch.tensor([all_ids.index(x) for x in local], dtype=torch.int64)
        ints = torch.zeros(4, L_all, dtype=torch.int64)  # tokens, flips, overlap, slots per layer
        kl = torch.zeros(L_all, dtype=torch.float64)
        with_kl = all(mb[key_a].probs_BSLE is not None and mb[key_b].probs_BSLE is not None for mb in mbs)
        flips, masks = [], []
        for mb in mbs:
            ra, rb = mb[key_a], mb[key_b]
            B, S = mb["tokens"].shape
            mask_T = mb[VALID].reshape(-1).cpu() if VALID in mb else torch.ones(B * S, dtype=torch.bool)
            for r in (ra, rb):  # a token counts only where both passes routed it, in every layer
                mask_T = mask_T & (r.experts_BSLK >= 0).flatten(2).all(-1).reshape(-1).cpu()  # L may be 0
            if local:
                a, b = ra.layers(local), rb.layers(local)
                pa = a.probs_BSLE.reshape(B * S, len(local), -1).cpu() if with_kl else None
                pb = b.probs_BSLE.reshape(B * S, len(local), -1).cpu() if with_kl else None
                c = M.drift_counts(a.experts_BSLK.reshape(B * S, len(local), -1).cpu(),
                                   b.experts_BSLK.reshape(B * S, len(local), -1).cpu(), mask_T,
                                   probs_a_TLE=pa, probs_b_TLE=pb, return_flips=True)
                for row, k in enumerate(("tokens_L", "flips_L", "overlap_L", "slots_L")):
                    ints[row, pos] += c[k]
                if with_kl:
                    kl[pos] += c["kl_L"]
                flips.append(c["flip_T"])
            else:
                flips.append(torch.zeros(B * S, dtype=torch.bool))
            masks.append(mask_T)
        flip_T = torch.cat(flips).to(torch.int32)
        if g.dims.pp > 1:  # a token flips if it flips in a layer of any stage
            flip_T = all_reduce(flip_T, op=dist.ReduceOp.MAX, group=g.pp_group)
        mask_T = torch.cat(masks)
        scal = torch.tensor([int(mask_T.sum()), int((flip_T.bool() & mask_T).sum())], dtype=torch.int64)
        if not self._counted():
            ints.zero_()
            kl.zero_()
        if not (self._counted() and g.pp_rank == 0):
            scal.zero_()
        packed = torch.cat([ints.reshape(-1), scal])
        packed = all_reduce(packed)
        if with_kl:
            kl = all_reduce(kl)
        ints, scal = packed[:-2].reshape(4, L_all), packed[-2:]
        counts = {"tokens_L": ints[0], "flips_L": ints[1], "overlap_L": ints[2], "slots_L": ints[3],
                  "tokens": scal[0], "any_layer_flips": scal[1]}
        if with_kl:
            counts["kl_L"] = kl
        return M.finalize_drift(counts, pair, all_ids)

    def _load(self, mbs: Sequence[dict]) -> dict[str, float]:
        all_ids, local = self.moe_layer_ids, self.local_layers
        load = torch.zeros(len(all_ids), self.num_experts, dtype=torch.int64)
        if local and self._counted():
            pos = torch.tensor([all_ids.index(x) for x in local], dtype=torch.int64)
            for mb in mbs:
                r = mb[OLD]
                B, S = mb["tokens"].shape
                mask_T = mb[VALID].reshape(-1).cpu() if VALID in mb else None
                load[pos] += M.load_counts(r.experts_BSLK.reshape(B * S, len(local), -1).cpu(), self.num_experts,
                                           mask_T)
        load = all_reduce(load)
        return M.finalize_load(load, all_ids)
