"""Megatron-Core distributed checkpoints (``torch_dist``), written and read one tensor at a time.

What Megatron expects is taken from Megatron itself: a model of the family is built on the
``meta`` device at TP1/PP1/EP1 (no memory, no weights), and its ``sharded_state_dict()``
gives every key, global shape, chunk and ``_extra_state`` object the checkpoint must hold
(stacked layer keys for uniform models, per-layer keys with stacked experts otherwise,
GLU fc1 as [gate; up]). Writing goes through ``torch.distributed.checkpoint`` with Megatron's
own save planner, whose ``resolve_data`` is asked for one chunk at a time: the chunk is then
cut from the one canonical Megatron tensor it belongs to (``read_tensor``), so memory holds
one tensor at a time, whatever the model size. Reading (``read_canonical``) asks
``torch.distributed.checkpoint`` for exactly the regions of a few tensors. Loading such a
checkpoint into a model at any layout is Megatron's own load (it reshards; ``load_into``).

A checkpoint directory (Megatron-LM's layout, plus what we need to go back to HF)::

    OUT/latest_checkpointed_iteration.txt   "release"
    OUT/release/                            metadata.json, .metadata, __0_0.distcp, common.pt
    OUT/hf/                                 config.json, generation config, tokenizer files
    OUT/moe_rl_checkpoint.json              family, model type, dtype, layout checked at conversion

The vocabulary is stored unpadded (HF's rows); Megatron loads embedding and output layer with
``allow_shape_mismatch`` and pads to its own TP.

Parallel semantics: these functions run in one process. :func:`single_process_megatron`
starts a private one-rank gloo group (and Megatron's parallel state) when the process has
none, so conversion needs no launcher and no GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import io
import json
import os
from pathlib import Path
from typing import Callable

import torch

from moe_rl.checkpoint.atomic import fsync_file

TRACKER = "latest_checkpointed_iteration.txt"
RELEASE = "release"
HF_SUBDIR = "hf"
INFO = "moe_rl_checkpoint.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or tensor."""


@contextlib.contextmanager
def single_process_megatron():
    """Megatron's parallel state for one process at TP1/PP1/EP1 (a private gloo group when
    torch.distributed is not running; torn down on exit)."""
    import socket

    import torch.distributed as dist

    from moe_rl.parallel import ParallelConfig, ParallelDims
    from moe_rl.parallel import groups as G

    if not torch.cuda.is_available():
        from moe_rl.parallel.cpu_platform import activate_cpu_mode

        activate_cpu_mode()
    started = False
    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # An explicit store: under torchrun, tcp:// would join the launcher's agent store
        # (TORCHELASTIC_USE_AGENT_STORE) as a client and wait forever.
        store = dist.TCPStore("127.0.0.1", port, 1, is_master=True, timeout=datetime.timedelta(seconds=120))
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        started = True
    elif dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs in one process; this one is part of a "
                           f"{dist.get_world_size()}-rank job")
    # The interpreter's existing objects (torch, transformers, Megatron) are not ours: frozen,
    # teardown's full garbage collection walks only what this block made (0.1-0.3 s less).
    gc.freeze()
    try:
        yield G.setup(ParallelDims.build(ParallelConfig(), 1))
    finally:
        try:
            G.teardown()
            if started:
                dist.destroy_process_group()
        finally:
            gc.unfreeze()


@dataclasses.dataclass
class Shards:
    """Where each parameter of the (TP1/PP1/EP1) model goes in a ``torch_dist`` checkpoint."""

    built: object  # BuiltModel on the meta device (names, shapes, the parameter map)
    per_param: dict[str, list]  # local (= canonical) name -> its ShardedTensors after factories
    objects: dict[str, object]  # ShardedObjects (_extra_state) by state-dict name
    where: dict[tuple[str, tuple[int, ...]], tuple[str, object]]  # (key, chunk offset) -> (param, ShardedTensor)
    shape: dict[str, tuple[int, ...]]  # canonical name -> full shape (vocabulary unpadded at TP1)


def model_shards(hf_config, groups, dtype: torch.dtype) -> Shards:
    """Build the family's model on ``meta`` and read its sharded state dict.

    Always with Megatron's local specs, GPU or not: the checkpoint keys are the same as under
    Transformer Engine (Megatron maps the fused-norm and grouped-expert names onto the local
    ones), only TE's ``_extra_state`` objects are absent (our loader never asks for them); and
    TE layers allocate on an explicit device, which a ``meta`` build cannot give them."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    from moe_rl.train.model import build_model

    with torch.device("meta"):
        built = build_model(hf_config, groups, params_dtype=dtype, perform_initialization=False,
                            use_cpu_initialization=True, use_te=False)
    sd = built.module.sharded_state_dict()
    apply_factories(sd)
    per_param, objects, where = {}, {}, {}
    for name, v in sd.items():
        for st in v if isinstance(v, list) else [v]:
            if isinstance(st, ShardedTensor):
                per_param.setdefault(name, []).append(st)
                where[(st.key, tuple(st.global_offset))] = (name, st)
            elif isinstance(st, ShardedObject):
                objects[name] = st
            else:
                raise AssertionError(f"{name}: unexpected {type(st).__name__} in Megatron's sharded state dict")
    shape = {n: tuple(t.shape) for n, t in built.module.state_dict(keep_vars=True).items()
             if not n.endswith("_extra_state")}
    return Shards(built, per_param, objects, where, shape)


def _region(st) -> tuple[slice, ...]:
    """The part of its parameter a ShardedTensor covers (at TP1 the parameter is the whole
    canonical tensor; prepended axes index layers or experts)."""
    pre = st.prepend_axis_num
    return tuple(slice(o, o + s) for o, s in zip(st.global_offset[pre:], st.local_shape))


def _cut(blocks: list[torch.Tensor], region: tuple[slice, ...]) -> torch.Tensor:
    """``torch.cat(blocks)[region]``, without the concatenation when the region's rows lie
    in one block (gate or up of a GLU fc1)."""
    if region:
        rows, row0 = region[0], 0
        for b in blocks:
            if row0 <= rows.start and rows.stop <= row0 + b.shape[0]:
                return b[(slice(rows.start - row0, rows.stop - row0),) + region[1:]]
            row0 += b.shape[0]
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks))[region]


def write_dist_checkpoint(path: Path, shards: Shards,
                          read_tensor: Callable[[str], torch.Tensor | list[torch.Tensor]],
                          *, common: dict, on_tensor: Callable[[int], None] | None = None,
                          release: Callable[[], None] | None = None) -> None:
    """Write a ``torch_dist`` checkpoint into the (empty) directory ``path``.

    ``read_tensor(canonical name)`` returns that full canonical tensor, or a list of row blocks
    whose concatenation is (``Entry.to_mcore_parts``); it is asked once per chunk, in the
    writer's order (the last answer is kept for the next chunk of the same one). ``release()``,
    if given, is called before the next tensor is read: the tensors handed out so far are
    written (DCP's loop may still hold the last chunk, so dropping our reference alone does
    not free it).

    Records are written without zip CRC-32s (``torch.serialization.set_crc32_options``, for
    this call only): computing one is a pass over every byte at a rate below the disk's (about
    a third of the conversion's time), and nothing checks them: ``torch.load`` and DCP's
    reader do not (PyTorch builds its zip reader without CRC checks), nor does ours."""
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint.planner import WriteItemType

    sd = {n: list(v) for n, v in shards.per_param.items()}
    sd.update(shards.objects)
    sd, _, _ = _replace_state_dict_keys_with_sharded_keys(sd, True)
    pyt = mcore_to_pyt_state_dict(sd, False)  # meta tensors: only shapes and chunks are used
    last: list = [None, None]

    class StreamingPlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            name, st = shards.where[(write_item.index.fqn, tuple(write_item.index.offset))]
            if last[0] != name:
                last[:] = [None, None]  # drop the previous tensor before reading the next
                if release is not None:
                    release()
                got = read_tensor(name)
                last[:] = [name, got if isinstance(got, list) else [got]]
            blocks = last[1]
            shape = (sum(b.shape[0] for b in blocks),) + tuple(blocks[0].shape[1:]) if blocks[0].dim() else ()
            assert shape == shards.shape[name], (name, shape, shards.shape[name])
            # A chunk that is a whole block is written from the block's own memory
            # (DCP copies only views of a larger storage).
            chunk = _cut(blocks, _region(st)).to(st.dtype).reshape(tuple(write_item.tensor_data.chunk.sizes))
            if on_tensor is not None:
                on_tensor(chunk.numel() * chunk.element_size())
            return chunk

    writer = dcp.FileSystemWriter(str(path), single_file_per_rank=True, sync_files=True, thread_count=1)
    crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        dcp.save(pyt, storage_writer=writer, planner=StreamingPlanner(dedup_replicated_tensors=False,
                                                                       flatten_state_dict=False))
    except dcp.api.CheckpointException as e:  # a BaseException wrapping what failed inside
        failures = list(getattr(e, "failures", {}).values())
        cause = failures[0][0] if failures and isinstance(failures[0], tuple) else None
        if isinstance(cause, (KeyboardInterrupt, SystemExit, CheckpointError)):
            raise cause from None
        raise CheckpointError(f"{path}: writing the checkpoint failed: {cause!r}") from cause
    finally:
        torch.serialization.set_crc32_options(crc)
    torch.save(common, path / "common.pt")
    fsync_file(path / "common.pt")
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), str(path))  # Megatron's "complete" marker


class DistCheckpointReader:
    """Full canonical tensors from the ``torch_dist`` checkpoint at ``path``, a few at a time.

    The metadata is read once. A stored chunk that is exactly a region we want (what this
    module writes, and any checkpoint saved at TP1/EP1) is read with one ``pread`` straight
    into the destination tensor: its place in the ``.distcp`` file comes from the metadata
    and from the chunk's own ``torch.save`` archive (zip directory and pickle only; the
    data is not loaded twice). Anything else (chunks of another layout, storage transforms)
    goes through ``torch.distributed.checkpoint``'s own load for exactly the regions wanted
    (Megatron's load would want every shard of a key at once: all experts of a layer, or all
    layers of a uniform model). Rows beyond the model's (vocabulary padding another layout
    wrote) are not read."""

    def __init__(self, path: Path, shards: Shards, *, fast: bool = True) -> None:
        from torch.distributed.checkpoint import FileSystemReader

        self.path, self.shards, self.fast = Path(path), shards, fast
        try:
            self.metadata = FileSystemReader(str(path)).read_metadata()
        except Exception as e:  # noqa: BLE001 - DCP raises several kinds
            raise CheckpointError(f"{path}: unreadable checkpoint metadata (.metadata): {e}") from e
        self.fast_reads = 0  # chunks read by the direct path (tests check it is taken)
        self._fds: dict[str, int] = {}
        self._layouts: dict = {}  # (item bytes, dtype, shape) -> (pickle offset, pickle bytes, data offset)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The full canonical tensors ``names``. A tensor stored as one whole chunk is a
        private memory map of its bytes (no copy; its pages leave with the tensor)."""
        from moe_rl.checkpoint.hf_format import fresh, map_tensor

        out: dict[str, torch.Tensor] = {}
        rest: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        for n in names:
            sts, shape = self.shards.per_param[n], self.shards.shape[n]
            dtype = sts[0].dtype
            if self.fast and len(sts) == 1 and tuple(sts[0].local_shape) == shape:
                st = sts[0]
                loc = self._locate(st.key, tuple(st.global_offset), (1,) * st.prepend_axis_num + shape, dtype)
                if loc is not None:
                    out[n] = map_tensor(*loc, dtype, shape)[0]
                    self.fast_reads += 1
                    continue
            full = out[n] = fresh(shape, dtype)
            for st in sts:
                sizes = (1,) * st.prepend_axis_num + tuple(st.local_shape)
                dest = full[_region(st)].view(sizes)  # reads land in full
                loc = self._locate(st.key, tuple(st.global_offset), sizes, dtype) if self.fast else None
                if loc is None:
                    rest[(st.key, tuple(st.global_offset))] = dest
                elif dest.is_contiguous():
                    _pread_into(*loc, dest)
                    self.fast_reads += 1
                else:
                    tmp = torch.empty(dest.shape, dtype=dest.dtype)
                    _pread_into(*loc, tmp)
                    dest.copy_(tmp)
                    self.fast_reads += 1
        if rest:
            self._read_dcp(rest, names)
        return out

    def block_ranges(self, name: str):
        """Where the row blocks of ``name`` lie in the checkpoint's files (``FileRange`` each:
        the whole tensor, or a GLU fc1's gate and up); None unless each block is one whole
        stored chunk."""
        from moe_rl.checkpoint.hf_format import FileRange

        sts, shape = self.shards.per_param[name], self.shards.shape[name]
        if not self.fast or not shape:
            return None
        blocks, row = [], 0
        for st in sorted(sts, key=lambda st: _region(st)[0].start):
            region = _region(st)
            rows = region[0]
            if rows.start != row or tuple(st.local_shape[1:]) != shape[1:]:
                return None
            sizes = (1,) * st.prepend_axis_num + tuple(st.local_shape)
            loc = self._locate(st.key, tuple(st.global_offset), sizes, st.dtype)
            if loc is None:
                return None
            blocks.append(loc)
            row = rows.stop
        if row != shape[0]:
            return None
        return [FileRange(fd, start, st.dtype, tuple(st.local_shape))
                for (fd, start), st in zip(blocks, sorted(sts, key=lambda st: _region(st)[0].start))]

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    # -------------------------------------------------------------- direct reads

    def _locate(self, key: str, offset: tuple[int, ...], sizes: tuple[int, ...], dtype: torch.dtype):
        """``(fd, absolute offset)`` of the data of the stored chunk ``(key, offset)`` when it
        is exactly ``sizes`` of ``dtype``, contiguous and untransformed; None otherwise."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        md = self.metadata
        info = md.storage_data.get(MetadataIndex(key, torch.Size(offset)))
        tmd = md.state_dict_metadata.get(key)
        if info is None or getattr(info, "transform_descriptors", None) or tmd is None:
            return None
        if getattr(getattr(tmd, "properties", None), "dtype", None) != dtype:
            return None
        if not any(tuple(c.offsets) == offset and tuple(c.sizes) == sizes for c in getattr(tmd, "chunks", ())):
            return None
        fd = self._fds.get(info.relative_path)
        if fd is None:
            fd = self._fds[info.relative_path] = os.open(self.path / info.relative_path, os.O_RDONLY)
        # torch.save writes the same archive layout for the same dtype and shape: parse one
        # archive per (size, dtype, shape), then only check that each other one's pickle (shape,
        # strides, storage) is byte for byte the one parsed.
        sig = (info.length, dtype, sizes)
        known = self._layouts.get(sig)
        if known is not None:
            pkl_at, pkl, data_at = known
            if os.pread(fd, len(pkl), info.offset + pkl_at) == pkl:
                return fd, info.offset + data_at
            return None
        found = _archive_layout(fd, info.offset, info.length, dtype, sizes)
        if found is None:
            return None
        self._layouts[sig] = found
        return fd, info.offset + found[2]

    # -------------------------------------------------------------- DCP's own load

    def _read_dcp(self, wanted: dict, names: list[str]) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        path = self.path

        class RegionPlanner(DefaultLoadPlanner):
            def create_local_plan(self):
                items = []
                for (key, offset), dest in wanted.items():
                    md = self.metadata.state_dict_metadata.get(key)
                    if md is None:
                        raise CheckpointError(f"{path}: no tensor {key!r} in the checkpoint (another model or "
                                              f"layout of names?)")
                    items += create_read_items_for_chunk_list(
                        key, md, [ChunkStorageMetadata(torch.Size(offset), torch.Size(dest.shape))])
                return LoadPlan(items)

            def resolve_tensor(self, read_item):
                dest = wanted[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
                return self.transform_tensor(read_item, dest)  # narrowed to the read item's region

            def commit_tensor(self, read_item, tensor):
                pass  # written in place

        try:
            dcp_load({}, storage_reader=FileSystemReader(str(path)), planner=RegionPlanner(), no_dist=True)
        except BaseException as e:  # noqa: BLE001 - DCP wraps failures in a BaseException of its own
            failures = list(getattr(e, "failures", {}).values())
            cause = failures[0][0] if failures and isinstance(failures[0], tuple) else e
            if isinstance(cause, (KeyboardInterrupt, SystemExit, CheckpointError)):
                raise cause from None
            raise CheckpointError(f"{path}: cannot read {names[0]}{' and others' if len(names) > 1 else ''}: "
                                  f"{type(cause).__name__}: {cause}") from cause


def read_canonical(path: Path, shards: Shards, names: list[str]) -> dict[str, torch.Tensor]:
    """The full canonical tensors ``names`` (one :class:`DistCheckpointReader` read)."""
    return DistCheckpointReader(path, shards).read(names)


class _Range(io.RawIOBase):
    """Bytes ``[offset, offset + length)`` of an open file, as a seekable file of their own."""

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd, self.offset, self.length, self.pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos + (0 if whence == 0 else self.pos if whence == 1 else self.length)
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        data = os.pread(self.fd, n, self.offset + self.pos)
        b[:len(data)] = data
        self.pos += len(data)
        return len(data)


def _archive_layout(fd: int, offset: int, length: int, dtype: torch.dtype, sizes: tuple[int, ...]):
    """``(pickle offset, pickle bytes, data offset)``, relative to ``offset``, of the one
    tensor ``torch.save`` wrote at ``[offset, offset + length)``, if it is stored exactly as
    wanted (dtype, shape, contiguous, little-endian); None otherwise (the caller then uses
    DCP's load). Only the archive's directory and pickle are read: ``torch.load`` with
    storages on ``meta`` records where each storage's record starts."""
    import sys

    try:
        zf = torch._C.PyTorchFileReader(_Range(fd, offset, length))
        if zf.has_record("byteorder") and zf.get_record("byteorder").decode() != sys.byteorder:
            return None
        t = torch.serialization._load(zf, "meta", torch._weights_only_unpickler)
        rec = getattr(t.untyped_storage(), "_checkpoint_offset", None) if isinstance(t, torch.Tensor) else None
        pkl_name = next(r for r in zf.get_all_records() if r == "data.pkl" or r.endswith("/data.pkl"))
        pkl_at, pkl = zf.get_record_offset(pkl_name), bytes(zf.get_record(pkl_name))
    except Exception:  # noqa: BLE001 - anything unexpected: DCP's own load decides
        return None
    if (rec is None or t.dtype != dtype or tuple(t.shape) != tuple(sizes) or not t.is_contiguous()
            or t.untyped_storage().nbytes() < (t.storage_offset() + t.numel()) * t.element_size()):
        return None
    return pkl_at, pkl, rec + t.storage_offset() * t.element_size()


def _pread_into(fd: int, start: int, out: torch.Tensor) -> None:
    from moe_rl.checkpoint.hf_format import read_into

    read_into(fd, out, start)


def load_into(built, path: str | os.PathLike) -> None:
    """Load the ``torch_dist`` checkpoint at ``path`` (a checkpoint directory or its
    iteration directory) into a live model at any layout (each virtual pipeline chunk
    included; tensors are found by their global sharded keys). Every rank of the job calls it."""
    from megatron.core import dist_checkpointing

    ckpt = iteration_dir(Path(path))
    request = {f"model{i}": {k: v for k, v in chunk.sharded_state_dict().items() if not k.endswith("_extra_state")}
               for i, chunk in enumerate(built.chunks)}
    loaded = dist_checkpointing.load(request, str(ckpt))
    for i, chunk in enumerate(built.chunks):
        tensors = {k: v for k, v in loaded[f"model{i}"].items() if k in request[f"model{i}"]}
        missing = chunk.load_state_dict(tensors, strict=False).missing_keys
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing:
            raise CheckpointError(f"{ckpt}: no value for {len(missing)} parameters, e.g. {missing[0]}")


# ------------------------------------------------------------------ directory layout


RL_MODEL_SUBDIR = "model_optim"  # where a run checkpoint (``run_state.py``) keeps model and optimizer


def run_step_dir(path: Path) -> Path | None:
    """The run checkpoint ``path`` names (``run_state.py``): a ``step_*`` directory itself, the
    newest complete one under a ``checkpoints`` root, or under a run's output directory's
    ``checkpoints``; None when ``path`` is none of these."""
    from moe_rl.checkpoint import run_state

    if (path / run_state.RUN_STATE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = run_state.scan(str(root)).newest
        if found is not None:
            return Path(found[1])
    return None


def iteration_dir(path: Path) -> Path:
    """The ``torch_dist`` directory of a checkpoint: ``path`` itself; what its tracker names
    (Megatron-LM's layout, ours); a run checkpoint's ``model_optim`` (:func:`run_step_dir`)."""
    from moe_rl.checkpoint import run_state

    tracker = path / TRACKER
    step = None if tracker.is_file() else run_step_dir(path)
    if tracker.is_file():
        it = tracker.read_text().strip()
        d = path / (RELEASE if it == RELEASE else f"iter_{int(it):07d}")
    elif step is not None:
        if not (step / run_state.MARKER).is_file():
            raise CheckpointError(f"{step} is a run checkpoint that was never completed (no {run_state.MARKER})")
        d = step / RL_MODEL_SUBDIR
    else:
        d = path
    if not (d / "metadata.json").is_file():
        raise CheckpointError(f"{d} is not a complete Megatron distributed checkpoint (no metadata.json: "
                              "not one, or its writer did not finish)")
    return d


def run_hf_dir(path: Path) -> Path | None:
    """Where the config and tokenizer of a run checkpoint are: its own ``hf/`` (written with
    every checkpoint), else the HF directory its ``config.yaml`` names (``model.hf_dir``)."""
    import yaml

    step = run_step_dir(path)
    if step is None:
        return None
    if (step / HF_SUBDIR / "config.json").is_file():
        return step / HF_SUBDIR
    cfg = step / "config.yaml"
    if not cfg.is_file():
        return None
    hf_dir = ((yaml.safe_load(cfg.read_text()) or {}).get("model") or {}).get("hf_dir")
    return Path(hf_dir) if hf_dir else None


def is_megatron_checkpoint(path: Path) -> bool:
    return (path / TRACKER).is_file() or (path / "metadata.json").is_file() or run_step_dir(path) is not None


def stored_dtypes(path: Path) -> dict[str, torch.dtype]:
    """The dtype of each tensor (by checkpoint key) in the checkpoint at ``path``, from its metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(path)).read_metadata()
    return {k: v.properties.dtype for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def stored_dtype(path: Path) -> torch.dtype:
    """The dtype of the checkpoint's tensors (from its metadata; the most common one)."""
    counts: dict = {}
    for dt in stored_dtypes(path).values():
        counts[dt] = counts.get(dt, 0) + 1
    if not counts:
        raise CheckpointError(f"{path}: holds no tensors")
    return max(counts, key=counts.get)


def store_as(shards: Shards, name: str, dtype: torch.dtype) -> None:
    """Write (or read) parameter ``name`` in ``dtype`` rather than the model's: a float32
    tensor of a bf16 checkpoint (DeepSeek's router) keeps its precision on disk; Megatron
    casts it to the parameter's dtype when it loads."""
    for st in shards.per_param[name]:
        st.dtype = dtype
        st.data = torch.empty(st.data.shape, dtype=dtype, device=st.data.device)


# The model's TransformerConfig fields stored as Megatron-LM arguments of the same names
# (Megatron-LM builds its TransformerConfig from the arguments named like its fields).
_ARG_FIELDS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
    "normalization", "qk_layernorm", "add_bias_linear", "add_qkv_bias", "gated_linear_unit",
    "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_layer_freq",
    "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor",
    "moe_router_num_groups", "moe_router_group_topk", "moe_router_pre_softmax", "multi_latent_attention",
    "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim",
    # YaRN of the non-MLA families: instance attributes, present only when the model uses it
    "yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
    "yarn_mscale", "yarn_mscale_all_dim", "yarn_correction_range_round_to_int",
)


def megatron_lm_args(built) -> "argparse.Namespace":
    """The ``args`` Megatron-LM's ``load_checkpoint`` reads from ``common.pt``: the TP and PP
    sizes the checkpoint was saved at (it indexes ``state_dict['args']`` for them; a
    checkpoint without ``args`` is a ``KeyError`` there), what was not saved (optimizer, RNG),
    and the model's shape, which ``check_checkpoint_args`` compares with the run's (and
    ``--use-checkpoint-args`` adopts). Megatron registers ``argparse.Namespace`` as safe for
    ``torch.load``."""
    import argparse

    model = built.chunks[0]
    cfg = model.config
    args = {f: getattr(cfg, f) for f in _ARG_FIELDS if hasattr(cfg, f)}
    args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in args.items()
            if v is None or isinstance(v, (bool, int, float, str, list, tuple))}
    experts = getattr(cfg, "num_moe_experts", None)
    args.update(
        norm_epsilon=cfg.layernorm_epsilon,  # Megatron-LM's name for the config's layernorm_epsilon
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, expert_model_parallel_size=1,
        expert_tensor_parallel_size=1, num_experts=experts, swiglu=bool(cfg.gated_linear_unit),
        group_query_attention=cfg.num_query_groups not in (None, cfg.num_attention_heads),
        max_position_embeddings=model.max_sequence_length, position_embedding_type=model.position_embedding_type,
        untie_embeddings_and_output_weights=not model.share_embeddings_and_output_weights,
        padded_vocab_size=built.hf_config.vocab_size,  # stored unpadded: Megatron pads on load
        no_save_optim=True, no_save_rng=True, ckpt_format="torch_dist", iteration=0,
    )
    return argparse.Namespace(**args)


def write_layout(root: Path, info: dict) -> Path:
    """Create the layout under ``root`` (empty); returns the ``torch_dist`` directory."""
    (root / TRACKER).write_text(RELEASE)
    (root / INFO).write_text(json.dumps({"format": FORMAT_VERSION, **info}, indent=1))
    d = root / RELEASE
    d.mkdir()
    return d


