"""Parallel degrees and their validation: pure, no process group needed.

``ParallelConfig`` is what a user writes; ``ParallelDims`` is the validated layout for one
world size and one model, built before anything else so that a bad combination fails in
milliseconds with the numbers in the message, not after minutes of start-up.

Layout (Megatron's ``order="tp-cp-ep-dp-pp"``): the dense part is TP x DP x PP; the expert
part of each MoE layer re-folds the same TP x DP ranks into ETP x EP x EDP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1  # TP: attention heads, dense MLP and vocabulary split over this many ranks
    pipeline_parallel: int = 1  # PP: consecutive layer stages, run through Megatron's 1F1B schedule
    expert_parallel: int = 1  # EP: routed experts of each MoE layer split over this many ranks
    expert_tensor_parallel: Optional[int] = None  # ETP: each expert's matrices split over this many ranks (None: = TP)
    # Used only when TP > 1; Megatron requires it for MoE training with TP.
    sequence_parallel: bool = True  # SP: shard activations along the sequence inside TP regions


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model that constrain the layout."""

    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    ffn_hidden_size: int = 0


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tp: int
    pp: int
    ep: int
    etp: int
    sp: bool
    dp: int  # data-parallel degree of the dense part: world / (tp * pp)
    edp: int  # data-parallel degree of the experts: world / (etp * ep * pp)

    @classmethod
    def build(cls, cfg: ParallelConfig, world_size: int, model: ModelShape | None = None) -> "ParallelDims":
        """Validate ``cfg`` against ``world_size`` (and ``model`` when given). Raises ValueError."""
        tp, pp, ep = cfg.tensor_parallel, cfg.pipeline_parallel, cfg.expert_parallel
        etp = cfg.expert_tensor_parallel if cfg.expert_tensor_parallel is not None else tp
        for name, v in (("tensor_parallel", tp), ("pipeline_parallel", pp),
                        ("expert_parallel", ep), ("expert_tensor_parallel", etp),
                        ("world_size", world_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if world_size % (tp * pp):
            raise ValueError(
                f"world_size ({world_size}) must be divisible by tensor_parallel ({tp}) x "
                f"pipeline_parallel ({pp}) = {tp * pp}")
        if world_size % (etp * ep * pp):
            raise ValueError(
                f"world_size ({world_size}) must be divisible by expert_tensor_parallel ({etp}) x "
                f"expert_parallel ({ep}) x pipeline_parallel ({pp}) = {etp * ep * pp}")
        sp = bool(cfg.sequence_parallel and tp > 1)
        dims = cls(world_size, tp, pp, ep, etp, sp, world_size // (tp * pp), world_size // (etp * ep * pp))
        if model is not None:
            dims.check_model(model)
        return dims

    def check_model(self, m: ModelShape) -> None:
        if m.num_layers % self.pp:
            raise ValueError(f"pipeline_parallel ({self.pp}) must divide num_layers ({m.num_layers})")
        if m.num_attention_heads % self.tp:
            raise ValueError(
                f"tensor_parallel ({self.tp}) must divide num_attention_heads ({m.num_attention_heads})")
        if m.num_query_groups % self.tp:
            raise ValueError(
                f"tensor_parallel ({self.tp}) must divide the number of key/value heads "
                f"({m.num_query_groups})")
        if m.ffn_hidden_size and m.ffn_hidden_size % self.tp:
            raise ValueError(
                f"tensor_parallel ({self.tp}) must divide ffn_hidden_size ({m.ffn_hidden_size})")
        if m.num_experts:
            if m.num_experts % self.ep:
                raise ValueError(
                    f"expert_parallel ({self.ep}) must divide num_experts ({m.num_experts})")
            if m.moe_ffn_hidden_size % self.etp:
                raise ValueError(
                    f"expert_tensor_parallel ({self.etp}) must divide moe_ffn_hidden_size "
                    f"({m.moe_ffn_hidden_size})")
            if self.tp > 1 and not self.sp:
                raise ValueError(
                    f"MoE with tensor_parallel ({self.tp}) needs sequence_parallel=true "
                    "(Megatron-Core refuses MoE + TP without SP when training)")
        else:
            if self.ep > 1:
                raise ValueError(f"expert_parallel ({self.ep}) > 1 needs a MoE model (num_experts is 0)")
            if self.etp != self.tp:
                raise ValueError(
                    f"expert_tensor_parallel ({self.etp}) set on a dense model; leave it unset")

    def describe(self) -> str:
        return (f"TP{self.tp}{'+SP' if self.sp else ''} PP{self.pp} EP{self.ep} ETP{self.etp} "
                f"DP{self.dp} (world {self.world_size})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
