"""Routing replay on Megatron-Core 0.16.1's own mechanism, scoped to one model instance and
checked on every pass.

Legend: B sequences, S positions of a micro-batch, N router tokens of this rank (sequence-major,
this TP rank's slice under sequence parallelism), L MoE layers, K top-k, E experts.

Megatron's mechanism (``transformer/moe/router_replay.py``): a ``TopKRouter`` holding a
``RouterReplay`` in its ``router_replay`` attribute (set when the model is built with
``moe_enable_routing_replay``; ``router.py:205``) passes it to
``moe_utils.topk_routing_with_score_function``, which asks it for the top-k instead of
computing them (``moe_utils.py:702``). In ``REPLAY_FORWARD`` it returns the target indices and
``scores.gather(1, indices)``: the gate weights come from the LIVE router scores at the replayed
experts, so the router keeps its gradient. Megatron does not copy any route or change any
gradient; we use that path unchanged.

What this module adds, and why:

- Scope. Megatron appends every ``RouterReplay`` to a process-global list
  (``RouterReplay.global_router_replay_instances``) and drives them all at once through static
  methods, so a policy and a reference in one process would share routes. Here each router of
  ONE model gets its own :class:`ScopedRouterReplay` (a ``RouterReplay`` that takes itself out of
  the global list; a Megatron-made instance is taken out too), and routes go to each router by
  its global layer index. This module is the only place that touches the global list.
- Per-micro-batch delivery. A forward pre-hook on each router takes the next micro-batch's
  routes from that router's queue, so the replay follows Megatron's pipeline schedules (each
  router sees its micro-batches in order, on any stage or virtual chunk) without editing them.
- Fallback. Positions without a recorded route (``-1``: padding beyond a response, or a sample
  the engine gave no routes for) are routed live by the same top-k Megatron would use; the
  others are replayed. ``routing/replay_fallback_frac`` counts the real (non-padding) tokens
  that fell back.
- Self-check, every pass. (a) The router's output routing map equals the replayed experts on
  every replayed token (``routing/replay_mismatch_frac``, which must be 0; anything else raises
  :class:`ReplayError` inside the forward, before any optimizer step); (b) the replay object
  of the router that ran was asked for its top-k exactly once per forward (a router whose
  ``router_replay`` was replaced or dropped is caught even when live and replayed routes agree);
  (c) at the end of the pass every router of this rank consumed exactly one route per
  micro-batch, so routes installed on routers that never run (stale modules: replay that
  silently did nothing) raise; (d) the routes cover exactly the model's MoE layers, over all
  pipeline stages (checked once with one collective when the replay is created).

Not supported (refused): activation recompute (it re-runs routers in backward, Megatron's
``REPLAY_BACKWARD``), token dropping (``moe_expert_capacity_factor``), the fused TE router
(``moe_router_fusion`` bypasses ``router_replay``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from moe_rl.routing.layout import Routes, to_router_order


class ReplayError(RuntimeError):
    """A replayed pass did not use the replayed routes; the run must stop."""


def _forget_global(instance: RouterReplay) -> None:
    """Take ``instance`` out of Megatron's process-global registry (identity, not equality)."""
    reg = RouterReplay.global_router_replay_instances
    reg[:] = [r for r in reg if r is not instance]


class ScopedRouterReplay(RouterReplay):
    """One router's replay state, owned by one model (not in Megatron's global registry).

    ``fallback_N`` (bool [N]) marks the tokens without a recorded route: their top-k is computed
    live and merged into the target before Megatron's own ``REPLAY_FORWARD`` gathers the scores.
    ``calls`` counts how often the router asked for its top-k."""

    def __init__(self) -> None:
        super().__init__()
        _forget_global(self)
        self.fallback_N: torch.Tensor | None = None
        self.calls = 0
        # Set by a route capture (``capture.RouteCapture``): in a replayed forward, also compute
        # the top-k the router would have chosen itself, into ``live_NK`` (what drift measures).
        self.record_live = False
        self.live_NK: torch.Tensor | None = None

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        self.calls += 1
        replaying = self.router_replay_action == RouterReplayAction.REPLAY_FORWARD
        if replaying and (self.fallback_N is not None or self.record_live):
            _, live_NK = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
            if self.record_live:
                self.live_NK = live_NK.detach()
            if self.fallback_N is not None:
                self.target_topk_idx = torch.where(self.fallback_N[:, None], live_NK, self.target_topk_idx)
        return super().get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)


@dataclasses.dataclass
class ReplayCounts:
    """Sums over the replayed passes since the last reset (router-token pairs of real tokens)."""

    tokens: int = 0  # real tokens routed by a replaying router, summed over layers
    fallback: int = 0  # of which routed live (no recorded route)
    mismatch: int = 0  # of which the router's experts differ from the replayed ones (must stay 0)
    passes: int = 0  # replayed passes


class ModelReplay:
    """Replay for the routers of one model instance (all chunks of this rank).

    Collective at construction: every rank of the pipeline group calls it (one all-gather of the
    layer indices each stage holds)."""

    def __init__(self, routers: list[tuple[int, torch.nn.Module]], groups, *, moe_layer_ids: Sequence[int]) -> None:
        self.routers, self.groups = routers, groups
        for layer, router in routers:
            cfg = router.config
            if getattr(cfg, "recompute_granularity", None) is not None:
                raise ValueError(f"routing replay with activation recompute ({cfg.recompute_granularity}) is not "
                                 "supported: recompute re-runs the routers in backward")
            if cfg.moe_router_fusion:
                raise ValueError("routing replay needs moe_router_fusion=False (the fused router bypasses replay)")
            if cfg.moe_expert_capacity_factor is not None:
                raise ValueError("routing replay does not support token dropping (moe_expert_capacity_factor)")
            old = router.router_replay
            if isinstance(old, ScopedRouterReplay):
                raise ValueError(f"the router of layer {layer} already belongs to another ModelReplay")
            if old is not None:
                _forget_global(old)  # built with moe_enable_routing_replay: Megatron's instance retires
            router.router_replay = ScopedRouterReplay()
        local = [layer for layer, _ in routers]
        if groups.dims.pp > 1:
            box: list = [None] * groups.dims.pp
            dist.all_gather_object(box, local, group=groups.pp_group)
        else:
            box = [local]
        everywhere = [x for part in box for x in part]
        if len(everywhere) != len(set(everywhere)):
            raise ValueError(f"pipeline stages claim MoE layers {box}: a layer on two stages")
        self.all_layers = sorted(everywhere)
        if self.all_layers != sorted(moe_layer_ids):
            raise ValueError(f"the model's routers are at layers {self.all_layers}, the family's MoE layers are "
                             f"{sorted(moe_layer_ids)}")
        self.counts = ReplayCounts()
        self.seconds = 0.0  # host time spent in the replay hooks (and their checks)
        self._queues: dict[int, collections.deque] = {}
        self._consumed: dict[int, int] = {}
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._active = False

    def close(self) -> None:
        """Give the routers back their live routing (no replay object)."""
        for _, router in self.routers:
            router.router_replay = None

    # ------------------------------------------------------------------------------ a pass
    @contextlib.contextmanager
    def replay(self, routes: Sequence[Routes]) -> Iterator[None]:
        """Replay ``routes[m]`` in micro-batch ``m`` of the pass run inside the block (forward
        and backward, any schedule). Raises :class:`ReplayError` on a mismatch (inside the
        forward) or, at the end of the block, when a router of this rank did not consume exactly
        one route per micro-batch. No collective."""
        if self._active:
            raise RuntimeError("a replay is already active on this model")
        g = self.groups
        for m, r in enumerate(routes):
            missing = sorted(set(self.local_layers) - set(r.layer_ids))
            if missing:
                raise ValueError(f"micro-batch {m}: routes hold layers {r.layer_ids}, not this stage's MoE layers "
                                 f"{missing} (they would route live)")
            extra = sorted(set(r.layer_ids) - set(self.all_layers))
            if extra:
                raise ValueError(f"micro-batch {m}: routes for layers {extra}, which no router of the model holds "
                                 "(they would never be replayed)")
        self._queues = {layer: collections.deque() for layer, _ in self.routers}
        self._consumed = {layer: 0 for layer, _ in self.routers}
        for r in routes:
            valid = r.valid_BS if r.valid_BS is not None else torch.ones(r.experts_BSLK.shape[:2], dtype=torch.bool)
            valid_N = to_router_order(valid.to(r.experts_BSLK.device), tp_rank=g.tp_rank, tp=g.dims.tp, sp=g.dims.sp)
            for layer, _ in self.routers:
                j = r.layer_ids.index(layer)
                target_NK = to_router_order(r.experts_BSLK[:, :, j], tp_rank=g.tp_rank, tp=g.dims.tp,
                                            sp=g.dims.sp).to(torch.int64)
                fallback_N = (target_NK < 0).any(-1)
                # None when every token has a route: the router then skips the live top-k
                self._queues[layer].append((target_NK, fallback_N if bool(fallback_N.any()) else None, valid_N))
        lost = [layer for layer, router in self.routers if not isinstance(router.router_replay, ScopedRouterReplay)]
        if lost:
            raise ReplayError(f"routing replay: the routers of layers {lost} lost their replay object (replaced "
                              "after the replay was installed); they would route live")
        handles = []
        for layer, router in self.routers:
            handles.append(router.register_forward_pre_hook(self._pre_hook(layer)))
            handles.append(router.register_forward_hook(self._post_hook(layer)))
            router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
        self._active = True
        ok = False
        try:
            yield
            ok = True
        finally:
            for h in handles:
                h.remove()
            for _, router in self.routers:
                rr = router.router_replay
                if isinstance(rr, ScopedRouterReplay):
                    rr.clear_router_replay_action()
                    rr.clear_indices()
                    rr.fallback_N = rr.live_NK = None
            self._active = False
            self._pending = {}
        if ok:
            n = len(routes)
            wrong = {layer: c for layer, c in self._consumed.items() if c != n}
            if wrong:
                raise ReplayError(f"routing replay: routes not consumed once per micro-batch ({n} micro-batches): "
                                  + ", ".join(f"layer {layer} consumed {c}" for layer, c in sorted(wrong.items()))
                                  + " (routes installed on routers that did not run?)")
            self.counts.passes += 1

    @property
    def local_layers(self) -> list[int]:
        return [layer for layer, _ in self.routers]

    def _pre_hook(self, layer: int):
        def hook(router, args):
            t0 = time.perf_counter()
            q = self._queues[layer]
            if not q:
                raise ReplayError(f"routing replay: the router of layer {layer} ran more often than the "
                                  f"{self._consumed[layer]} micro-batches given routes")
            target_NK, fallback_N, valid_N = q.popleft()
            hidden = args[0]
            N = hidden.shape[0] * hidden.shape[1]
            if target_NK.shape[0] != N:
                raise ReplayError(f"routing replay: layer {layer} routes {N} tokens, the replayed micro-batch "
                                  f"has {target_NK.shape[0]} (micro-batches out of order?)")
            rr = router.router_replay
            if not isinstance(rr, ScopedRouterReplay):
                raise ReplayError(f"routing replay: the router of layer {layer} lost its replay object")
            rr.clear_indices()
            rr.live_NK = None
            rr.set_target_indices(target_NK.to(hidden.device))
            rr.fallback_N = None if fallback_N is None else fallback_N.to(hidden.device)
            rr.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
            self._pending[layer] = (target_NK, valid_N, rr.calls)
            self.seconds += time.perf_counter() - t0

        return hook

    def _post_hook(self, layer: int):
        def hook(router, args, out):
            t0 = time.perf_counter()
            target_NK, valid_N, calls = self._pending.pop(layer)
            rr = router.router_replay
            if not isinstance(rr, ScopedRouterReplay) or rr.calls != calls + 1:
                raise ReplayError(f"routing replay: the router of layer {layer} routed without asking its replay "
                                  "object (replay installed but not used)")
            routing_map_NE = out[1].detach()
            replayed_N = (target_NK >= 0).all(-1).to(routing_map_NE.device)
            expected_NE = torch.zeros_like(routing_map_NE).scatter_(
                1, target_NK.clamp(min=0).to(routing_map_NE.device), True)
            bad_N = (routing_map_NE != expected_NE).any(-1) & replayed_N
            valid_N = valid_N.to(routing_map_NE.device)
            # one host sync per layer: the check must stop the pass before the next layer runs
            mismatch, tokens, fallback = torch.stack(
                [bad_N.sum(), valid_N.sum(), (~replayed_N & valid_N).sum()]).tolist()
            count = self._counts_here()
            self.counts.tokens += count * tokens
            self.counts.fallback += count * fallback
            self.counts.mismatch += count * mismatch
            self._consumed[layer] += 1
            self.seconds += time.perf_counter() - t0
            if mismatch:
                raise ReplayError(f"routing replay: layer {layer} sent {mismatch} of {int(replayed_N.sum())} replayed "
                                  "tokens to other experts than the replayed ones (routing/replay_mismatch_frac > 0)")

        return hook

    def _counts_here(self) -> int:
        """1 where this rank's router tokens are counted: TP peers route copies of the same tokens
        unless sequence parallelism slices them."""
        g = self.groups
        return 1 if (g.dims.sp or g.tp_rank == 0) else 0

    def take_counts(self) -> ReplayCounts:
        """The counts since the last call (this rank's share), and reset them."""
        c, self.counts = self.counts, ReplayCounts()
        return c
