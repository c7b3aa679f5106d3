"""The HF <-> Megatron parameter map: one table per model, used by BOTH conversion and sync.

An entry names one Megatron parameter in its *canonical* form (TP=1, EP=1, PP=1 names, global
layer and expert indices) and the HF tensors it is made of. The kinds of entry:

* ``copy``   the same tensor under another name;
* ``qkv``    Megatron's fused QKV, laid out per query group: for each of the G groups,
             its H/G query heads, then its key head, then its value head (rows of D);
* ``glu``    Megatron's fused fc1 = [gate; up] (rows);

Going to a rank's shard is a separate step (:func:`shard`), driven by the parallel
attributes Megatron itself puts on each parameter (``partition_dim``) plus the entry kind
(a GLU shard is [gate_i; up_i], not a plain chunk). Both directions are exact inverses,
which the tests check in both directions against independent references (HF forward).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch

# Legend: Q query heads, G query groups (kv heads), D head dim, H hidden, I ffn hidden.


@dataclass(frozen=True)
class Entry:
    mcore: str  # canonical Megatron name (TP1/EP1/PP1, global layer and expert indices)
    hf: tuple[str, ...]  # the HF tensor names it is built from, in the order the kind expects
    kind: str = "copy"  # copy | qkv | glu
    qkv_shape: tuple[int, int, int] | None = None  # (Q, G, D) for qkv entries
    vocab: bool = False  # vocabulary-indexed rows (embedding, output layer): padded to the Megatron vocab

    def to_mcore(self, get: Callable[[str], torch.Tensor], padded_vocab: int | None = None) -> torch.Tensor:
        ts = [get(n) for n in self.hf]
        if self.kind == "copy":
            out = ts[0]
        elif self.kind == "glu":
            out = torch.cat(ts, dim=0)
        elif self.kind == "qkv":
            out = _fuse_qkv(*ts, self.qkv_shape)
        else:
            raise AssertionError(self.kind)
        if self.vocab and padded_vocab is not None and out.shape[0] < padded_vocab:
            pad = out.new_zeros((padded_vocab - out.shape[0],) + tuple(out.shape[1:]))
            out = torch.cat([out, pad], dim=0)
        return out

    def to_mcore_parts(self, get: Callable[[str], torch.Tensor]) -> list[torch.Tensor]:
        """The canonical tensor (no vocabulary padding) as row blocks whose concatenation on
        dim 0 is ``to_mcore(get)``: a glu entry is [gate, up] left unfused, so a writer that
        stores gate and up apart (Megatron's checkpoint does) never copies them."""
        if self.kind == "glu":
            return [get(n) for n in self.hf]
        return [self.to_mcore(get)]

    def to_mcore_chunk(self, get_chunk: Callable[[str, int, int, int], torch.Tensor],
                       partition_dim: int, rank: int, size: int) -> torch.Tensor:
        """This rank's shard, reading only its part of each HF tensor.

        Equals ``shard(self.to_mcore(get), ...)``: a qkv chunk is whole query groups, a glu
        chunk is [gate_i; up_i]. ``get_chunk(name, dim, index, parts)`` reads one chunk.
        The caller makes sure no vocabulary padding is involved."""
        if self.kind == "copy":
            return get_chunk(self.hf[0], partition_dim, rank, size)
        assert partition_dim == 0, (self.mcore, partition_dim)
        parts = [get_chunk(n, 0, rank, size) for n in self.hf]
        if self.kind == "glu":
            return torch.cat(parts, dim=0)
        Q, G, D = self.qkv_shape
        return _fuse_qkv(*parts, (Q // size, G // size, D))

    def to_hf(self, t: torch.Tensor, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
        if self.vocab and vocab_size is not None:
            t = t[:vocab_size]
        if self.kind == "copy":
            return {self.hf[0]: t}
        if self.kind == "glu":
            gate, up = t.chunk(2, dim=0)
            return {self.hf[0]: gate, self.hf[1]: up}
        if self.kind == "qkv":
            q, k, v = _split_qkv(t, self.qkv_shape)
            return dict(zip(self.hf, (q, k, v)))
        raise AssertionError(self.kind)


def _fuse_qkv(q_QDxH, k_GDxH, v_GDxH, shape):
    Q, G, D = shape
    rest = tuple(q_QDxH.shape[1:])
    q = q_QDxH.reshape((G, Q // G * D) + rest)
    k = k_GDxH.reshape((G, D) + rest)
    v = v_GDxH.reshape((G, D) + rest)
    return torch.cat([q, k, v], dim=1).reshape((-1,) + rest)


def _split_qkv(qkv, shape):
    Q, G, D = shape
    rest = tuple(qkv.shape[1:])
    per = qkv.reshape((G, (Q // G + 2) * D) + rest)
    q, k, v = torch.split(per, [Q // G * D, D, D], dim=1)
    return (q.reshape((Q * D,) + rest), k.reshape((G * D,) + rest), v.reshape((G * D,) + rest))


class ParamMap:
    """All entries of one model, looked up by canonical Megatron name."""

    def __init__(self, entries: Iterable[Entry], vocab_size: int):
        self.entries = {e.mcore: e for e in entries}
        self.vocab_size = vocab_size

    def __getitem__(self, name: str) -> Entry:
        return self.entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def hf_names(self) -> set[str]:
        return {n for e in self.entries.values() for n in e.hf}

    def to_hf(self, mcore_full: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical Megatron tensors -> HF tensors (the export direction)."""
        out: dict[str, torch.Tensor] = {}
        for name, t in mcore_full.items():
            for k, v in self.entries[name].to_hf(t, self.vocab_size).items():
                if k in out and not torch.equal(out[k], v):
                    raise ValueError(f"HF tensor {k} produced twice with different values")
                out[k] = v
        return out


# ---------------------------------------------------------------- local <-> canonical names

_LAYER_RE = re.compile(r"(decoder\.layers\.)(\d+)(\.)")
_EXPERT_RE = re.compile(r"(local_experts\.)(\d+)(\.)")


def canonical_name(local: str, *, layer_offset: int, expert_offset: int) -> str:
    """A rank's parameter name -> canonical name (global layer and expert indices)."""
    name = _LAYER_RE.sub(lambda m: f"{m[1]}{int(m[2]) + layer_offset}{m[3]}", local, count=1)
    return _EXPERT_RE.sub(lambda m: f"{m[1]}{int(m[2]) + expert_offset}{m[3]}", name, count=1)


# ---------------------------------------------------------------------------- sharding


def shard(full: torch.Tensor, entry: Entry, *, partition_dim: int | None, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of a canonical tensor. ``partition_dim`` None: replicated."""
    if partition_dim is None or size == 1:
        return full
    if entry.kind == "glu":
        assert partition_dim == 0, entry.mcore
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, 0)[rank], up.chunk(size, 0)[rank]], dim=0)
    if full.shape[partition_dim] % size:
        raise ValueError(f"{entry.mcore}: dim {partition_dim} of size {full.shape[partition_dim]} "
                         f"does not split over {size} ranks")
    return full.chunk(size, dim=partition_dim)[rank]


def unshard(parts: list[torch.Tensor], entry: Entry, *, partition_dim: int | None) -> torch.Tensor:
    """Inverse of :func:`shard` given every rank's slice in rank order."""
    if partition_dim is None or len(parts) == 1:
        return parts[0]
    if entry.kind == "glu":
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat([torch.cat(gates, 0), torch.cat(ups, 0)], dim=0)
    return torch.cat(parts, dim=partition_dim)
