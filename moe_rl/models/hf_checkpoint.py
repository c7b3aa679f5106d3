"""Lazy reader of a HuggingFace safetensors checkpoint: a rank opens every file but reads
only the tensors it asks for, so each rank loads just its own shards.

The files stay open (memory-mapped) between reads until :meth:`HFCheckpoint.close`; use it as
a context manager, ``with HFCheckpoint(path) as ckpt: ...``, so a loop that loads many
checkpoints (weight sync, tests over many layouts) does not keep every one of them mapped."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class HFCheckpoint:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.path}: no *.safetensors files (and no index)")
            weight_map = {}
            for f in files:
                with safe_open(str(f), "pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    def close(self) -> None:
        """Release every open file (and its memory map). Reading again reopens a file."""
        handles, self._handles = self._handles, {}
        for h in handles.values():
            h.__exit__(None, None, None)

    def __enter__(self) -> "HFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def config(self):
        import transformers

        return transformers.AutoConfig.from_pretrained(str(self.path))

    def keys(self):
        return self.weight_map.keys()

    def total_bytes(self) -> int:
        """Bytes of all tensors in the checkpoint (from the headers, nothing is read)."""
        n = 0
        for fname in set(self.weight_map.values()):
            with safe_open(str(self.path / fname), "pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    numel = 1
                    for d in sl.get_shape():
                        numel *= d
                    n += numel * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        return n

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: tensor {name!r} not in the checkpoint")
        fname = self.weight_map[name]
        h = self._handles.get(fname)
        if h is None:
            h = self._handles[fname] = safe_open(str(self.path / fname), "pt")
        return h

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def get_chunk(self, name: str, dim: int, index: int, parts: int) -> torch.Tensor:
        """Chunk ``index`` of ``parts`` along ``dim``, reading only those bytes."""
        sl = self._handle(name).get_slice(name)
        shape = sl.get_shape()
        size = shape[dim] // parts
        idx = tuple(slice(None) if d != dim else slice(index * size, (index + 1) * size)
                    for d in range(len(shape)))
        t = sl[idx]
        self.bytes_read += t.numel() * t.element_size()
        return t

    def get(self, name: str) -> torch.Tensor:
        t = self._handle(name).get_tensor(name)
        self.bytes_read += t.numel() * t.element_size()
        return t


def unmapped_tensors(names, mapped: set[str], hf_config) -> list[str]:
    """Checkpoint tensors the family's map does not carry and that ``transformers`` would not
    skip either: loading would silently drop them (a model that differs from the checkpoint),
    so the loader refuses them. Skipped, as ``transformers`` skips them: the class's
    ``_keys_to_ignore_on_load_unexpected`` (DeepSeek-V3's multi-token-prediction layer 61; any
    layer past the decoder's when the config has ``num_nextn_predict_layers``), a
    tied ``lm_head.weight`` and rotary ``inv_freq`` buffers of old exports."""
    import re

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    ignore = [r"(^|\.)rotary_emb\.inv_freq$"]
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.model_type, ""), None)
    ignore += list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or [])
    if getattr(hf_config, "tie_word_embeddings", False):
        ignore.append(r"^lm_head\.weight$")

    def mtp(n: str) -> bool:  # DeepSeek's multi-token-prediction layers follow the decoder's
        m = re.match(r"model\.layers\.(\d+)\.", n)
        return bool(getattr(hf_config, "num_nextn_predict_layers", 0)) and m is not None and (
            int(m[1]) >= hf_config.num_hidden_layers)

    return sorted(n for n in names if n not in mapped and not mtp(n) and not any(re.search(p, n) for p in ignore))
