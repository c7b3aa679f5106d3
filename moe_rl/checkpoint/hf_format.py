"""HuggingFace checkpoint directories for conversion: checked before anything is read, and
written bucket by bucket (safetensors files + ``model.safetensors.index.json``, plus the
config and tokenizer files), a directory ``transformers`` and SGLang open.

The shapes an HF checkpoint must have come from the family's parameter map and the canonical
Megatron shapes of a model built from its config (``megatron_format.model_shards``): a
checkpoint whose tensors are missing, extra or of another shape is refused, naming the
tensor and the numbers, before a single tensor is converted.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import torch

from moe_rl.checkpoint.megatron_format import CheckpointError
from moe_rl.models.param_map import ParamMap

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json", ".distcp")
INDEX = "model.safetensors.index.json"


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


def open_checked(path: Path):
    """An :class:`HFCheckpoint` of ``path`` after checking its config and every weights file
    (a truncated or garbled file is named here, not half way through a conversion)."""
    from safetensors import safe_open

    from moe_rl.models.hf_checkpoint import HFCheckpoint

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
        try:
            with safe_open(str(path / f), "pt") as h:
                h.keys()
        except Exception as e:  # noqa: BLE001 - safetensors' own error types
            raise CheckpointError(f"{path / f}: not a readable safetensors file (truncated or garbled?): {e}") from e
    return HFCheckpoint(path)


def check_tensors(ckpt, expected: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor present with its shape, nothing else (headers only)."""
    have = set(ckpt.keys())
    missing = sorted(set(expected) - have)
    extra = sorted(have - set(expected))
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


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Config, generation config, tokenizer and template files: every top-level file that is
    not weights."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.startswith("."):
            shutil.copyfile(f, dst / f.name)
            copied.append(f.name)
    return copied


def write_shards(dst: Path, buckets: Iterable[list[tuple[str, torch.Tensor]]], num_files: int,
                 on_tensor=None) -> None:
    """One safetensors file per bucket (``model-0000i-of-0000N.safetensors``), then the index."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    total = 0
    for i, named in enumerate(buckets):
        fname = f"model-{i + 1:05d}-of-{num_files:05d}.safetensors"
        save_file({n: t.contiguous() for n, t in named}, str(dst / fname), metadata={"format": "pt"})
        for n, t in named:
            weight_map[n] = fname
            total += t.numel() * t.element_size()
            if on_tensor is not None:
                on_tensor(t.numel() * t.element_size())
    assert i + 1 == num_files, (i + 1, num_files)
    (dst / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": dict(sorted(weight_map.items()))}, indent=1))


