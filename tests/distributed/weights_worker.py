"""Runs under torchrun: the weight checks of many (family, layout) pairs in ONE launch.

    torchrun --nproc-per-node N tests/distributed/weights_worker.py OUT.json SPEC.json

SPEC: {"families": {name: hf_dir}, "layouts": [{"tp":..,"pp":..,"ep":..,"etp":..}],
       "checks": ["export", ...], "bucket_bytes": int}
Checks:
  export  build at the layout, load the HF checkpoint, run the export stream: every HF tensor
          comes out exactly once, bitwise equal to the checkpoint's; at most two buckets alive.
"""

import json
import os
import sys
import time
import traceback
import weakref


def export_check(hf_dir, groups, bucket_bytes):
    import torch
    import torch.distributed as dist

    from moe_rl.models.hf_checkpoint import HFCheckpoint
    from moe_rl.train.model import build_model, load_hf_weights
    from moe_rl.weights.export import export_buckets
    from moe_rl.weights.plan import checkpoint_shapes, plan_export

    with HFCheckpoint(hf_dir) as ckpt:
        cfg = ckpt.config()
        built = build_model(cfg, groups)
        load_hf_weights(built, ckpt, groups)
        plan = plan_export(cfg, checkpoint_shapes(hf_dir), groups.dims, bucket_bytes=bucket_bytes)
        alive = weakref.WeakSet()
        most_alive, names, mismatched, nbytes = 0, [], [], 0
        t0 = time.perf_counter()
        for bucket in export_buckets(plan, built, groups):
            alive.add(bucket)
            most_alive = max(most_alive, len(alive))
            assert bucket.nbytes <= bucket_bytes or len(plan.buckets[bucket.index].items) == 1
            for name, t in bucket.named():
                names.append(name)
                nbytes += t.numel() * t.element_size()
                ref = ckpt.get(name)
                if not (t.dtype == ref.dtype and t.shape == ref.shape and torch.equal(t, ref)):
                    mismatched.append(name)
        seconds = time.perf_counter() - t0
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, {"names": names, "mismatched": mismatched, "most_alive": most_alive,
                                          "bytes": nbytes})
        all_names = [n for r in everyone for n in r["names"]]
        return {"exported": len(all_names), "distinct": len(set(all_names)), "expected": len(ckpt.keys()),
                "missing": sorted(set(ckpt.keys()) - set(all_names))[:5],
                "mismatched": [n for r in everyone for n in r["mismatched"]][:5],
                "most_alive": max(r["most_alive"] for r in everyone),
                "senders": sum(1 for r in everyone if r["names"]), "buckets": len(plan.buckets),
                "bytes": sum(r["bytes"] for r in everyone), "seconds": seconds}


def main():
    out_path, spec_path = sys.argv[1], sys.argv[2]
    spec = json.load(open(spec_path))
    import torch
    import torch.distributed as dist
    import transformers

    from moe_rl.models import family_for
    from moe_rl.parallel import ParallelConfig, ParallelDims
    from moe_rl.parallel import groups as G
    from moe_rl.parallel.cpu_platform import activate_cpu_mode

    torch.set_num_threads(1)
    activate_cpu_mode()
    G.init_distributed()
    world = dist.get_world_size()
    results = []
    for fam, hf_dir in spec["families"].items():
        cfg = transformers.AutoConfig.from_pretrained(hf_dir)
        for lay in spec["layouts"]:
            pcfg = ParallelConfig(tensor_parallel=lay.get("tp", 1), pipeline_parallel=lay.get("pp", 1),
                                  expert_parallel=lay.get("ep", 1), expert_tensor_parallel=lay.get("etp"))
            rec = {"family": fam, "layout": lay}
            try:
                dims = ParallelDims.build(pcfg, world, family_for(cfg).shape(cfg))
            except ValueError as e:
                rec["invalid"] = str(e)
                results.append(rec)
                continue
            rec["layout_name"] = dims.describe()
            for check in spec["checks"]:
                t0 = time.perf_counter()
                if dist.get_rank() == 0:
                    print(f"[worker] {fam} {dims.describe()} {check}", file=sys.stderr, flush=True)
                try:
                    groups = G.setup(dims)
                    if check == "export":
                        rec["export"] = export_check(hf_dir, groups, spec.get("bucket_bytes", 1 << 16))
                    else:
                        raise ValueError(f"unknown check {check!r}")
                except Exception:
                    rec[f"{check}_error"] = f"rank {dist.get_rank()}: " + traceback.format_exc()[-3000:]
                    print(f"[worker] rank {dist.get_rank()} {fam} {check} failed:\n{rec[f'{check}_error']}", file=sys.stderr, flush=True)
                errors = [None] * world
                dist.all_gather_object(errors, rec.get(f"{check}_error"))
                if any(errors):
                    rec[f"{check}_error"] = "\n".join(e for e in errors if e)
                rec[f"{check}_s"] = time.perf_counter() - t0
                groups = None
                G.teardown()
                dist.barrier()
            results.append(rec)
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
