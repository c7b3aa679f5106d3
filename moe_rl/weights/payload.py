"""Tensor payloads for ``/update_weights_from_tensor``: the two formats, side by side.

* ``safetensors`` (the embedded engine's): each entry of ``serialized_named_tensors`` is the
  base64 of a safetensors file (a JSON header of names, dtypes, shapes and offsets, then raw
  bytes). Decoding it can only produce tensors, never run code, so an HTTP server can take
  it from the network. The request says so with ``load_format: "safetensors"``; the embedded
  engine refuses any other format with a 400.
* ``sglang`` (a real SGLang's, for engines on the trainer's own GPUs, as slime and verl use
  it): SGLang's ``MultiprocessingSerializer`` pickles the named tensors as CUDA IPC handles,
  one entry per engine TP rank, ``load_format`` absent. It is only meaningful between
  processes that share the GPUs, and unpickling it runs code: never send it to, or accept it
  from, an untrusted peer.
"""

from __future__ import annotations

import base64
import binascii

import torch

SAFETENSORS = "safetensors"


def encode_safetensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """base64 text of one safetensors file holding ``named`` (host copies, order kept in the header)."""
    from safetensors.torch import save

    tensors = {}
    for name, t in named:
        if name in tensors:
            raise ValueError(f"tensor {name} appears twice in one payload")
        tensors[name] = t.detach().to("cpu").contiguous()
    return base64.b64encode(save(tensors)).decode("ascii")


def decode_safetensors(text: str) -> list[tuple[str, torch.Tensor]]:
    """Inverse of :func:`encode_safetensors`; ValueError on anything that is not one."""
    from safetensors.torch import load

    if not isinstance(text, str):
        raise ValueError(f"expected a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not base64: {e}") from e
    try:
        return list(load(raw).items())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"not a safetensors payload: {type(e).__name__}: {e}") from e


def encode_sglang(named: list[tuple[str, torch.Tensor]], engine_tp_size: int = 1) -> list[str]:
    """SGLang's own payload (``MultiprocessingSerializer``, ``load_format`` absent): one entry
    per engine TP rank. Needs ``sglang`` installed and engines on this machine's GPUs."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError as e:
        raise RuntimeError("weights.tensor_format 'sglang' needs the sglang package (pip install "
                           "'moe_rl[sglang]'); use 'safetensors' for the embedded engine") from e
    blob = MultiprocessingSerializer.serialize(list(named), output_str=True)
    return [blob] * engine_tp_size
