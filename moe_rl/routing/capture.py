"""Capture the top-k experts (and router distributions) of every MoE layer of a Megatron-Core
model in the trainer's passes, through forward hooks on the ``TopKRouter`` modules.

Legend: B sequences of a micro-batch, S its positions (``tokens`` is [B, S]), N = S_loc * B
router tokens (S_loc = S, or S / TP under sequence parallelism), L MoE layers, K top-k,
E experts.

What a router hook sees (Megatron-Core 0.16.1, ``moe/router.py`` ``TopKRouter.forward``):
input ``hidden [S_loc, B, H]`` and output ``(probs [N, E], routing_map [N, E] bool)`` with
tokens flattened sequence-major (token ``s * B + b``). What is recorded is the router's own
choice: in a live pass the routing map (what the token dispatcher sends: live or
group-limited top-k); in a pass that replays routes (``replay.py``), the top-k the router
computes from the same scores before the replay overrides it (``ScopedRouterReplay.live_NK``).
So R3's old-policy pass records the old policy's routing, not the engine's routes it ran:
rollout->old drift stays what the engine and the trainer disagree on (what R3 neutralises),
and old->new measures the update alone. ``used=True`` records the experts the layers ran
instead (the routing map, replayed or not). Under sequence parallelism each TP rank
routes its own slice ``S_loc`` of the sequence; :meth:`RouteCapture.finish` gathers the slices
over the TP group so every TP rank holds the whole micro-batch. Under context parallelism a
router sees only its CP rank's load-balanced chunks (``S_loc = S / CP``, then / TP under
sequence parallelism); they are gathered over the CP group and put back in position order
(``moe_rl.parallel.context_parallel.cp_positions``). Expert parallelism needs no gather:
every EP rank routes the tokens of its own data-parallel shard.

Routes are keyed by GLOBAL layer index (``TransformerLayer.layer_number - 1``, which is also
the HF layer index), so they stay right on any pipeline stage and for a model given as a list
of virtual-pipeline chunks. Position ``t`` of row ``b`` is the trainer's sequence position, the
same index as row ``t`` of an engine's ``[prompt + response - 1, L, K]`` routes.

Router distributions (``RoutingConfig.router_probs``) need the router's logits, which the
router does not return: the hook recomputes them with the router's own ``gating`` (one
[N, H] x [H, E] matmul per layer, no gradient). Softmax routers give ``softmax(logits)``,
sigmoid routers (DeepSeek-V3) their sigmoid scores normalised to sum to 1.
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import torch

from moe_rl.routing.layout import Routes, from_router_order, index_dtype


def moe_routers(model_chunks: Iterable[torch.nn.Module]) -> list[tuple[int, torch.nn.Module]]:
    """``(global layer index, TopKRouter)`` of every MoE layer in this rank's model chunks
    (a GPTModel, DDP-wrapped or not, or a list of virtual-pipeline chunks), by layer index."""
    from megatron.core.transformer.moe.router import TopKRouter

    found: dict[int, torch.nn.Module] = {}
    seen: set[int] = set()
    for chunk in model_chunks:
        for mod in chunk.modules():
            router = getattr(getattr(mod, "mlp", None), "router", None)
            if not isinstance(router, TopKRouter) or not hasattr(mod, "layer_number") or id(mod) in seen:
                continue
            seen.add(id(mod))
            layer = int(mod.layer_number) - 1
            if layer in found and found[layer] is not router:
                raise ValueError(f"two MoE layers of this rank claim global layer index {layer}")
            found[layer] = router
    return sorted(found.items())


def experts_from_map(routing_map_NE: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K experts of each token from a [N, E] routing map, ascending (int64 [N, K]), and the
    number of tokens whose row does not hold exactly K experts (a 0-dim tensor; no host sync)."""
    counts_N = routing_map_NE.sum(-1)
    idx_NK = routing_map_NE.to(torch.float32).topk(topk, dim=-1).indices.sort(-1).values
    return idx_NK, (counts_N != topk).sum()


def router_distribution(router: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """[N, E] fp32: the router's distribution over experts for ``hidden`` [S_loc, B, H]."""
    with torch.no_grad():
        logits = router.gating(hidden).reshape(-1, router.config.num_moe_experts).float()
        if router.score_function == "sigmoid":
            s = torch.sigmoid(logits)
            return s / s.sum(-1, keepdim=True)
        return torch.softmax(logits, dim=-1)


class RouteCapture:
    """Forward hooks on the given routers that record every forward of a pass.

    ``start()`` installs the hooks, the pass runs (any number of micro-batches, any schedule:
    each router sees the micro-batches in order), ``finish(n)`` removes them and returns one
    :class:`Routes` per micro-batch. Hooks also fire in ``torch.no_grad`` passes; recorded
    tensors are detached."""

    def __init__(self, routers: list[tuple[int, torch.nn.Module]], *, num_experts: int, topk: int, groups,
                 probs: bool, used: bool = False) -> None:
        self.routers, self.num_experts, self.topk = routers, num_experts, topk
        self.groups, self.want_probs = groups, probs
        self.used = used  # record the experts the layers ran (a replay's), not the routers' choices
        self.dtype = index_dtype(num_experts)
        self._records: dict[int, list[tuple[int, int, torch.Tensor, torch.Tensor | None]]] = {}
        self._bad_rows: list[torch.Tensor] = []
        self._handles: list = []
        self.seconds = 0.0  # host time spent in the hooks and the final gather

    def start(self) -> "RouteCapture":
        assert not self._handles, "capture already started"
        self._records = {layer: [] for layer, _ in self.routers}
        self._bad_rows = []
        self._handles = [r.register_forward_hook(self._hook(layer)) for layer, r in self.routers]
        for _, r in self.routers:
            rr = getattr(r, "router_replay", None)
            if hasattr(rr, "record_live") and not self.used:  # a scoped replay object (replay.py)
                rr.record_live = True
        return self

    def _hook(self, layer: int):
        def hook(router, args, out):
            t0 = time.perf_counter()
            hidden = args[0]
            live_NK = getattr(getattr(router, "router_replay", None), "live_NK", None)
            if live_NK is not None:  # a replayed forward: the router's own top-k, not the replayed one
                router.router_replay.live_NK = None
                idx_NK, bad = live_NK.sort(-1).values, torch.zeros((), dtype=torch.long)
            else:
                idx_NK, bad = experts_from_map(out[1].detach(), router.topk)
            p_NE = router_distribution(router, hidden) if self.want_probs else None
            self._records[layer].append((hidden.shape[0], hidden.shape[1], idx_NK.to(self.dtype), p_NE))
            self._bad_rows.append(bad)
            self.seconds += time.perf_counter() - t0

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for _, r in self.routers:
            rr = getattr(r, "router_replay", None)
            if hasattr(rr, "record_live"):
                rr.record_live, rr.live_NK = False, None

    def finish(self, shapes_BS: Sequence[tuple[int, int]]) -> list[Routes]:
        """Remove the hooks; the routes of each micro-batch of the pass, whose ``tokens`` shapes
        are ``shapes_BS`` (every TP rank of a pipeline stage must call it: sequence-parallel
        slices are gathered). A stage without MoE layers gets routes with L = 0."""
        t0 = time.perf_counter()
        self.remove()
        num_microbatches = len(shapes_BS)
        for layer, recs in self._records.items():
            if len(recs) != num_microbatches:
                raise RuntimeError(f"routing capture: the router of layer {layer} ran {len(recs)} times in a pass "
                                   f"of {num_microbatches} micro-batches")
        if self._bad_rows and int(torch.stack(self._bad_rows).sum()):
            raise RuntimeError("routing capture: a router sent a token to a number of experts other than top-k "
                               "(token dropping, moe_expert_capacity_factor, is not supported by routing capture)")
        layers = [layer for layer, _ in self.routers]
        d, g = self.groups.dims, self.groups
        out = []
        for m, (B, S) in enumerate(shapes_BS):
            if not layers:  # a pipeline stage without MoE layers: empty, but shaped like the others
                probs = torch.empty(B, S, 0, self.num_experts) if self.want_probs else None
                out.append(Routes([], torch.empty(B, S, 0, self.topk, dtype=self.dtype), probs))
                continue
            recs = [self._records[layer][m] for layer in layers]
            S_loc = S // d.cp // d.tp if d.sp else S // d.cp
            if any(r[0] != S_loc or r[1] != B for r in recs):
                raise RuntimeError(f"routing capture: micro-batch {m} has tokens [{B}, {S}], its routers saw "
                                   f"{sorted({(r[1], r[0]) for r in recs})} (micro-batches out of order?)")
            idx = from_router_order(torch.stack([r[2] for r in recs], 1), S_loc, B,
                                    tp_group=g.tp_group, tp=d.tp, sp=d.sp, cp_group=g.cp_group, cp=d.cp)
            probs = None
            if self.want_probs:
                probs = from_router_order(torch.stack([r[3] for r in recs], 1), S_loc, B,
                                          tp_group=g.tp_group, tp=d.tp, sp=d.sp, cp_group=g.cp_group, cp=d.cp)
            out.append(Routes(layers, idx, probs))
        self._records = {}
        self.seconds += time.perf_counter() - t0
        return out
