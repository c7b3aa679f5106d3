"""Benchmark: chunked vocab log-prob + entropy (moe_rl.train.logprobs) vs naive full logits.

Qwen-sized vocabulary (151,936). Both paths run forward + backward (gradients for the
hidden states and the output weight) of sum(logp * g1) + sum(entropy * g2):
- naive: logits = h @ W^T in fp32 [T, V], log_softmax, gather, entropy from the full softmax;
- ours:  ``token_logprobs_and_entropy`` (chunked, recomputed in backward).
Each path runs in a fresh subprocess; it reports its peak RSS above the RSS it had once
its inputs existed (ru_maxrss high-water mark) and the best wall time of ``--reps`` runs
after one warm-up. The last line printed is

    memory_ratio=<ours/naive> time_ratio=<ours/naive>

Usage: python tools/bench_logprobs.py [--tokens 2048] [--hidden 256] [--reps 2]
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


def run_variant(variant: str, tokens: int, hidden: int, reps: int) -> dict:
    import torch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--variant", choices=["naive", "ours"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.hidden, args.reps)))
        return
    logits_gb = args.tokens * VOCAB * 4 / 1e9
    print(f"T={args.tokens} H={args.hidden} V={VOCAB}: naive fp32 logits {logits_gb:.2f} GB")
    res = {}
    for variant in ("naive", "ours"):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant, "--tokens", str(args.tokens),
               "--hidden", str(args.hidden), "--reps", str(args.reps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        res[variant] = json.loads(out.strip().splitlines()[-1])
        print(f"{variant}: peak +{res[variant]['peak_mib']:.0f} MiB, {res[variant]['time_s']:.2f} s")
    mem = res["ours"]["peak_mib"] / res["naive"]["peak_mib"]
    tim = res["ours"]["time_s"] / res["naive"]["time_s"]
    print(f"memory_ratio={mem:.3f} time_ratio={tim:.3f}")


if __name__ == "__main__":
    main()
