"""Lazy reader of a HuggingFace safetensors checkpoint: a rank opens every file but reads
only the tensors it asks for, so each rank loads just its own shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open


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

    def config(self):
        import transformers

        return transformers.AutoConfig.from_pretrained(str(self.path))

    def keys(self):
        return self.weight_map.keys()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.path}: tensor {name!r} not in the checkpoint")
        fname = self.weight_map[name]
        h = self._handles.get(fname)
        if h is None:
            h = self._handles[fname] = safe_open(str(self.path / fname), "pt")
        t = h.get_tensor(name)
        self.bytes_read += t.numel() * t.element_size()
        return t
