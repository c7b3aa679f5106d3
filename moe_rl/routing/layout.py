"""Routes in the trainer's micro-batch layout, and the conversions to and from a router's own
token order.

Legend: B sequences of a micro-batch, S its positions (``tokens`` is [B, S]), N = S_loc * B
router tokens (S_loc = S, or S / TP under sequence parallelism), L MoE layers, K top-k,
E experts.

Position ``t`` of row ``b`` is the trainer's sequence position (``moe_rl.data.train_batch``:
position t scores token t+1), which is also row ``t`` of an engine's
``[prompt + response - 1, L, K]`` routes (``Sample.routed_experts_NLK``). A Megatron router sees
the same tokens flattened sequence-major (token ``s * B + b``), under sequence parallelism only
its TP rank's slice of the sequence.

Routes travel in the trainer's micro-batch dicts under these keys:

- ``routes_rollout``: the rollout engine's routes, every MoE layer (:func:`attach_engine_routes`),
  -1 where the engine gave none and past each row's end;
- ``routes_old``: what the routers used in the old-policy pass (this pipeline stage's layers);
- ``routes_new``: what they chose in a forward-only pass after the update (this stage's layers);
- ``route_valid``: [B, S] bool, the real tokens (positions < prompt + response - 1);
- ``routes_r3_train``: R3's routes for the training passes, ``routes_rollout`` with the tokens
  the engine gave no route for taken from ``routes_old`` (:func:`fill_missing`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.distributed as dist

ROLLOUT, OLD, NEW, VALID = "routes_rollout", "routes_old", "routes_new", "route_valid"
R3_TRAIN = "routes_r3_train"


@dataclasses.dataclass
class Routes:
    """The routes of one micro-batch in the trainer's layout (rows and positions of ``tokens``)."""

    layer_ids: list[int]  # global layer index of each position along L, increasing
    experts_BSLK: torch.Tensor  # expert ids (compact integer dtype); -1 = no route at this position
    probs_BSLE: torch.Tensor | None = None  # router distribution over the experts (fp32), or None
    valid_BS: torch.Tensor | None = None  # bool: real tokens (not padding); None = all

    def __post_init__(self) -> None:
        assert self.experts_BSLK.dim() == 4 and self.experts_BSLK.shape[2] == len(self.layer_ids), (
            tuple(self.experts_BSLK.shape), self.layer_ids)
        assert list(self.layer_ids) == sorted(set(self.layer_ids)), self.layer_ids

    def layers(self, layer_ids: Sequence[int]) -> "Routes":
        """The same routes restricted to ``layer_ids`` (each must be present)."""
        missing = sorted(set(layer_ids) - set(self.layer_ids))
        if missing:
            raise ValueError(f"routes hold layers {self.layer_ids}, not {missing}")
        pos = [self.layer_ids.index(i) for i in layer_ids]
        return Routes(list(layer_ids), self.experts_BSLK[:, :, pos],
                      None if self.probs_BSLE is None else self.probs_BSLE[:, :, pos], self.valid_BS)

    def cp_slice(self, cp: int, cp_rank: int) -> "Routes":
        """The positions CP rank ``cp_rank`` runs (its load-balanced chunks, in its order), as
        its routers see them; the routes unchanged when ``cp`` is 1."""
        if cp == 1:
            return self
        from moe_rl.parallel.context_parallel import slice_sequence

        cut = lambda t: None if t is None else slice_sequence(t, cp, cp_rank)  # noqa: E731
        return Routes(list(self.layer_ids), cut(self.experts_BSLK), cut(self.probs_BSLE), cut(self.valid_BS))


def fill_missing(primary: Routes, backup: Routes) -> Routes:
    """``primary`` with each (token, layer) that has no route (any -1 among its K experts) taken
    from ``backup`` where ``backup`` has one; layers ``backup`` lacks (another pipeline stage's)
    stay as they are. Same rows and positions required."""
    if primary.experts_BSLK.shape[:2] != backup.experts_BSLK.shape[:2]:
        raise ValueError(f"routes of shape {tuple(primary.experts_BSLK.shape)} and "
                         f"{tuple(backup.experts_BSLK.shape)} cover different tokens")
    experts = primary.experts_BSLK.clone()
    for j, layer in enumerate(primary.layer_ids):
        if layer not in backup.layer_ids:
            continue
        b = backup.experts_BSLK[:, :, backup.layer_ids.index(layer)].to(experts.device, experts.dtype)
        take = (experts[:, :, j] < 0).any(-1) & (b >= 0).all(-1)
        experts[:, :, j][take] = b[take]
    return Routes(list(primary.layer_ids), experts, primary.probs_BSLE, primary.valid_BS)


def index_dtype(num_experts: int) -> torch.dtype:
    """The smallest signed integer dtype that holds expert ids and the -1 placeholder."""
    if num_experts <= torch.iinfo(torch.int8).max:
        return torch.int8
    if num_experts <= torch.iinfo(torch.int16).max:
        return torch.int16
    return torch.int32


def to_router_order(x_BS: torch.Tensor, *, tp_rank: int, tp: int, sp: bool) -> torch.Tensor:
    """[B, S, ...] in the trainer's layout -> [N, ...] in this rank's router order (sequence-major,
    this TP rank's slice of the sequence under sequence parallelism)."""
    x_SB = x_BS.transpose(0, 1)
    if sp and tp > 1:
        S = x_SB.shape[0]
        if S % tp:
            raise ValueError(f"sequence length {S} is not divisible by tensor_parallel ({tp})")
        x_SB = x_SB[tp_rank * (S // tp):(tp_rank + 1) * (S // tp)]
    return x_SB.reshape(-1, *x_SB.shape[2:])


def from_router_order(x_N: torch.Tensor, S_loc: int, B: int, *, tp_group, tp: int, sp: bool,
                      cp_group=None, cp: int = 1) -> torch.Tensor:
    """The inverse of :func:`to_router_order` for a whole micro-batch: [N, ...] -> [B, S, ...],
    gathered over the TP group under sequence parallelism, then over the CP group (a CP rank
    routes its load-balanced chunks of each sequence, ``cp_positions``), so every rank gets
    whole sequences in position order (all TP and CP ranks must call)."""
    x_SB = x_N.reshape(S_loc, B, *x_N.shape[1:])
    if sp and tp > 1:
        x_SB = _all_gather_rows(x_SB, tp, tp_group)
    if cp > 1:
        from moe_rl.parallel.context_parallel import cp_positions

        cat_SB = _all_gather_rows(x_SB, cp, cp_group)
        S = cat_SB.shape[0]
        order = torch.cat([cp_positions(S, cp, r) for r in range(cp)]).to(cat_SB.device)
        x_SB = torch.empty_like(cat_SB)
        x_SB[order] = cat_SB
    return x_SB.transpose(0, 1).contiguous()


def _all_gather_rows(x: torch.Tensor, n: int, group) -> torch.Tensor:
    """Every rank's ``x`` of ``group`` (size ``n``), concatenated along dim 0 in rank order."""
    wire = x.to(torch.int32) if not x.dtype.is_floating_point else x  # gloo lacks int8/int16
    parts = [torch.empty_like(wire) for _ in range(n)]
    dist.all_gather(parts, wire.contiguous(), group=group)
    return torch.cat(parts, 0).to(x.dtype)


def attach_positions(mbs: Sequence[dict], seq_lengths: Sequence[int]) -> None:
    """``mb["route_valid"]`` [B, S]: positions below each row's ``P + T - 1`` (``mb["rows"]``
    indexes ``seq_lengths``, the batch's ``TrainBatch.seq_lengths``)."""
    for mb in mbs:
        B, S = mb["tokens"].shape
        lens = torch.tensor([seq_lengths[i] for i in mb["rows"].tolist()], dtype=torch.int64)
        mb[VALID] = (torch.arange(S)[None, :] < lens[:, None]).to(mb["tokens"].device)


def attach_engine_routes(mbs: Sequence[dict], routes_B: Sequence[Optional[torch.Tensor]],
                         seq_lengths: Sequence[int], layer_ids: Sequence[int], *, num_experts: int) -> None:
    """``mb["routes_rollout"]`` (and ``mb["route_valid"]``) for every micro-batch.

    ``routes_B[i]`` are batch row i's engine routes, ``[P + T - 1, L, K]`` integer expert ids
    with ``L = len(layer_ids)`` (the family's ``moe_layer_ids``, which are also the global layer
    indices of the Megatron model), or None when the engine returned none (those rows then
    fall back to live routing under R3). A row of another length is a ValueError: routes that
    do not line up with the tokens must not be replayed."""
    attach_positions(mbs, seq_lengths)
    L = len(layer_ids)
    known = [r for r in routes_B if r is not None]
    if not known:
        raise ValueError("no batch row has engine routes (rollout.client.return_routed_experts, or the "
                         "embedded engine's capture_routed_experts, must be on for routing.replay=r3)")
    K = known[0].shape[-1]
    dtype = index_dtype(num_experts)
    for mb in mbs:
        B, S = mb["tokens"].shape
        out = torch.full((B, S, L, K), -1, dtype=dtype)
        for b, i in enumerate(mb["rows"].tolist()):
            r = routes_B[i]
            if r is None:
                continue
            n = seq_lengths[i]
            if tuple(r.shape) != (n, L, K):
                raise ValueError(f"batch row {i}: engine routes have shape {tuple(r.shape)}, expected "
                                 f"[prompt + response - 1 = {n}, MoE layers = {L}, top-k = {K}]")
            if r.numel() and (int(r.min()) < 0 or int(r.max()) >= num_experts):
                raise ValueError(f"batch row {i}: engine routes hold expert ids outside [0, {num_experts})")
            out[b, :n] = r.to(dtype)
        mb[ROLLOUT] = Routes(list(layer_ids), out.to(mb["tokens"].device), None, mb[VALID])


