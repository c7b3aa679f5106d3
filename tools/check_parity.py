"""Logit parity of our Megatron build against HuggingFace transformers, at any layout.

    torchrun --nproc-per-node N tools/check_parity.py --family F [--hf-dir DIR]
             [--tp T --pp P --ep E --etp X --vpp V --cp C --pipeline-layout SPLIT]

Loads the HF checkpoint DIR (or a tiny random one of family F that it builds) into Megatron
at the layout, runs the same tokens through ``transformers``, prints
``max_abs_diff=<x>`` as its last line and exits 1 above the tolerance (default 1e-4, fp32).
A layout that cannot work for the model exits 2 with the numbers in the message.

Pipeline stages are balanced by default (any layer count at any --pp); --pipeline-layout
gives the split: layers per stage "1,2" (PP x VPP entries, in layer order) or Megatron's
layout string "Ett|tL".
"""

from __future__ import annotations

import argparse
import sys
import tempfile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", help="model family (needed without --hf-dir)")
    ap.add_argument("--hf-dir", help="HF checkpoint directory (config.json + safetensors)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--etp", type=int, default=None)
    ap.add_argument("--vpp", type=int, default=1, help="virtual pipeline stages per pipeline rank (interleaved 1F1B)")
    ap.add_argument("--cp", type=int, default=1, help="context parallel degree")
    ap.add_argument("--pipeline-layout", default=None,
                    help='layers per stage, e.g. "1,2", or Megatron\'s layout string, e.g. "Ett|tL"')
    ap.add_argument("--no-sp", action="store_true", help="disable sequence parallelism")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tolerance", type=float, default=None)
    args = ap.parse_args(argv)

    import torch
    import torch.distributed as dist
    import transformers

    from moe_rl.models.tiny import TINY_FAMILIES
    from moe_rl.models.tiny import save_tiny_hf
    from moe_rl.parallel import ParallelConfig, ParallelDims
    from moe_rl.parallel import groups as G
    from moe_rl.parallel.cpu_platform import activate_cpu_mode
    from moe_rl.train.parity import LOGIT_TOLERANCE, logit_parity

    if not args.hf_dir and args.family not in TINY_FAMILIES:
        ap.error(f"--family must be one of {sorted(TINY_FAMILIES)} when --hf-dir is not given")
    if not torch.cuda.is_available():
        activate_cpu_mode()
    G.init_distributed()
    rank = dist.get_rank()
    hf_dir = args.hf_dir
    tmp = None
    if hf_dir is None:
        box = [None]
        if rank == 0:
            tmp = tempfile.mkdtemp(prefix=f"moe_rl_tiny_{args.family}_")
            save_tiny_hf(args.family, tmp)
            box = [tmp]
        dist.broadcast_object_list(box, src=0)
        hf_dir = box[0]
    from moe_rl.models import family_for

    try:
        hf_config = transformers.AutoConfig.from_pretrained(hf_dir)
        dims = ParallelDims.build(
            ParallelConfig(tensor_parallel=args.tp, pipeline_parallel=args.pp,
                           expert_parallel=args.ep, expert_tensor_parallel=args.etp,
                           sequence_parallel=not args.no_sp, virtual_pipeline=args.vpp,
                           context_parallel=args.cp, pipeline_layout=args.pipeline_layout),
            dist.get_world_size(), family_for(hf_config).shape(hf_config))
        if args.seq % (2 * dims.cp) or (dims.sp and (args.seq // dims.cp) % dims.tp):
            raise ValueError(f"--seq {args.seq} must be divisible by 2 x context_parallel ({dims.cp})"
                             + (f" and, divided by context_parallel, by tensor_parallel ({dims.tp})" if dims.sp else ""))
    except ValueError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    groups = G.setup(dims)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    if torch.cuda.is_available():
        hf = hf.cuda()
    # the interleaved schedule needs at least PP micro-batches
    res = logit_parity(hf, hf_dir, groups, batch=args.batch, seq=args.seq, num_microbatches=max(2, dims.pp))
    tol = args.tolerance if args.tolerance is not None else LOGIT_TOLERANCE
    G.teardown()
    dist.barrier()
    if rank == 0:
        print(f"layout={dims.describe()} family={hf.config.model_type} "
              f"max_abs_logit={res['max_abs_logit']:.3f} tolerance={tol:g}")
        print(f"max_abs_diff={res['max_abs_diff']:.3e}")
        if tmp:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    dist.destroy_process_group()
    return 0 if res["max_abs_diff"] <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
