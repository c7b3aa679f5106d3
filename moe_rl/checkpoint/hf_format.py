"""HuggingFace checkpoint directories for conversion: checked before anything is read, read one
tensor at a time, and written bucket by bucket (safetensors files +
``model.safetensors.index.json``, plus the config and tokenizer files), a directory
``transformers`` and SGLang open.

Reading and writing use the safetensors layout directly (an 8-byte little-endian header
length, a JSON header of dtype, shape and byte range per tensor, then the raw bytes):
a tensor is read as a memory map of its own bytes (no copy, and its pages leave the process
with the tensor, where a map of the whole file keeps every page read), and written straight
from the tensor's memory, without the copy per tensor the ``safetensors`` package makes.

The shapes an HF checkpoint must have come from the family's parameter map and the canonical
Megatron shapes of a model built from its config (``megatron_format.model_shards``): a
checkpoint whose tensors are missing, extra or of another shape is refused, naming the
tensor and the numbers, before a single tensor is converted.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable

import torch

from moe_rl.checkpoint.megatron_format import CheckpointError
from moe_rl.models.param_map import ParamMap

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".distcp")
INDEX = "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


@dataclasses.dataclass(frozen=True)
class Stored:
    """Where one tensor lies in a safetensors file (absolute byte range)."""

    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> dict[str, Stored]:
    """The tensors of one safetensors file, checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or garbled?): "
                                  f"{size} bytes")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or garbled?): header of "
                                  f"{n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or garbled?): {e}") from e
    base, out = 8 + n, {}
    for name, v in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = DTYPES[v["dtype"]], tuple(v["shape"]), v["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name}: unreadable header entry {v!r} ({e!r})") from e
        numel = 1
        for d in shape:
            numel *= d
        if b - a != numel * dtype.itemsize or base + b > size:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or garbled?): {name} "
                                  f"needs bytes {base + a}..{base + b} of {size}")
        out[name] = Stored(path.name, dtype, shape, base + a, base + b)
    return out


def read_into(fd: int, out: torch.Tensor, start: int) -> None:
    """Fill the contiguous tensor ``out`` with the bytes at ``start`` of the open file ``fd``."""
    buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], start + done)
        if n <= 0:
            raise CheckpointError(f"file ended {len(buf) - done} bytes early at offset {start + done}")
        done += n


def map_tensor(fd: int, start: int, dtype: torch.dtype, shape: tuple[int, ...]):
    """``(tensor, map)``: the tensor stored at ``start`` of the open file ``fd``, as a private
    memory map of just its bytes (None when it is read into memory instead): no copy on read,
    and the pages leave the process when the tensor is freed (a map of the whole file would
    keep every page read so far resident)."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype), None
    base = start - start % mmap.ALLOCATIONGRANULARITY
    mm = mmap.mmap(fd, nbytes + start - base, offset=base, access=mmap.ACCESS_COPY)
    if (start - base) % dtype.itemsize:  # misaligned for its dtype: read a copy instead
        out = fresh(shape, dtype)
        read_into(fd, out, start)
        return out, None
    return torch.frombuffer(mm, dtype=dtype, offset=start - base, count=numel).view(shape), mm


def fresh(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor in its own anonymous memory map, returned to the system the
    moment the tensor is freed (the C allocator may keep freed blocks of tens of MB, which
    would then count against the conversion's memory bound)."""
    numel = 1
    for d in shape:
        numel *= d
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, numel * dtype.itemsize), dtype=dtype, count=numel).view(shape)


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"  # X.weight_scale_inv scales X.weight


def fp8_block_size(hf_config) -> tuple[int, int] | None:
    """How a fine-grained FP8 checkpoint is quantized (``quantization_config`` with
    ``quant_method: fp8``, as DeepSeek-V3/R1 and the Qwen3 ``-FP8`` releases are): the
    ``weight_block_size`` (rows, columns), ``(0, 0)`` for one scale per tensor, None for a
    checkpoint that is not quantized. CheckpointError for another quantization."""
    q = getattr(hf_config, "quantization_config", None)
    if not q:
        return None
    q = q if isinstance(q, dict) else q.to_dict()
    method = q.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"quantization_config.quant_method {method!r} is not supported: only fine-grained "
                              "'fp8' checkpoints (float8 weights with weight_scale_inv) are read, and dequantized")
    block = q.get("weight_block_size")
    if block is None:
        return (0, 0)
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"quantization_config.weight_block_size {block!r}: expected [rows, columns]")
    return int(block[0]), int(block[1])


class HFFiles:
    """An HF checkpoint directory's safetensors files, read one tensor at a time.

    ``get(name)`` maps just that tensor's bytes (:func:`map_tensor`); :meth:`release` drops
    the pages of the tensors returned so far. After :meth:`dequantize_fp8`, a float8 weight
    reads as its dequantized value and its scale is no longer one of the :meth:`keys`."""

    def __init__(self, path: Path, files: list[str]) -> None:
        self.path = path
        self.stored: dict[str, Stored] = {}
        for f in files:
            self.stored.update(read_header(path / f))
        self.weight_map = {n: s.file for n, s in self.stored.items()}
        self._fds: dict[str, int] = {}
        self._maps: list = []
        self.bytes_read = 0
        self.scales: dict[str, str] = {}  # float8 weight -> its scale (dequantize_fp8)
        self._fp8: tuple[tuple[int, int], torch.dtype] | None = None

    def keys(self):
        if not self.scales:
            return self.stored.keys()
        scale_names = set(self.scales.values())
        return [n for n in self.stored if n not in scale_names]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.stored[name].shape

    def dtype(self, name: str) -> torch.dtype:
        """The dtype :meth:`get` returns ``name`` in."""
        return self._fp8[1] if name in self.scales else self.stored[name].dtype

    def dequantize_fp8(self, block: tuple[int, int], dtype: torch.dtype) -> None:
        """Read every float8 ``X.weight`` as ``dtype``: its values times ``X.weight_scale_inv``,
        one scale per ``block`` (rows, columns; the last blocks may be partial, as DeepSeek's
        own cast takes them; ``(0, 0)``: one scale for the tensor), multiplied in float32 and
        rounded once, as ``transformers`` dequantizes. Every float8 tensor needs its scale, of
        the grid its shape and the block imply (CheckpointError naming the tensor otherwise)."""
        for name, st in self.stored.items():
            if not name.endswith(SCALE_SUFFIX):
                continue
            w = name.removesuffix(SCALE_SUFFIX)
            ws = self.stored.get(w)
            if ws is None or ws.dtype not in FP8_DTYPES:
                raise CheckpointError(f"{self.path}: {name} scales no float8 tensor ({w} is "
                                      + ("missing)" if ws is None else f"{str(ws.dtype).removeprefix('torch.')})"))
            if len(ws.shape) != 2:
                raise CheckpointError(f"{self.path}: {w} is float8 of shape {list(ws.shape)}: only 2-d weights "
                                      "are dequantized")
            grid = (1,) if block == (0, 0) else tuple(-(-n // b) for n, b in zip(ws.shape, block))
            if tuple(st.shape) not in (grid, () if grid == (1,) else grid):
                raise CheckpointError(f"{self.path}: {name} has shape {list(st.shape)}; {w} of shape "
                                      f"{list(ws.shape)} in blocks of {list(block)} needs {list(grid)}")
            self.scales[w] = name
        unscaled = sorted(n for n, st in self.stored.items() if st.dtype in FP8_DTYPES and n not in self.scales)
        if unscaled:
            raise CheckpointError(f"{self.path}: {len(unscaled)} float8 tensors have no scale (weight{SCALE_SUFFIX}), "
                                  f"e.g. {unscaled[0]}")
        self._fp8 = (block, dtype)

    def get(self, name: str) -> torch.Tensor:
        if name in self.scales:
            return self._dequantized(name)
        return self._raw(name)

    def _dequantized(self, name: str) -> torch.Tensor:
        (b0, b1), dtype = self._fp8
        w, s = self._raw(name), self._raw(self.scales[name]).float()
        rows, cols = w.shape
        out = fresh((rows, cols), dtype)
        if (b0, b1) == (0, 0):
            out.copy_(w.float().mul_(s.reshape(())))
            return out
        for i, r0 in enumerate(range(0, rows, b0)):  # one block row at a time: memory of one, in float32
            r1 = min(r0 + b0, rows)
            out[r0:r1] = w[r0:r1].float().mul_(s[i].repeat_interleave(b1)[:cols])
        return out

    def _raw(self, name: str) -> torch.Tensor:
        s = self.stored.get(name)
        if s is None:
            raise KeyError(f"{self.path}: tensor {name!r} not in the checkpoint")
        fd = self._fds.get(s.file)
        if fd is None:
            fd = self._fds[s.file] = os.open(self.path / s.file, os.O_RDONLY)
        self.bytes_read += s.end - s.start
        t, mm = map_tensor(fd, s.start, s.dtype, s.shape)
        if mm is not None:
            self._maps.append(mm)
        return t

    def release(self) -> None:
        """Drop the pages of every tensor returned so far from memory. A caller that has
        written those tensors calls it when a reference it does not control (a writer's loop
        variable) may still hold the last one; read again, the pages come back from the file."""
        maps, self._maps = self._maps, []
        for mm in maps:
            if not mm.closed:
                mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        self._maps = []
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def expected_hf_shapes(pmap: ParamMap, canonical_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, from the canonical Megatron shapes (TP1, unpadded vocabulary)."""
    out: dict[str, tuple[int, ...]] = {}
    for name, entry in pmap.entries.items():
        if name not in canonical_shapes:
            continue  # e.g. the output layer of a model with tied embeddings
        shape = canonical_shapes[name]
        rows, rest = shape[0], tuple(shape[1:])
        if entry.kind == "copy":
            parts = [shape]
        elif entry.kind == "glu":
            parts = [(rows // 2,) + rest] * 2
        else:
            Q, G, D = entry.qkv_shape
            parts = [(Q * D,) + rest, (G * D,) + rest, (G * D,) + rest]
        for hf, s in zip(entry.hf, parts):
            out[hf] = s
    return out


def open_checked(path: Path) -> HFFiles:
    """:class:`HFFiles` of ``path`` after checking its config and every weights file's header
    against its size (a truncated or garbled file is named here, not half way through a
    conversion)."""
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (not a HuggingFace checkpoint directory)")
    index = path / INDEX
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index: {e}") from e
    else:
        files = sorted(f.name for f in path.glob("*.safetensors"))
    if not files:
        bins = sorted(f.name for f in path.glob("*.bin"))
        raise CheckpointError(f"{path}: no *.safetensors files" + (
            f" (found {bins[0]}: convert pickled .bin weights to safetensors first)" if bins else ""))
    for f in files:
        if not (path / f).is_file():
            raise CheckpointError(f"{path / f}: listed in {INDEX} but missing")
    return HFFiles(path, files)


def check_tensors(ckpt, expected: dict[str, tuple[int, ...]], hf_config) -> list[str]:
    """Every expected tensor present with its shape, nothing else (headers only) but what
    ``transformers`` itself skips (a tied ``lm_head.weight``, rotary ``inv_freq``, DeepSeek's
    multi-token-prediction layers): those are returned, to be left out."""
    from moe_rl.models.hf_checkpoint import unmapped_tensors

    have = set(ckpt.keys())
    missing = sorted(set(expected) - have)
    extra = unmapped_tensors(have, set(expected), hf_config)
    if missing:
        raise CheckpointError(f"{ckpt.path}: {len(missing)} tensors of the model are missing, e.g. {missing[0]}")
    if extra:
        raise CheckpointError(f"{ckpt.path}: {len(extra)} tensors are not part of the model, e.g. {extra[0]} "
                              "(another architecture or config?)")
    for name in sorted(expected):
        got = tuple(ckpt.shape(name))
        if got != expected[name]:
            raise CheckpointError(f"{ckpt.path}: {name} has shape {list(got)}, the config implies "
                                  f"{list(expected[name])}")
    return sorted(have - set(expected))


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Config, generation config, tokenizer and template files: every top-level file that is
    not weights. A ``quantization_config`` leaves the config: what is written next to it is
    dequantized (:meth:`HFFiles.dequantize_fp8`), and transformers or SGLang would otherwise
    read those weights as float8."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith("."):
            cfg = json.loads(f.read_text()) if f.name == "config.json" else {}
            if "quantization_config" in cfg:
                del cfg["quantization_config"]
                (dst / f.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            else:
                shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
    return copied


@dataclasses.dataclass(frozen=True)
class FileRange:
    """A tensor's bytes still in a file: copied into the output by the kernel
    (``copy_file_range``, as ``cp`` does), never through this process's memory."""

    fd: int
    start: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


def _copy_range(src: FileRange, f) -> None:
    f.flush()
    out, done = f.fileno(), 0
    try:
        while done < src.nbytes:
            n = os.copy_file_range(src.fd, out, src.nbytes - done, src.start + done)
            if n <= 0:
                raise OSError(f"copy_file_range stopped {src.nbytes - done} bytes short")
            done += n
    except OSError:  # another file system, an old kernel: copy what is left through memory
        os.lseek(out, 0, os.SEEK_END)
        t, _ = map_tensor(src.fd, src.start + done, torch.uint8, (src.nbytes - done,))
        f.write(memoryview(t.numpy()))
        return
    os.lseek(out, 0, os.SEEK_END)


def write_safetensors(path: Path, named: list[tuple[str, "torch.Tensor | FileRange"]]) -> int:
    """One safetensors file of ``named`` (header, then each tensor's bytes in order, written
    from the tensor's own memory, or copied file to file for a :class:`FileRange`); returns
    the bytes of tensor data. Flushing to disk is the caller's (:func:`write_shards` flushes
    each file; the whole output directory is fsynced again before it is published)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for n, t in named:
        if t.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"{n}: dtype {t.dtype} has no safetensors name")
        header[n] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for _, t in named:
            if isinstance(t, FileRange):
                _copy_range(t, f)
            elif t.nbytes:
                f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
    return off


def write_shards(dst: Path, buckets: Iterable[list[tuple[str, torch.Tensor]]], num_files: int,
                 on_tensor=None) -> None:
    """One safetensors file per bucket (``model-0000i-of-0000N.safetensors``), then the index."""
    from concurrent.futures import ThreadPoolExecutor

    from moe_rl.checkpoint.atomic import fsync_file

    weight_map: dict[str, str] = {}
    total = 0
    i = -1
    it = iter(buckets)
    # Each file is flushed to disk in a thread while the next bucket is read and written:
    # the disk's write-back overlaps the conversion instead of following it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync") as flusher:
        flushed = []
        while (named := next(it, None)) is not None:  # not a for loop: it would hold this bucket
            i += 1                                     # while the next one is read
            fname = f"model-{i + 1:05d}-of-{num_files:05d}.safetensors"
            total += write_safetensors(dst / fname, named)
            flushed.append(flusher.submit(fsync_file, dst / fname))
            for n, t in named:
                weight_map[n] = fname
                if on_tensor is not None:
                    on_tensor(t.nbytes)
            del named
        for f in flushed:
            f.result()  # a failed flush fails the conversion
    assert i + 1 == num_files, (i + 1, num_files)
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": dict(sorted(weight_map.items()))}, indent=1))
