"""The export plan: which HF tensors the inference engine gets, read from which rank's shards,
transformed how, in which bucket. Plain data, built without any process group.

Input: the family's parameter map (one definition shared with conversion and loading), the
HF tensor shapes (a checkpoint's safetensors headers), the training layout, a bucket size.
Output: :class:`ExportPlan`, a tuple of :class:`Bucket`; a bucket is a list of :class:`Item`
that one *sender* rank assembles and ships; an item is one canonical Megatron tensor,
gathered once from its TP (or ETP) shards and turned into 1-3 HF tensors (``copy``, the
``qkv`` split into q/k/v, the ``glu`` split into gate/up; vocabulary padding trimmed).

Who sends what (Megatron's rank order ``tp-cp-ep-dp-pp``): the dense part of pipeline
stage ``s`` is sent by its rank (tp 0, cp 0, dp 0, pp s) after a gather in its TP group; the
experts of EP rank ``r`` by (etp 0, ep r, edp 0, pp s) after a gather in its ETP group.
So every PP stage and every EP rank exports what it owns: experts are never gathered onto
one rank. Other data-parallel replicas take no part. A layer's stage comes from the layout's
split (``ParallelDims.stage_layers``: uneven stages, and with virtual pipeline stages the
model chunk of the rank that holds it, :attr:`Item.chunk`).

How a Megatron parameter is split over TP is Megatron's choice (column-parallel: dim 0,
row-parallel: dim 1, the rest replicated); :data:`COLUMN_PARALLEL` / :data:`ROW_PARALLEL`
restate it by module name for the pure plan, and the export stream asserts that the live
model's ``partition_dim`` agrees, parameter by parameter.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from moe_rl.models import family_for
from moe_rl.models.param_map import Entry
from moe_rl.parallel.dims import ParallelDims

DEFAULT_BUCKET_BYTES = 512 << 20  # slime's default update buffer; see README "bucket size"

# Megatron modules whose weight is split over TP on dim 0 (ColumnParallelLinear,
# VocabParallelEmbedding) and on dim 1 (RowParallelLinear). Everything else is replicated
# (norms, routers, the router's expert bias, MLA's down-projections in our spec).
COLUMN_PARALLEL = ("linear_qkv", "linear_fc1", "linear_q_proj", "linear_q_up_proj", "linear_kv_up_proj",
                   "word_embeddings", "output_layer")
ROW_PARALLEL = ("linear_proj", "linear_fc2")

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")


def is_expert(mcore: str) -> bool:
    """Routed-expert parameters (split over EP and ETP); shared experts are dense."""
    return ".mlp.experts." in mcore


def partition_dim(mcore: str) -> int | None:
    """The dim Megatron splits canonical tensor ``mcore`` on over TP (ETP for experts), or None."""
    parts = mcore.split(".")
    module, kind = parts[-2], parts[-1]
    if module in COLUMN_PARALLEL:
        return 0
    if module in ROW_PARALLEL and kind == "weight":
        return 1
    return None


@functools.lru_cache(maxsize=None)
def element_size(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


@dataclass(frozen=True)
class HFTensor:
    name: str  # the HF checkpoint name the engine expects
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"

    @property
    def nbytes(self) -> int:
        n = element_size(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Item:
    """One canonical Megatron tensor: gathered from ``sources`` (in shard order) on the
    sender, reassembled, transformed by ``kind`` into ``hf``."""

    entry: Entry  # the parameter map's entry: canonical name, HF names, transform (copy | qkv | glu)
    hf: tuple[HFTensor, ...]  # what it becomes, in the entry's order
    sources: tuple[int, ...]  # global ranks holding its shards, shard 0 first (the sender is one of them)
    local_name: str  # its name in those ranks' state dicts (local layer and expert indices)
    partition_dim: int | None  # split dim over ``group`` (None: whole tensor on the sender)
    group: str  # "tp" or "etp": the group its shards are gathered in
    shape: tuple[int, ...]  # canonical (gathered) shape, vocabulary padding included
    vocab_rows: int | None = None  # rows to keep (the true vocabulary) when padded
    chunk: int = 0  # the model chunk (virtual pipeline stage) of the source ranks that holds it

    @property
    def mcore(self) -> str:
        return self.entry.mcore

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.hf)


@dataclass(frozen=True)
class Bucket:
    index: int
    sender: int  # global rank that assembles and ships it
    items: tuple[Item, ...]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.items)

    @property
    def tensors(self) -> tuple[HFTensor, ...]:
        return tuple(t for i in self.items for t in i.hf)


@dataclass(frozen=True)
class RankCoords:
    """Where a global rank sits in both folds of the layout."""

    tp: int
    dp: int
    pp: int
    etp: int
    ep: int
    edp: int
    cp: int = 0


@dataclass(frozen=True)
class ExportPlan:
    dims: ParallelDims
    bucket_bytes: int
    buckets: tuple[Bucket, ...]

    def senders(self) -> list[int]:
        return sorted({b.sender for b in self.buckets})

    def buckets_of(self, rank: int) -> list[Bucket]:
        """Buckets ``rank`` sends."""
        return [b for b in self.buckets if b.sender == rank]

    def involves(self, rank: int, bucket: Bucket) -> bool:
        return bucket.sender == rank or any(rank in i.sources for i in bucket.items)

    def tensors(self) -> list[HFTensor]:
        return [t for b in self.buckets for t in b.tensors]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buckets)

    def summary(self) -> str:
        sizes = [b.nbytes for b in self.buckets]
        return (f"{len(self.tensors())} HF tensors, {self.nbytes / 2**20:.1f} MiB in {len(sizes)} buckets "
                f"(<= {self.bucket_bytes / 2**20:g} MiB, largest {max(sizes, default=0) / 2**20:.1f} MiB) "
                f"from {len(self.senders())} sender ranks at {self.dims.describe()}")


# ------------------------------------------------------------------ ranks (Megatron's order)


def dense_rank(dims: ParallelDims, *, tp: int, dp: int, pp: int, cp: int = 0) -> int:
    """Global rank of dense coordinates (order tp-cp-dp-pp, tp fastest)."""
    return tp + dims.tp * (cp + dims.cp * (dp + dims.dp * pp))


def expert_rank(dims: ParallelDims, *, etp: int, ep: int, edp: int, pp: int) -> int:
    """Global rank of expert coordinates (order etp-ep-edp-pp, etp fastest)."""
    return etp + dims.etp * (ep + dims.ep * (edp + dims.edp * pp))


def coords(dims: ParallelDims, rank: int) -> RankCoords:
    """Inverse of :func:`dense_rank` and :func:`expert_rank` for one global rank."""
    tp, rest = rank % dims.tp, rank // dims.tp
    cp, rest = rest % dims.cp, rest // dims.cp
    dp, pp = rest % dims.dp, rest // dims.dp
    etp, rest = rank % dims.etp, rank // dims.etp
    ep, rest = rest % dims.ep, rest // dims.ep
    edp = rest % dims.edp
    return RankCoords(tp=tp, dp=dp, pp=pp, etp=etp, ep=ep, edp=edp, cp=cp)


# ------------------------------------------------------------------ the plan


def local_name(mcore: str, *, layer_offset: int, expert_offset: int) -> str:
    """Canonical name -> the holding rank's name (inverse of ``param_map.canonical_name``)."""
    name = _LAYER_RE.sub(lambda m: f"decoder.layers.{int(m[1]) - layer_offset}.", mcore, count=1)
    return _EXPERT_RE.sub(lambda m: f".mlp.experts.local_experts.{int(m[1]) - expert_offset}.", name, count=1)


def _stage_of(mcore: str, dims: ParallelDims, num_layers: int) -> tuple[int, int, int]:
    """(pipeline rank, virtual stage, global index of that stage's first layer) holding ``mcore``."""
    m = _LAYER_RE.match(mcore)
    counts = dims.stage_layers(num_layers)
    if m:
        layer, start = int(m[1]), 0
        for i, c in enumerate(counts):
            if layer < start + c:
                return i % dims.pp, i // dims.pp, start
            start += c
        raise ValueError(f"{mcore}: layer {layer} beyond the model's {num_layers} layers")
    if mcore.startswith("embedding."):
        return 0, 0, 0
    return dims.pp - 1, dims.vpp - 1, num_layers - counts[-1]  # final norm, output layer


def _mcore_shape(entry: Entry, hf_shapes: Mapping[str, Sequence[int]], padded_vocab: int) -> tuple[int, ...]:
    shapes = [tuple(hf_shapes[n]) for n in entry.hf]
    if entry.kind in ("glu", "qkv"):
        rest = shapes[0][1:]
        if any(s[1:] != rest for s in shapes):
            raise ValueError(f"{entry.mcore}: the HF tensors {list(entry.hf)} have shapes {shapes}, "
                             f"which cannot be fused along dim 0")
        return (sum(s[0] for s in shapes),) + rest
    shape = shapes[0]
    if entry.vocab:
        return (padded_vocab,) + shape[1:]
    return shape


def plan_export(hf_config, hf_shapes: Mapping[str, Sequence[int]], dims: ParallelDims, *,
                bucket_bytes: int = DEFAULT_BUCKET_BYTES, dtype: torch.dtype = torch.float32,
                dtypes: Mapping[str, torch.dtype] | None = None) -> ExportPlan:
    """The plan for a model of ``hf_config`` trained at ``dims``, exporting ``dtype`` tensors.

    Entries held in float32 whatever the model's dtype (``Entry.fp32``: DeepSeek's expert
    bias) are exported in float32; ``dtypes`` (canonical Megatron name -> dtype) overrides
    the dtype of single parameters (the converter's "as stored").

    ``hf_shapes`` has the HF tensor shapes (:func:`checkpoint_shapes`); each HF tensor
    appears in exactly one item (for tied embeddings, the first stage's embedding is sent and
    the last stage's copy of it is not). Raises ValueError when the map and the shapes disagree
    or the layout does not divide the model."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes ({bucket_bytes}) must be positive")
    family = family_for(hf_config)
    dims.check_model(family.shape(hf_config))
    pmap = family.param_map(hf_config)
    missing = sorted(pmap.hf_names() - set(hf_shapes))
    if missing:
        raise ValueError(f"{len(missing)} HF tensors of the {family.name} map have no shape, e.g. {missing[0]}")
    L = hf_config.num_hidden_layers
    n_exp = family.num_experts(hf_config)
    padded = family.padded_vocab_size(hf_config, dims)
    dt = str(dtype).removeprefix("torch.")
    claimed: set[str] = set()
    items: list[Item] = []
    for entry in pmap.entries.values():
        if all(n in claimed for n in entry.hf):
            continue  # tied output layer: the embedding already carries it
        assert not any(n in claimed for n in entry.hf), entry.mcore
        claimed.update(entry.hf)
        own = (dtypes or {}).get(entry.mcore, torch.float32 if entry.fp32 else None)
        items.append(_item(entry, hf_shapes, dims, L, n_exp, padded,
                           dt if own is None else str(own).removeprefix("torch."), hf_config.vocab_size))
    return ExportPlan(dims, bucket_bytes, tuple(_buckets(items, bucket_bytes)))


def _item(entry: Entry, hf_shapes, dims: ParallelDims, L: int, n_exp: int, padded: int, dt: str,
          vocab_size: int) -> Item:
    stage, chunk, layer_offset = _stage_of(entry.mcore, dims, L)
    shape = _mcore_shape(entry, hf_shapes, padded)
    pdim = partition_dim(entry.mcore)
    if is_expert(entry.mcore):
        e = int(_EXPERT_RE.search(entry.mcore)[1])
        per = n_exp // dims.ep
        ep = e // per
        size, group = dims.etp, "etp"
        ranks = [expert_rank(dims, etp=r, ep=ep, edp=0, pp=stage) for r in range(size)]
        expert_offset = ep * per
    else:
        size, group = dims.tp, "tp"
        ranks = [dense_rank(dims, tp=r, dp=0, pp=stage) for r in range(size)]
        expert_offset = 0
    if pdim is None or size == 1:
        pdim, ranks = None, ranks[:1]
    elif shape[pdim] % size:
        raise ValueError(f"{entry.mcore}: dim {pdim} of size {shape[pdim]} does not split over "
                         f"{group} ({size}) ranks")
    hf = tuple(HFTensor(n, tuple(hf_shapes[n]), dt) for n in entry.hf)
    vocab_rows = vocab_size if entry.vocab and shape[0] != vocab_size else None
    return Item(entry=entry, hf=hf, sources=tuple(ranks),
                local_name=local_name(entry.mcore, layer_offset=layer_offset, expert_offset=expert_offset),
                partition_dim=pdim, group=group, shape=shape, vocab_rows=vocab_rows, chunk=chunk)


def _buckets(items: list[Item], bucket_bytes: int) -> list[Bucket]:
    """Items grouped per sender (ranks in order, items in map order) into buckets of at most
    ``bucket_bytes``; an item larger than that is a bucket of its own."""
    by_sender: dict[int, list[Item]] = {}
    for it in items:
        by_sender.setdefault(it.sources[0], []).append(it)
    out: list[Bucket] = []
    for sender in sorted(by_sender):
        cur: list[Item] = []
        size = 0
        for it in by_sender[sender]:
            if cur and size + it.nbytes > bucket_bytes:
                out.append(Bucket(len(out), sender, tuple(cur)))
                cur, size = [], 0
            cur.append(it)
            size += it.nbytes
        if cur:
            out.append(Bucket(len(out), sender, tuple(cur)))
    return out


def checkpoint_shapes(hf_dir) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, from a checkpoint's safetensors headers (no tensor is read)."""
    from moe_rl.models.hf_checkpoint import HFCheckpoint

    with HFCheckpoint(hf_dir) as ckpt:
        return {n: tuple(ckpt.shape(n)) for n in ckpt.keys()}
