"""Tensor checksums, computed the same way by the trainer (before sending) and by the
engine (on what it received), so a bucket damaged or mixed up on the way is caught and
named before it is applied.

The checksum of a tensor is CRC-32 over its dtype, shape and raw bytes (host copy, C
order), as 8 hex digits: it changes with any flipped bit, a transposed or reshaped tensor
or a dtype cast (zlib's CRC runs at a few GB/s, faster than a memory copy here). It
detects accidents, not tampering.
"""

from __future__ import annotations

import zlib
from typing import Iterable, Mapping

import torch

ALGORITHM = "crc32"


class ChecksumMismatch(ValueError):
    """What arrived is not what was sent; the message names the tensor."""


def tensor_checksum(t: torch.Tensor) -> str:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    head = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode()
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(data, zlib.crc32(head)):08x}"


def checksums(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    return {name: tensor_checksum(t) for name, t in named}


def verify(received: Mapping[str, str], expected: Mapping[str, str], *, where: str = "") -> None:
    """Raise :class:`ChecksumMismatch` naming the first tensor whose checksum differs, or that
    is on one side only. ``received`` and ``expected`` map names to :func:`tensor_checksum`."""
    at = f" ({where})" if where else ""
    for name, got in received.items():
        want = expected.get(name)
        if want is None:
            raise ChecksumMismatch(f"{name}: received{at} but no checksum was sent for it")
        if got != want:
            raise ChecksumMismatch(f"{name}: checksum {got} of the received tensor{at} differs from the "
                                   f"sender's {want}: corrupted or mixed up on the way")
    missing = [n for n in expected if n not in received]
    if missing:
        raise ChecksumMismatch(f"{missing[0]}: checksum sent but the tensor did not arrive{at} "
                               f"({len(missing)} missing)")
