"""Checkpoint conversion, HF <-> Megatron-Core distributed checkpoint, streaming and atomic.

* HF -> mcore: the HF checkpoint is checked whole (config, every file readable, every tensor
  present with its shape, nothing extra) from headers only; then each Megatron tensor is built
  from its HF tensors (``Entry.to_mcore_parts``, each read with one ``pread``) when the
  writer asks for it; a GLU fc1 stays [gate, up], the two chunks Megatron stores.
* mcore -> HF: the plan of the weight sync at one rank (``weights/plan.py``) groups the HF
  tensors into files of at most ``bucket_bytes``. An HF tensor stored as one whole chunk (a
  plain copy; a GLU fc1's gate or up) is copied file to file by the kernel
  (``copy_file_range``); the rest (fused QKV, chunks of another layout) is read
  (``DistCheckpointReader``: mapped or ``pread`` per whole chunk, Megatron's own load
  otherwise) and split back (``Entry.to_hf``). Config and
  tokenizer files come from the checkpoint's ``hf/`` folder, a run checkpoint's
  ``model.hf_dir``, or ``hf_config_dir``. Run checkpoints (``run_state.py``: a ``step_*``
  directory or the ``checkpoints`` root, newest complete one) convert the same way: only
  the model's keys are read.
* mcore -> mcore: the same Megatron tensors rewritten (a model-only checkpoint checked
  against the layout); Megatron reshards ``torch_dist`` on load, so any layout can load it.

Memory (every resident page counts, the input's mapped pages too; each map covers one
tensor and goes with it): one canonical tensor at a time (HF -> mcore); at most one output
file's tensors that need a transform, plus the copies of one fused QKV being split
(mcore -> HF): at most the largest tensor plus one bucket.
The output is built in a hidden sibling directory, fsynced and renamed into place: an
interrupted conversion leaves nothing under the output name. An output directory that
already holds files is refused unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from moe_rl.checkpoint.atomic import fsync_tree
from moe_rl.checkpoint import hf_format
from moe_rl.checkpoint import megatron_format as mf
from moe_rl.checkpoint.megatron_format import CheckpointError
from moe_rl.parallel.dims import ParallelConfig, ParallelDims

DEFAULT_FILE_BYTES = 4 << 30  # HF output: most bytes per safetensors file
TARGETS = ("mcore", "hf")


@dataclasses.dataclass
class Result:
    output: str
    tensors: int
    bytes: int
    seconds: float
    family: str
    layout: str
    skipped: list[str] = dataclasses.field(default_factory=list)  # input tensors transformers skips too
    dequantized: int = 0  # float8 input tensors read through their block scales


def convert(input_dir: str | os.PathLike, output_dir: str | os.PathLike, *, to: str,
            layout: ParallelConfig | None = None, overwrite: bool = False, hf_config_dir: str | None = None,
            dtype: str = "auto", file_bytes: int = DEFAULT_FILE_BYTES, progress: bool = False) -> Result:
    """Convert ``input_dir`` (an HF directory or a Megatron checkpoint) to ``to`` at ``output_dir``."""
    import transformers

    from moe_rl.models import family_for

    src, dst = Path(input_dir), Path(output_dir)
    if to not in TARGETS:
        raise CheckpointError(f"--to {to!r}: must be one of {list(TARGETS)}")
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such directory")
    if dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: the output must differ from the input")
    if src.resolve() in dst.resolve().parents or dst.resolve() in src.resolve().parents:
        inner, outer = (dst, src) if src.resolve() in dst.resolve().parents else (src, dst)
        raise CheckpointError(f"--output {dst} and --input {src}: {inner} lies inside {outer}; the output must be "
                              "a directory apart from the input (replacing it would delete the input)")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise CheckpointError(f"{dst} already exists and is not empty (it may hold a checkpoint); "
                              "pass --overwrite to replace it")
    from_mcore = mf.is_megatron_checkpoint(src)
    if hf_config_dir:
        cfg_dir = Path(hf_config_dir)
    elif from_mcore:
        cfg_dir = src / mf.HF_SUBDIR if (src / mf.HF_SUBDIR).is_dir() else (mf.run_hf_dir(src) or src / mf.HF_SUBDIR)
    else:
        cfg_dir = src
    if not (cfg_dir / "config.json").is_file():
        raise CheckpointError(f"{cfg_dir}: no config.json" + (
            " (a Megatron checkpoint without our hf/ folder: pass --hf-config DIR, the HF directory of the "
            "model it holds; for a run that trained a generated tiny model, OUTPUT_DIR/hf_tiny_*)"
            if from_mcore else ""))
    hf_config = transformers.AutoConfig.from_pretrained(str(cfg_dir))
    try:
        family = family_for(hf_config)
    except ValueError as e:
        raise CheckpointError(f"{cfg_dir / 'config.json'}: {e}") from e
    layout = layout or ParallelConfig()
    etp = layout.expert_tensor_parallel or layout.tensor_parallel
    world = layout.pipeline_parallel * math.lcm(layout.tensor_parallel, etp * layout.expert_parallel)
    try:
        dims = ParallelDims.build(layout, world, family.shape(hf_config))
    except ValueError as e:
        raise CheckpointError(f"layout does not fit {family.name} ({cfg_dir}): {e}") from e

    t0 = time.perf_counter()
    skipped: list[str] = []
    counted = _Progress(progress)
    ckpt = None if from_mcore else hf_format.open_checked(src)  # every file readable, before any work
    tmp = _sibling(dst)
    try:
        with mf.single_process_megatron() as groups:
            if from_mcore:
                ckdir = mf.iteration_dir(src)
                want = _dtype(dtype) or mf.stored_dtype(ckdir)
                shards = mf.model_shards(hf_config, groups, want)
                if dtype == "auto":  # each tensor as stored (a float32 router beside bf16 weights)
                    stored = mf.stored_dtypes(ckdir)
                    for name, sts in shards.per_param.items():
                        if stored.get(sts[0].key, sts[0].dtype) != sts[0].dtype:
                            mf.store_as(shards, name, stored[sts[0].key])
                counted.start(sum(math.prod(s) for s in shards.shape.values()) * _itemsize(want))
                reader = mf.DistCheckpointReader(ckdir, shards)
                try:
                    if to == "hf":
                        n = _mcore_to_hf(reader, shards, hf_config, tmp, file_bytes, want, counted)
                        hf_format.copy_side_files(cfg_dir, tmp)
                    else:
                        n = _to_mcore(tmp, shards, lambda name: reader.read([name])[name],
                                      cfg_dir, _info(family, hf_config, dims, want, src), counted)
                finally:
                    reader.close()
            else:
                block = hf_format.fp8_block_size(hf_config)
                if block is not None:  # float8 weights read as the model's dtype (or --dtype)
                    ckpt.dequantize_fp8(block, _dtype(dtype) or _config_dtype(hf_config))
                want = _dtype(dtype) or _hf_dtype(ckpt)
                shards = mf.model_shards(hf_config, groups, want)
                pmap = shards.built.param_map
                skipped = hf_format.check_tensors(ckpt, hf_format.expected_hf_shapes(pmap, shards.shape), hf_config)
                if dtype == "auto":
                    for name in _kept_fp32(ckpt, pmap, shards, want):
                        mf.store_as(shards, name, torch.float32)
                counted.start(sum(math.prod(s) for s in shards.shape.values()) * _itemsize(want))
                if to == "mcore":
                    n = _to_mcore(tmp, shards, lambda name: pmap[name].to_mcore_parts(ckpt.get), cfg_dir,
                                  _info(family, hf_config, dims, want, src), counted, release=ckpt.release)
                else:  # HF -> HF: a checked, re-sharded copy
                    n = _hf_to_hf(ckpt, shards, hf_config, tmp, file_bytes, want, counted)
                    hf_format.copy_side_files(src, tmp)
            # Nothing of the layout outlives the block: its end then frees the process groups
            # all at once (``groups.teardown``), not one by one when this function returns.
            groups = shards = pmap = reader = None
        fsync_tree(tmp)
        _publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        counted.close()
        if ckpt is not None:
            ckpt.close()
    return Result(str(dst), n, counted.done, time.perf_counter() - t0, family.name, dims.describe(), skipped,
                  len(ckpt.scales) if ckpt is not None else 0)


# ------------------------------------------------------------------ directions


def _to_mcore(tmp: Path, shards, read_tensor, cfg_dir: Path, info: dict, counted, release=None) -> int:
    ckdir = mf.write_layout(tmp, info)
    (tmp / mf.HF_SUBDIR).mkdir()
    hf_format.copy_side_files(cfg_dir, tmp / mf.HF_SUBDIR)
    common = {"checkpoint_version": 3.0, "iteration": 0, "args": mf.megatron_lm_args(shards.built), "moe_rl": info}
    mf.write_dist_checkpoint(ckdir, shards, read_tensor, common=common, on_tensor=counted.add,
                             release=release)
    return len(shards.per_param)


def _one_rank_plan(hf_config, shards, file_bytes: int, dtype: torch.dtype):
    """The HF tensors to write, each in ``dtype`` or, where it differs, its parameter's
    (``mf.store_as``; DeepSeek's expert bias is always float32)."""
    from moe_rl.weights.plan import plan_export

    expected = hf_format.expected_hf_shapes(shards.built.param_map, shards.shape)
    own = {n: sts[0].dtype for n, sts in shards.per_param.items() if sts[0].dtype != dtype}
    return plan_export(hf_config, expected, ParallelDims.build(ParallelConfig(), 1), bucket_bytes=file_bytes,
                       dtype=dtype, dtypes=own)


def _mcore_to_hf(reader, shards, hf_config, tmp: Path, file_bytes: int, dtype, counted) -> int:
    from moe_rl.weights.export import assemble

    plan = _one_rank_plan(hf_config, shards, file_bytes, dtype)

    def as_stored(it):
        """The HF tensors of ``it`` left in the checkpoint's files when each is exactly one
        stored chunk (a plain copy; a GLU fc1's gate and up, which Megatron stores apart): the
        writer copies them file to file. None when a transform or another layout is involved."""
        if it.entry.kind not in ("copy", "glu"):
            return None
        ranges = reader.block_ranges(it.mcore)
        if ranges is None or len(ranges) != len(it.hf):
            return None
        if any(r.shape != spec.shape or r.dtype != getattr(torch, spec.dtype) for spec, r in zip(it.hf, ranges)):
            return None  # e.g. vocabulary padding to trim, or a cast
        return [(spec.name, r) for spec, r in zip(it.hf, ranges)]

    def buckets():
        for b in plan.buckets:
            named, rest = [], []
            for it in b.items:
                direct = as_stored(it)
                named.append(direct)
                if direct is None:
                    rest.append(it)
            full = reader.read([it.mcore for it in rest])
            for i, it in enumerate(b.items):
                if named[i] is None:
                    named[i] = assemble(it, [full.pop(it.mcore)])
            named = [pair for pairs in named for pair in pairs]
            yield named
            del full, named  # before the next bucket is read

    hf_format.write_shards(tmp, buckets(), len(plan.buckets), on_tensor=counted.add)
    return len(plan.tensors())


def _hf_to_hf(ckpt, shards, hf_config, tmp: Path, file_bytes: int, dtype, counted) -> int:
    plan = _one_rank_plan(hf_config, shards, file_bytes, dtype)

    def buckets():
        for b in plan.buckets:
            yield [(t.name, ckpt.get(t.name).to(getattr(torch, t.dtype))) for t in b.tensors]
            ckpt.release()  # written: its pages may go

    hf_format.write_shards(tmp, buckets(), len(plan.buckets), on_tensor=counted.add)
    return len(plan.tensors())


# ------------------------------------------------------------------ helpers


def _info(family, hf_config, dims: ParallelDims, dtype: torch.dtype, src: Path) -> dict:
    return {"family": family.name, "model_type": hf_config.model_type, "dtype": str(dtype).removeprefix("torch."),
            "layout": {"tensor_parallel": dims.tp, "pipeline_parallel": dims.pp, "expert_parallel": dims.ep,
                       "expert_tensor_parallel": dims.etp},
            "vocab_size": hf_config.vocab_size, "vocab_padding": "none (Megatron pads on load)",
            "source": str(src)}


def _dtype(name: str) -> torch.dtype | None:
    if name == "auto":
        return None
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise CheckpointError(f"--dtype {name!r}: must be auto or a floating dtype (bfloat16, float16, float32)")
    return dt


def _config_dtype(hf_config) -> torch.dtype:
    """The dtype the model's config names (``dtype``/``torch_dtype``), bfloat16 when it names
    none or no 16/32-bit float: what a float8 checkpoint is dequantized to."""
    dt = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    dt = getattr(torch, dt, None) if isinstance(dt, str) else dt
    return dt if dt in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16


def _hf_dtype(ckpt) -> torch.dtype:
    counts: dict = {}
    for name in ckpt.keys():
        dt = ckpt.dtype(name)
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + 1
    if not counts:
        raise CheckpointError(f"{ckpt.path}: no floating-point tensors")
    return max(counts, key=counts.get)


def _kept_fp32(ckpt, pmap, shards, want: torch.dtype) -> list[str]:
    """Parameters whose HF tensors are all float32 in a checkpoint of lower precision
    (transformers saves DeepSeek-V3's router weight and score bias in float32 in a bf16
    model): they stay float32, so a round trip gives back the same bytes."""
    if want == torch.float32:
        return []
    return [name for name, sts in shards.per_param.items()
            if sts[0].dtype != torch.float32 and name in pmap.entries
            and all(ckpt.dtype(n) == torch.float32 for n in pmap[name].hf)]


def _itemsize(dt: torch.dtype) -> int:
    return torch.empty((), dtype=dt).element_size()


def _sibling(dst: Path) -> Path:
    """A new hidden directory beside ``dst`` to build the output in, named by this host and
    process; the ones interrupted conversions on this host left (their process is gone) are
    removed first (another host's are left alone: its process cannot be checked from here)."""
    import socket

    dst.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    for old in dst.parent.glob(f".{dst.name}.converting-{host}-*"):
        pid = old.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    p = dst.parent / f".{dst.name}.converting-{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    p.mkdir()
    return p


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, dst: Path) -> None:
    """Rename the finished ``tmp`` to ``dst`` (replacing what ``dst`` held)."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)
    fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Progress:
    """Bytes written, with a tqdm bar when asked."""

    def __init__(self, show: bool) -> None:
        self.show, self.bar, self.done = show, None, 0

    def start(self, total: int) -> None:
        if self.show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="converting")

    def add(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
