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

Two spellings of the Megatron names, one per layer spec (:class:`Spelling`): the families
write their tables in the local spec's names (every norm a module of its own); the
Transformer Engine spec fuses a norm into the linear after it and, with grouped experts,
names expert ``e``'s matrices ``experts.linear_fc1.weight<e>`` (:func:`respell`,
:meth:`ParamMap.respelled`; :func:`spelling_of` tells which one a live model uses).
"""

from __future__ import annotations

import dataclasses
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
    fp32: bool = False  # held in float32 whatever params_dtype (Megatron's expert_bias, HF's fp32-kept
    #                     e_score_correction_bias): exported and converted in float32, never rounded

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


    def respelled(self, spelling: "Spelling", *, moe_layers: list[bool], mla: bool) -> "ParamMap":
        """The same map under the names ``spelling``'s layer spec gives (:func:`respell`)."""
        if spelling == LOCAL:
            return self
        entries = []
        for e in self.entries.values():
            m = _LAYER_RE.match(e.mcore)
            moe = bool(m) and moe_layers[int(m[2])]
            entries.append(dataclasses.replace(e, mcore=respell(e.mcore, spelling, moe_layer=moe, mla=mla)))
        return ParamMap(entries, self.vocab_size)


# ---------------------------------------------------------------- local <-> canonical names

_LAYER_RE = re.compile(r"(decoder\.layers\.)(\d+)(\.)")
_EXPERT_RE = re.compile(r"(local_experts\.)(\d+)(\.)")
_GROUPED_EXPERT_RE = re.compile(r"(\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)$")


def canonical_name(local: str, *, layer_offset: int, expert_offset: int) -> str:
    """A rank's parameter name -> canonical name (global layer and expert indices; the
    expert index is ``local_experts.<e>.`` in the local spec and SequentialMLP, the suffix of
    ``experts.linear_fc1.weight<e>`` in TE's grouped experts)."""
    name = _LAYER_RE.sub(lambda m: f"{m[1]}{int(m[2]) + layer_offset}{m[3]}", local, count=1)
    name = _GROUPED_EXPERT_RE.sub(lambda m: f"{m[1]}{int(m[2]) + expert_offset}", name, count=1)
    return _EXPERT_RE.sub(lambda m: f"{m[1]}{int(m[2]) + expert_offset}{m[3]}", name, count=1)


# ---------------------------------------------------------------------------- spellings


@dataclass(frozen=True)
class Spelling:
    """How the layer spec in use names a layer's parameters (Megatron-Core 0.16.1,
    ``models/gpt/gpt_layer_specs.py``)."""

    te: bool = False  # Transformer Engine spec: norms fused into the next linear (TELayerNormColumnParallelLinear)
    grouped_experts: bool = False  # TEGroupedMLP (moe_grouped_gemm): expert e is ``experts.linear_fc1.weight<e>``


LOCAL = Spelling()
TE = Spelling(te=True)
TE_GROUPED = Spelling(te=True, grouped_experts=True)

# A layer's norms the TE spec fuses into the linear that follows, as (local spec name, TE
# name, when): ``get_gpt_layer_with_transformer_engine_spec`` makes the norm an IdentityOp and
# the linear a ``column_parallel_layer_norm_linear``, whose norm weight TE calls
# ``layer_norm_weight``. Attention's input norm: not with MLA (there it stays a TENorm, and
# q/kv_layernorm move into the up-projections instead). The MLP's input norm: dense layers
# only (a MoE layer keeps its TENorm ``pre_mlp_layernorm``).
_TE_FUSED_NORMS = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight", lambda moe, mla: not mla),
    ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight", lambda moe, mla: not moe),
    ("self_attention.q_layernorm.weight", "self_attention.linear_q_up_proj.layer_norm_weight",
     lambda moe, mla: mla),
    ("self_attention.kv_layernorm.weight", "self_attention.linear_kv_up_proj.layer_norm_weight",
     lambda moe, mla: mla),
)


def te_checkpoint_keys_map(*, moe_layer: bool, mla: bool) -> dict[str, str]:
    """The ``sharded_state_dict_keys_map`` that stores a local-spec layer's norms under the
    keys the Transformer Engine spec's layer has (as Megatron's local spec does for dense
    layers; 0.16.1's own map is wrong for MoE layers and missing for MLA), so that one
    ``torch_dist`` checkpoint loads into either spec."""
    return {local[:-len("weight")]: te[:-len("weight")]
            for local, te, applies in _TE_FUSED_NORMS if applies(moe_layer, mla)}


_LOCAL_EXPERT_RE = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")


def respell(name: str, spelling: Spelling, *, moe_layer: bool, mla: bool) -> str:
    """A canonical local-spec name under ``spelling`` (``moe_layer``: the name's layer is a
    MoE layer; ``mla``: the model uses multi-latent attention)."""
    if not spelling.te:
        return name
    m = _LAYER_RE.match(name)
    if not m:
        return name  # embedding, final norm, output layer: the same in both specs
    head, rest = name[:m.end()], name[m.end():]
    for local, te, applies in _TE_FUSED_NORMS:
        if rest == local and applies(moe_layer, mla):
            return head + te
    if spelling.grouped_experts:
        g = _LOCAL_EXPERT_RE.match(rest)
        if g:
            return f"{head}mlp.experts.{g[2]}.{g[3]}{g[1]}"
    return name


def spelling_of(param_names: Iterable[str]) -> Spelling:
    """The spelling a live model's parameter names are in (norm weights inside a linear:
    TE; ``experts.linear_fc1.weight<e>``: TE's grouped experts)."""
    te = grouped = False
    for n in param_names:
        te = te or n.endswith(".layer_norm_weight")
        grouped = grouped or bool(_GROUPED_EXPERT_RE.search(n))
    return Spelling(te=te or grouped, grouped_experts=grouped)


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
