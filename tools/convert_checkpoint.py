"""Convert checkpoints: HuggingFace <-> Megatron-Core distributed checkpoint (torch_dist).

    python tools/convert_checkpoint.py --input HF_DIR --output OUT --to mcore [--tp 2 --ep 4]
    python tools/convert_checkpoint.py --input OUT --output HF_DIR2 --to hf
    python tools/convert_checkpoint.py --input FP8_HF_DIR --output BF16_HF_DIR --to hf

A fine-grained FP8 checkpoint (DeepSeek-V3/R1, Qwen3 "-FP8": float8 weights with block scales)
is dequantized to its config's dtype on the way, to either target.

One process, no GPU, no launcher. --tp/--pp/--ep/--etp name the layout the checkpoint is
meant for: it is checked against the model (a layout that does not divide it is refused);
the checkpoint itself loads at any layout (Megatron reshards on load). See README
"Checkpoints and weight sync" and moe_rl/checkpoint/convert.py.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="HF directory, or a Megatron checkpoint (ours or an RL run's)")
    ap.add_argument("--output", required=True, help="directory to create (refused if it holds files)")
    ap.add_argument("--to", required=True, choices=["mcore", "hf"])
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size the checkpoint is meant for")
    ap.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    ap.add_argument("--ep", type=int, default=1, help="expert parallel size")
    ap.add_argument("--etp", type=int, default=None, help="expert tensor parallel size (default: --tp)")
    ap.add_argument("--dtype", default="auto", help="auto (as stored) | bfloat16 | float16 | float32")
    ap.add_argument("--hf-config", default=None,
                    help="directory with config.json (and tokenizer) for a Megatron checkpoint without hf/")
    ap.add_argument("--file-gb", type=float, default=4.0, help="HF output: most GB per safetensors file")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    from moe_rl.checkpoint.convert import convert
    from moe_rl.checkpoint.megatron_format import CheckpointError
    from moe_rl.parallel.dims import ParallelConfig

    layout = ParallelConfig(tensor_parallel=a.tp, pipeline_parallel=a.pp, expert_parallel=a.ep,
                            expert_tensor_parallel=a.etp)
    try:
        r = convert(a.input, a.output, to=a.to, layout=layout, overwrite=a.overwrite, hf_config_dir=a.hf_config,
                    dtype=a.dtype, file_bytes=int(a.file_gb * (1 << 30)), progress=not a.no_progress)
    except (CheckpointError, ValueError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {r.output}: {r.family}, {r.tensors} tensors, {r.bytes / 2**20:.1f} MiB in {r.seconds:.1f} s "
          f"({r.bytes / 2**20 / max(r.seconds, 1e-9):.0f} MiB/s); layout checked: {r.layout}")
    if r.dequantized:
        print(f"dequantized {r.dequantized} float8 tensors (with their weight_scale_inv blocks); the output "
              "config has no quantization_config")
    if r.skipped:
        print(f"left out {len(r.skipped)} input tensors that transformers skips too (tied lm_head, rotary "
              f"inv_freq, multi-token-prediction layers), e.g. {r.skipped[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
