"""SGLang's wire format for routed experts.

Legend: N routed positions, H hidden layers (all of them, dense too), L MoE layers, K top-k.

SGLang 0.5.23 returns ``meta_info.routed_experts`` as base64 of little-endian int32 in C
order, shape ``[prompt + completion - 1 - start, H, K]`` where ``start`` is the request's
``routed_experts_start_len``. Rows of dense layers are included; the embedded engine fills
them with -1 (what SGLang puts there is not documented), and :func:`decode` keeps only the
MoE layers (which layers those are is the model family's ``moe_layer_ids``).
"""

from __future__ import annotations

import base64

import numpy as np
import torch


def encode(routes_NHK: torch.Tensor) -> str:
    arr = routes_NHK.to(torch.int32).contiguous().numpy().astype("<i4", copy=False)
    return base64.b64encode(arr.tobytes()).decode("ascii")


def decode(b64: str, num_hidden_layers: int, topk: int, moe_layer_ids: list[int] | None = None) -> torch.Tensor:
    """``[N, L, K]`` int32 (``L = len(moe_layer_ids)``, or H when None)."""
    flat = np.frombuffer(base64.b64decode(b64), dtype="<i4")
    if flat.size % (num_hidden_layers * topk):
        raise ValueError(f"routed_experts has {flat.size} ints, not a multiple of "
                         f"num_hidden_layers ({num_hidden_layers}) * topk ({topk})")
    routes = torch.from_numpy(flat.astype(np.int32).reshape(-1, num_hidden_layers, topk))
    if moe_layer_ids is not None:
        routes = routes[:, moe_layer_ids]
    return routes

