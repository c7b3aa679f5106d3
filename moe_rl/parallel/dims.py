"""Parallel degrees and their validation: pure, no process group needed.

``ParallelConfig`` is what a user writes; ``ParallelDims`` is the validated layout for one
world size and one model, built before anything else so that a bad combination fails in
milliseconds with the numbers in the message, not after minutes of start-up.

Layout (Megatron's ``order="tp-cp-ep-dp-pp"``): the dense part is TP x CP x DP x PP; the expert
part of each MoE layer re-folds the same TP x CP x DP ranks into ETP x EP x EDP.

Pipeline split: the decoder layers are cut into PP x VPP consecutive stages (virtual stage v
of pipeline rank p holds the (v * PP + p)-th piece, Megatron's interleaved order). By default
the pieces balance the stages' cost, where the first stage also pays for the input embedding
and the last for the output layer and loss, each counted as a configurable number of decoder
layers (:func:`balanced_split`); ``pipeline_layout`` gives the split explicitly. Either way the
split reaches Megatron-Core as its own ``pipeline_model_parallel_layout``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1  # TP: attention heads, dense MLP and vocabulary split over this many ranks
    pipeline_parallel: int = 1  # PP: consecutive layer stages, run through Megatron's 1F1B schedule
    expert_parallel: int = 1  # EP: routed experts of each MoE layer split over this many ranks
    expert_tensor_parallel: Optional[int] = None  # ETP: each expert's matrices split over this many ranks (None: = TP)
    # Used only when TP > 1; Megatron requires it for MoE training with TP.
    sequence_parallel: bool = True  # SP: shard activations along the sequence inside TP regions
    virtual_pipeline: int = 1  # VPP: model chunks per pipeline rank, run by Megatron's interleaved 1F1B schedule
    # Decoder layers per pipeline stage, in layer order over pipeline_parallel x virtual_pipeline
    # stages: counts "3,5,5,3", or Megatron-Core's layout string "Ettt|ttttt|ttttt|tttL". None: balanced.
    pipeline_layout: Optional[str] = None  # per-stage layer counts "3,5,5,3" or Megatron's layout string; None: balanced
    pipeline_embedding_layers: float = 1.0  # the input embedding weighs this many decoder layers in the balanced split
    pipeline_output_layers: float = 1.0  # the output layer and loss weigh this many decoder layers in the balanced split
    context_parallel: int = 1  # CP: each sequence split over this many ranks (load-balanced 2 x CP chunks)


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
    dp: int  # data-parallel degree of the dense part: world / (tp * cp * pp)
    edp: int  # data-parallel degree of the experts: world / (etp * ep * pp)
    vpp: int = 1
    cp: int = 1
    pipeline_layout: Optional[str] = None  # as given (normalised to a string), None: balanced
    embedding_layers: float = 1.0
    output_layers: float = 1.0

    @classmethod
    def build(cls, cfg: ParallelConfig, world_size: int, model: ModelShape | None = None) -> "ParallelDims":
        """Validate ``cfg`` against ``world_size`` (and ``model`` when given). Raises ValueError."""
        tp, pp, ep = cfg.tensor_parallel, cfg.pipeline_parallel, cfg.expert_parallel
        vpp, cp = cfg.virtual_pipeline, cfg.context_parallel
        etp = cfg.expert_tensor_parallel if cfg.expert_tensor_parallel is not None else tp
        for name, v in (("tensor_parallel", tp), ("pipeline_parallel", pp),
                        ("expert_parallel", ep), ("expert_tensor_parallel", etp),
                        ("virtual_pipeline", vpp), ("context_parallel", cp),
                        ("world_size", world_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if vpp > 1 and pp == 1:
            raise ValueError(f"virtual_pipeline ({vpp}) > 1 needs pipeline_parallel > 1")
        for name, v in (("pipeline_embedding_layers", cfg.pipeline_embedding_layers),
                        ("pipeline_output_layers", cfg.pipeline_output_layers)):
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        if world_size % (tp * cp * pp):
            raise ValueError(
                f"world_size ({world_size}) must be divisible by tensor_parallel ({tp}) x "
                + (f"context_parallel ({cp}) x " if cp > 1 else "")
                + f"pipeline_parallel ({pp}) = {tp * cp * pp}")
        if world_size % (etp * ep * pp):
            raise ValueError(
                f"world_size ({world_size}) must be divisible by expert_tensor_parallel ({etp}) x "
                f"expert_parallel ({ep}) x pipeline_parallel ({pp}) = {etp * ep * pp}")
        sp = bool(cfg.sequence_parallel and tp > 1)
        layout = cfg.pipeline_layout
        if layout is not None and not isinstance(layout, str):
            layout = ",".join(str(int(n)) for n in layout)  # a list of counts from Python
        if layout is not None and pp == 1:
            raise ValueError(f"pipeline_layout ({layout!r}) set with pipeline_parallel (1)")
        dims = cls(world_size, tp, pp, ep, etp, sp, world_size // (tp * cp * pp),
                   world_size // (etp * ep * pp), vpp=vpp, cp=cp, pipeline_layout=layout,
                   embedding_layers=float(cfg.pipeline_embedding_layers),
                   output_layers=float(cfg.pipeline_output_layers))
        if model is not None:
            dims.check_model(model)
        return dims

    @property
    def num_stages(self) -> int:
        """Pipeline stages the layers are cut into: PP x VPP."""
        return self.pp * self.vpp

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers of each of the PP x VPP stages, in layer order (virtual stage v of
        pipeline rank p is entry v * PP + p). Raises ValueError for an impossible split."""
        n = self.num_stages
        if self.pipeline_layout is None:
            if num_layers < n:
                raise ValueError(
                    f"pipeline_parallel ({self.pp}) x virtual_pipeline ({self.vpp}) = {n} stages need "
                    f"at least {n} layers (one per stage); the model has {num_layers}")
            return balanced_split(num_layers, n, self.embedding_layers, self.output_layers)
        counts = parse_pipeline_layout(self.pipeline_layout)
        if len(counts) != n:
            raise ValueError(
                f"pipeline_layout {self.pipeline_layout!r} has {len(counts)} stages; pipeline_parallel "
                f"({self.pp}) x virtual_pipeline ({self.vpp}) needs {n}")
        if sum(counts) != num_layers:
            raise ValueError(
                f"pipeline_layout {self.pipeline_layout!r} places {sum(counts)} layers; the model has "
                f"{num_layers}")
        if min(counts) < 1:
            raise ValueError(
                f"pipeline_layout {self.pipeline_layout!r}: stage {counts.index(min(counts))} has no "
                "layer (every stage needs at least one)")
        return counts

    def megatron_layout(self, num_layers: int) -> list[list[str]]:
        """:meth:`stage_layers` as Megatron-Core's ``pipeline_model_parallel_layout`` (a list
        of PP x VPP stages of layer types: "embedding" first, "loss" last)."""
        stages = [["decoder"] * c for c in self.stage_layers(num_layers)]
        stages[0].insert(0, "embedding")
        stages[-1].append("loss")
        return stages

    def stage_index(self, pp_rank: int, vp_stage: int = 0) -> int:
        """Position of (pipeline rank, virtual stage) in layer order."""
        return vp_stage * self.pp + pp_rank

    def layer_range(self, num_layers: int, pp_rank: int, vp_stage: int = 0) -> range:
        """Global indices of the decoder layers of one stage."""
        counts = self.stage_layers(num_layers)
        i = self.stage_index(pp_rank, vp_stage)
        start = sum(counts[:i])
        return range(start, start + counts[i])

    def check_model(self, m: ModelShape) -> None:
        self.stage_layers(m.num_layers)
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
        extra = (f" VPP{self.vpp}" if self.vpp > 1 else "") + (f" CP{self.cp}" if self.cp > 1 else "")
        split = f" split {self.pipeline_layout}" if self.pipeline_layout else ""
        return (f"TP{self.tp}{'+SP' if self.sp else ''} PP{self.pp}{extra} EP{self.ep} ETP{self.etp} "
                f"DP{self.dp}{split} (world {self.world_size})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def balanced_split(num_layers: int, num_stages: int, embedding_layers: float = 1.0,
                   output_layers: float = 1.0) -> tuple[int, ...]:
    """Layers per stage (each >= 1) minimising the most expensive stage, where a stage costs
    its layers, plus ``embedding_layers`` on the first and ``output_layers`` on the last.
    Ties go to the most even layer counts, then to fewer layers on earlier stages.

    The middle stages carry no extra cost, so an optimum spreads them evenly: only the first
    and last counts are searched (O(layers^2))."""
    if num_stages == 1:
        return (num_layers,)
    best = None
    for first in range(1, num_layers - num_stages + 2):
        for last in range(1, num_layers - first - (num_stages - 2) + 1):
            mid_layers, mids = num_layers - first - last, num_stages - 2
            if mids == 0 and mid_layers:
                continue
            q, r = divmod(mid_layers, mids) if mids else (0, 0)
            middle = [q] * (mids - r) + [q + 1] * r
            counts = (first, *middle, last)
            cost = max(first + embedding_layers, last + output_layers, *(middle or [0]))
            key = (cost, max(counts) - min(counts), counts)
            if best is None or key < best[0]:
                best = (key, counts)
    return best[1]


_LAYOUT_CHARS = {"E", "L", "t", "|", ",", "(", ")", "*", " "}


def parse_pipeline_layout(layout: str | Sequence[int]) -> tuple[int, ...]:
    """Decoder layers per stage from ``pipeline_layout``: counts ("3,5,5,3" or a list) or
    Megatron-Core's layout string ("Ettt|ttttt|ttttt|tttL", with its ``(..)*n`` and ``x*n``
    repetitions), in which the embedding "E" must open the first stage and the loss "L"
    close the last. Raises ValueError naming what is wrong."""
    if not isinstance(layout, str):
        return tuple(int(n) for n in layout)
    text = layout.strip()
    if text and all(c.isdigit() or c in ", " for c in text):
        parts = [p for p in text.replace(" ", "").split(",")]
        if any(not p for p in parts):
            raise ValueError(f"pipeline_layout {layout!r}: empty entry in the list of layer counts")
        return tuple(int(p) for p in parts)
    bad = sorted({c for c in text if c not in _LAYOUT_CHARS and not c.isdigit()})
    if bad:
        raise ValueError(f"pipeline_layout {layout!r}: unknown characters {bad} (Megatron's layout "
                         "string uses E embedding, t decoder layer, L loss, | between stages; "
                         "or give layer counts such as '3,5,5,3')")
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    try:
        stages = PipelineParallelLayerLayout.parse_str_to_list(text)
    except AssertionError as e:
        raise ValueError(f"pipeline_layout {layout!r}: {e}") from None
    names = [[t.name for t in st] for st in stages]
    flat = [t for st in names for t in st]
    if flat.count("embedding") != 1 or names[0][:1] != ["embedding"]:
        raise ValueError(f"pipeline_layout {layout!r}: the first stage must start with the embedding 'E' "
                         "(exactly once)")
    if flat.count("loss") != 1 or names[-1][-1:] != ["loss"]:
        raise ValueError(f"pipeline_layout {layout!r}: the last stage must end with the loss 'L' "
                         "(exactly once)")
    return tuple(st.count("decoder") for st in names)
