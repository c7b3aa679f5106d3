"""Benchmark: chunked vocab log-prob + entropy (moe_rl.train.logprobs) vs naive full logits.

Qwen-sized vocabulary (151,936). Both paths run forward + backward (gradients for the
hidden states and the output weight) of sum(logp * g1) + sum(entropy * g2):
- naive: logits = h @ W^T in fp32 [T, V], log_softmax, gather, entropy from the full softmax;
- ours:  ``token_logprobs_and_entropy`` (chunked, recomputed in backward).
Each path runs in a fresh subprocess; it reports its peak RSS above the RSS it had once
its inputs existed (ru_maxrss high-water mark) and the best wall time of ``--reps`` runs
after one warm-up. Two sizes by default, one result line each, ratios ours / naive:

    H=256 T=1024 memory_ratio=<x> time_ratio=<y>    small hidden: softmax-bound, the fp32
                                                    logits dominate memory
    H=4096 T=128 memory_ratio=<x> time_ratio=<y>    a real hidden size: the matmuls dominate
                                                    time, the [V, H] fp32 weight gradient
                                                    (2.3 GiB, both paths) the memory

The second keeps T small so that it fits in memory and runs in under a minute; the logits'
share of memory grows with T (T x V x 4 bytes), the weight gradient's does not.
One torch thread by default (``--threads``): on a shared machine multi-threaded timings of
the two subprocesses swing several-fold (measured time_ratio 0.64 and 1.30 in consecutive
2-thread runs). About 90 s on an idle core.

Usage: python tools/bench_logprobs.py [--tokens T --hidden H] [--reps 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

VOCAB = 151_936


def _rss_now_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_variant(variant: str, tokens: int, hidden: int, reps: int, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from moe_rl.train.logprobs import token_logprobs_and_entropy

    torch.manual_seed(0)
    # in-place scaling: no transient copy, so the high-water mark equals the RSS here
    h = torch.randn(tokens, hidden).mul_(0.5).requires_grad_()
    w = torch.randn(VOCAB, hidden).mul_(hidden**-0.5).requires_grad_()
    tgt = torch.randint(0, VOCAB, (tokens,))
    g1, g2 = torch.randn(tokens), torch.randn(tokens)

    def naive():
        logits = h @ w.t()
        ls = torch.log_softmax(logits.float(), dim=-1)
        logp = ls.gather(1, tgt[:, None]).squeeze(1)
        ent = -(ls.exp() * ls).sum(-1)
        return logp, ent

    def ours():
        return token_logprobs_and_entropy(h, w, tgt)

    fn = naive if variant == "naive" else ours

    def step():
        logp, ent = fn()
        loss = (logp * g1).sum() + (ent * g2).sum()
        gh, gw = torch.autograd.grad(loss, (h, w))
        return gh, gw

    base = max(_rss_now_kib(), _peak_kib())
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        out = step()
        dt = time.perf_counter() - t0
        del out
        if i:
            times.append(dt)
    peak = _peak_kib()
    return {"variant": variant, "peak_mib": (peak - base) / 1024, "time_s": min(times)}


SIZES = ((1024, 256), (128, 4096))  # (tokens, hidden): softmax-bound, then a real hidden size


def compare(tokens: int, hidden: int, reps: int, threads: int) -> str:
    """Run both variants in fresh processes; returns the result line."""
    logits_gb = tokens * VOCAB * 4 / 1e9
    wgrad_gib = VOCAB * hidden * 4 / 2**30
    print(f"T={tokens} H={hidden} V={VOCAB}: naive fp32 logits {logits_gb:.2f} GB, "
          f"fp32 weight gradient {wgrad_gib:.2f} GiB (both paths)", flush=True)
    res = {}
    for variant in ("naive", "ours"):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--tokens", str(tokens),
               "--hidden", str(hidden), "--reps", str(reps), "--threads", str(threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res[variant] = json.loads(out.strip().splitlines()[-1])
        print(f"  {variant}: peak +{res[variant]['peak_mib']:.0f} MiB, {res[variant]['time_s']:.2f} s", flush=True)
    mem = res["ours"]["peak_mib"] / res["naive"]["peak_mib"]
    tim = res["ours"]["time_s"] / res["naive"]["time_s"]
    return f"H={hidden} T={tokens} memory_ratio={mem:.3f} time_ratio={tim:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, help="run one size (default: both of SIZES)")
    ap.add_argument("--hidden", type=int, help="run one size (default: both of SIZES)")
    ap.add_argument("--reps", type=int, default=1, help="timed runs after one warm-up (best counts)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--variant", choices=["naive", "ours"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.hidden, args.reps, args.threads)))
        return
    if args.tokens is None and args.hidden is None:
        sizes = SIZES
    else:
        sizes = ((args.tokens or SIZES[0][0], args.hidden or SIZES[0][1]),)
    lines = [compare(t, h, args.reps, args.threads) for t, h in sizes]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
