"""Benchmark: the weight export stream and checkpoint conversion, on the same bytes, one line each.

A random Qwen3-MoE checkpoint of a few hundred MB (bf16; hidden 1024, 4 layers, 16 experts
of 512, vocabulary 32,000 by default) is written once; then, in this one process:

    export: ... export_ratio=<x>     the export stream (plan executed on the live Megatron
                                     model, every bucket flattened into one send buffer, as a
                                     transport would) vs a plain copy of the same parameters
                                     into that buffer; peak extra memory vs two buckets
    convert hf->mcore: ... convert_ratio=<y>   HF -> Megatron distributed checkpoint vs
                                     ``cp -r`` of the HF directory (same bytes, warm cache,
                                     both into a fresh directory and flushed to disk; best
                                     of --repeat interleaved runs each); peak RSS (every
                                     resident page: anonymous and mapped file pages) above
                                     the interpreter's own, which the line also prints, vs
                                     the largest tensor + one bucket
    convert mcore->hf: ... convert_ratio=<z>   and back, vs ``cp -r`` of the mcore directory

The export runs at one rank (no gather: a TP/EP layout adds its gathers, measured in the
distributed tests, not here). Peak memory is sampled every 5 ms from /proc/self/status
(RssAnon + RssFile + RssShmem at one instant; the line shows anonymous and file pages apart).
Goals: export_ratio >= 0.5 with peak extra <= 2 buckets; convert_ratio >= 0.5 with peak
RSS <= largest tensor + one bucket.

Usage: python tools/bench_weights.py [--hidden 1024 --layers 4 --experts 16 --vocab 32000]
                                     [--bucket-mb 64] [--workdir DIR] [--threads 1]
                                     [--repeat 3] [--skip-export]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class PeakRss:
    """Peak Rss (all resident pages) / RssAnon / RssFile (bytes) above what they were at start,
    sampled in a thread."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s

    @staticmethod
    def now() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                    k, v, _ = line.split()
                    out[k[:-1]] = int(v) * 1024
        out["Rss"] = out["RssAnon"] + out["RssFile"] + out.pop("RssShmem")  # = VmRSS, at one instant
        return out

    def __enter__(self) -> "PeakRss":
        self.start = self.now()
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, v in self.now().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        for k, v in self.now().items():
            self.peak[k] = max(self.peak[k], v)

    @property
    def anon(self) -> int:
        return self.peak["RssAnon"] - self.start["RssAnon"]

    @property
    def file(self) -> int:
        return self.peak["RssFile"] - self.start["RssFile"]

    @property
    def total(self) -> int:
        return self.peak["Rss"] - self.start["Rss"]


def mb(n: float) -> str:
    return f"{n / 2**20:.0f}MB"


def write_checkpoint(path: Path, a) -> Path:
    import torch
    import transformers as tf

    from moe_rl.models.tiny import randomize_, tiny_hf_config

    cfg = tiny_hf_config("qwen3_moe", hidden_size=a.hidden, num_hidden_layers=a.layers, num_experts=a.experts,
                         moe_intermediate_size=a.moe_ffn, intermediate_size=4 * a.hidden, vocab_size=a.vocab,
                         num_attention_heads=a.hidden // 64, num_key_value_heads=max(1, a.hidden // 256),
                         head_dim=64)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed=0)
    model.to(torch.bfloat16).save_pretrained(str(path), safe_serialization=True)
    return path


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def time_cp(src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync"], check=False)
    dt = time.perf_counter() - t0
    shutil.rmtree(dst)
    return dt


def bench_export(hf_dir: Path, bucket_bytes: int) -> str:
    import torch

    from moe_rl.checkpoint.megatron_format import single_process_megatron
    from moe_rl.train.model import build_model, load_hf_weights
    from moe_rl.weights.export import export_buckets
    from moe_rl.weights.plan import checkpoint_shapes, plan_export

    with single_process_megatron() as groups:
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(str(hf_dir))
        built = build_model(cfg, groups, params_dtype=torch.bfloat16)
        load_hf_weights(built, str(hf_dir), groups)
        plan = plan_export(cfg, checkpoint_shapes(hf_dir), groups.dims, bucket_bytes=bucket_bytes,
                           dtype=torch.bfloat16)
        send = torch.empty(max(b.nbytes for b in plan.buckets), dtype=torch.uint8)  # one send buffer
        params = [t.detach() for n, t in built.module.state_dict(keep_vars=True).items()
                  if not n.endswith("_extra_state")]
        total = sum(t.numel() * t.element_size() for t in params)

        def flatten_into(tensors):
            off = 0
            for t in tensors:
                n = t.numel() * t.element_size()
                if off + n > send.numel():  # a plain copy has no buckets: wrap around the buffer
                    off = 0
                send[off:off + n].copy_(t.contiguous().view(-1).view(torch.uint8))
                off += n

        best_copy, best_stream, peak = float("inf"), float("inf"), 0
        for _ in range(3):
            t0 = time.perf_counter()
            flatten_into(params)
            best_copy = min(best_copy, time.perf_counter() - t0)
            with PeakRss() as rss:
                t0 = time.perf_counter()
                nbytes = 0
                for b in export_buckets(plan, built, groups):
                    flatten_into(b.tensors)
                    nbytes += b.nbytes
                best_stream = min(best_stream, time.perf_counter() - t0)
            peak = max(peak, rss.anon)
        assert nbytes == plan.nbytes, (nbytes, plan.nbytes)
        ratio = (nbytes / best_stream) / (total / best_copy)
        return (f"export: 1 rank, {mb(nbytes)} in {len(plan.buckets)} buckets of <= {mb(bucket_bytes)}: "
                f"stream {nbytes / best_stream / 1e9:.2f} GB/s, memcpy {total / best_copy / 1e9:.2f} GB/s, "
                f"export_ratio={ratio:.2f} (goal >= 0.5); peak_extra={mb(peak)} "
                f"(two buckets {mb(2 * bucket_bytes)}: {'ok' if peak <= 2 * bucket_bytes else 'OVER'})")


def largest_tensor(hf_dir: Path) -> int:
    from moe_rl.models.hf_checkpoint import HFCheckpoint

    with HFCheckpoint(hf_dir) as ck:
        sizes = []
        for n in ck.keys():
            numel = 1
            for d in ck.shape(n):
                numel *= d
            sizes.append(numel * 2)
    return max(sizes)


def bench_convert(hf_dir: Path, work: Path, bucket_bytes: int, repeat: int) -> list[str]:
    from moe_rl.checkpoint.convert import convert

    lines = []
    largest = largest_tensor(hf_dir)
    bound = largest + bucket_bytes
    mcore, back = work / "mcore", work / "back"
    # Imports and first-call set-up belong to the interpreter's baseline, not to a conversion.
    convert(hf_dir, work / "warm-up", to="mcore", overwrite=True, file_bytes=bucket_bytes)
    shutil.rmtree(work / "warm-up")
    for name, src, dst, to in (("hf->mcore", hf_dir, mcore, "mcore"), ("mcore->hf", mcore, back, "hf")):
        t_cp, dt, peak = float("inf"), float("inf"), {}
        for _ in range(repeat):  # interleaved, best of each: the machine's load hits both alike
            t_cp = min(t_cp, time_cp(src, work / "cp"))
            shutil.rmtree(dst, ignore_errors=True)  # as for cp: a fresh output, not a replacement
            with PeakRss() as rss:
                t0 = time.perf_counter()
                r = convert(src, dst, to=to, file_bytes=bucket_bytes)
                dt = min(dt, time.perf_counter() - t0)
            for k in ("anon", "file", "total"):
                peak[k] = max(peak.get(k, 0), getattr(rss, k))
            base = rss.start
        nbytes = dir_bytes(src)
        ratio = t_cp / dt
        lines.append(f"convert {name}: {mb(nbytes)} ({r.tensors} tensors) in {dt:.2f} s = {nbytes / dt / 1e6:.0f} MB/s, "
                     f"cp -r {nbytes / t_cp / 1e6:.0f} MB/s, convert_ratio={ratio:.2f} (goal >= 0.5); "
                     f"peak_rss={mb(peak['total'])} above the interpreter's {mb(base['RssAnon'] + base['RssFile'])} "
                     f"(anon {mb(peak['anon'])}, file pages {mb(peak['file'])}; bound: largest tensor "
                     f"{mb(largest)} + bucket {mb(bucket_bytes)} = {mb(bound)}: "
                     f"{'ok' if peak['total'] <= bound else 'OVER'})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--moe-ffn", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--bucket-mb", type=int, default=64)
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="conversion runs (and cp runs) per direction; best of each")
    ap.add_argument("--skip-export", action="store_true", help="only the conversion lines")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench_weights_"))
    work.mkdir(parents=True, exist_ok=True)
    bucket = a.bucket_mb << 20
    try:
        hf_dir = work / "hf"
        if not (hf_dir / "config.json").is_file():
            write_checkpoint(hf_dir, a)
        print(f"model: {mb(dir_bytes(hf_dir))} bf16 checkpoint (hidden {a.hidden}, {a.layers} layers, "
              f"{a.experts} experts of {a.moe_ffn}, vocab {a.vocab}), {a.threads} torch thread(s)", flush=True)
        if not a.skip_export:
            print(bench_export(hf_dir, bucket), flush=True)
        for line in bench_convert(hf_dir, work, bucket, a.repeat):
            print(line, flush=True)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
