"""Record the top-k experts every MoE router picks, through forward hooks on HF modules.

Legend: N tokens in the forward (B*T flattened), K experts per token, L MoE layers.

HF's MoE blocks (qwen3_moe, mixtral, deepseek_v3 in transformers 5.x) own a router at
``model.layers.{i}.mlp.gate`` whose forward returns ``(logits, weights, indices_NK)``.
The hook keeps ``indices_NK`` of the latest forward, per layer; nothing is copied out of
the model's own computation, so the captured ids are the ones the experts were run with.
"""

from __future__ import annotations

import re

import torch

_LAYER_RE = re.compile(r"layers\.(\d+)\.mlp\.gate$")


def find_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """``(layer index, router module)`` for every MoE layer, in layer order."""
    found = []
    for name, mod in model.named_modules():
        m = _LAYER_RE.search(name)
        if m is None:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        if hasattr(parent, "experts"):
            found.append((int(m.group(1)), mod))
    return sorted(found, key=lambda x: x[0])


class RouterCapture:
    """Forward hooks filling ``self.indices[j]`` ([N, K] int64) for the j-th MoE layer."""

    def __init__(self, model: torch.nn.Module) -> None:
        routers = find_routers(model)
        self.layer_ids = [i for i, _ in routers]  # HF layer index of each MoE layer
        self.indices: list[torch.Tensor | None] = [None] * len(routers)
        self._handles = [mod.register_forward_hook(self._hook(j)) for j, (_, mod) in enumerate(routers)]

    def _hook(self, j: int):
        def hook(_mod, _inp, out):
            assert isinstance(out, tuple) and len(out) == 3, "router must return (logits, weights, indices)"
            self.indices[j] = out[2]

        return hook

    @property
    def num_moe_layers(self) -> int:
        return len(self.layer_ids)

    def stacked(self) -> torch.Tensor:
        """Indices of the latest forward as ``[N, L, K]`` int32."""
        return torch.stack([t for t in self.indices], dim=1).to(torch.int32)  # type: ignore[misc]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
