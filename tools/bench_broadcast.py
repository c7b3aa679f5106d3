"""Benchmark: one bucket through the weight-update group, one broadcast per tensor vs one
flattened broadcast (``weights.flatten_buckets``, SGLang's ``flattened_bucket``), one line:

    broadcast: <MB> bucket of <n> tensors ... flatten_ratio=<x>

Rank 0 (the trainer's side: :func:`moe_rl.weights.transport.distributed.flatten_bucket`
included in its time) and rank 1 (the engine's side: the embedded server's receive buffers,
``flattened_bucket`` views included) are two threads of this process joined by a real
``WeightBroadcastGroup`` over gloo (NCCL does not take two ranks on one GPU; there the
per-call cost a flattened bucket saves, a kernel launch and a NCCL round per tensor, is
larger than gloo's, so this measures the smaller gain). ``flatten_ratio``
is the per-tensor time over the flattened time (> 1: flattening is faster); best of --repeat
interleaved runs each. A MoE bucket holds many small tensors (every expert's three matrices,
norms, router weights), which is where the per-call cost adds up: --tensor-kb sets their size.

Usage: python tools/bench_broadcast.py [--bucket-mb 64] [--tensor-kb 256] [--repeat 5]
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_rl.rollout.broadcast_group import WeightBroadcastGroup  # noqa: E402
from moe_rl.rollout.embedded.weights_api import flattened_bucket  # noqa: E402
from moe_rl.weights.transport.distributed import flatten_bucket  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bucket-mb", type=float, default=64)
    ap.add_argument("--tensor-kb", type=float, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    n = max(1, int(a.bucket_mb * 1024 / a.tensor_kb))
    numel = int(a.tensor_kb * 1024 / 2)
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(numel, generator=g).to(torch.bfloat16) for _ in range(n)]
    names = [f"t{i}" for i in range(n)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    port = free_port()
    groups: dict[int, WeightBroadcastGroup] = {}
    joins = [threading.Thread(target=lambda r=r: groups.__setitem__(
        r, WeightBroadcastGroup("127.0.0.1", port, r, 2, "bench", "gloo", timeout_s=120))) for r in (0, 1)]
    for t in joins:
        t.start()
    for t in joins:
        t.join()

    def run(flat: bool) -> float:
        """One bucket, both sides; the seconds until the receiver has every tensor."""
        got: list = []

        def receive() -> None:
            if flat:
                buf, views = flattened_bucket(names, [([numel], torch.bfloat16)] * n)  # one dtype: order kept
                groups[1].broadcast([buf])
                got.extend(views)
            else:
                bufs = [torch.empty(numel, dtype=torch.bfloat16) for _ in range(n)]
                groups[1].broadcast(bufs)
                got.extend(bufs)

        order = list(range(n))
        rx = threading.Thread(target=receive)
        t0 = time.perf_counter()
        rx.start()
        if flat:
            order, buf = flatten_bucket(tensors)
            groups[0].broadcast([buf])
        else:
            groups[0].broadcast(tensors)
        rx.join()
        dt = time.perf_counter() - t0
        assert len(got) == n and all(torch.equal(got[k], tensors[order[k]]) for k in (0, n // 2, n - 1))
        return dt

    best = {True: float("inf"), False: float("inf")}
    run(True), run(False)  # warm-up: connections, allocator
    for _ in range(a.repeat):
        for flat in (False, True):
            best[flat] = min(best[flat], run(flat))
    for grp in groups.values():
        grp.close()
    gbs = lambda s: nbytes / s / 1e9  # noqa: E731
    print(f"broadcast: {nbytes / 2**20:.0f} MB bucket of {n} bf16 tensors of {a.tensor_kb:g} KB over gloo: "
          f"per tensor {best[False] * 1e3:.1f} ms ({gbs(best[False]):.2f} GB/s), flattened "
          f"{best[True] * 1e3:.1f} ms ({gbs(best[True]):.2f} GB/s, flatten copy included) "
          f"flatten_ratio={best[False] / best[True]:.2f}")


if __name__ == "__main__":
    main()
