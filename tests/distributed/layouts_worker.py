"""Runs under torchrun: many (family, layout) checks in ONE launch, results to a JSON file.

    torchrun --nproc-per-node N tests/distributed/layouts_worker.py OUT.json SPEC.json

SPEC: {"families": {name: hf_dir},
       "layouts": [{"tp":..,"pp":..,"ep":..,"etp":.., "vpp":.., "cp":.., "split": "Ett|tL",
                    "opt": "plain", "dtype": "bfloat16", "families": [name, ...], "export": true}],
       "checks": ["parity", "train"]}
A layout with "families" runs on those only; one without on every family of the spec. A
layout with "export" also runs the "export" check (the weight-sync stream vs the checkpoint).
"""

import gc
import json
import os
import sys
import time
import traceback


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
    from invariance_steps import (export_check, hf_actor_steps, hf_train_steps, make_rl_batch,
                                  megatron_actor_steps, megatron_train_steps)
    from moe_rl.train.parity import logit_parity, logprob_parity

    torch.set_num_threads(1)
    activate_cpu_mode()
    G.init_distributed()
    world = dist.get_world_size()
    results = []
    hf_models = {f: transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
                 for f, d in spec["families"].items()}
    refs = {}
    # Every check ends in G.teardown(), whose gc.collect() frees the finished layout's model,
    # DDP and communicators. Walking the heap of transformers + Megatron + the reference
    # models each time cost ~0.4 s per check (measured; about half of a launch's time):
    # move what lives for the whole launch to the permanent generation so that a collection
    # walks only what the checks created.
    gc.collect()
    gc.freeze()
    for fam, hf_dir in spec["families"].items():
        hf = hf_models[fam]
        for lay in spec["layouts"]:
            if fam not in lay.get("families", spec["families"]):
                continue
            cfg = ParallelConfig(tensor_parallel=lay.get("tp", 1), pipeline_parallel=lay.get("pp", 1),
                                 expert_parallel=lay.get("ep", 1), expert_tensor_parallel=lay.get("etp"),
                                 virtual_pipeline=lay.get("vpp", 1), pipeline_layout=lay.get("split"),
                                 context_parallel=lay.get("cp", 1))
            rec = {"family": fam, "layout": lay}
            try:
                dims = ParallelDims.build(cfg, world, family_for(hf.config).shape(hf.config))
            except ValueError as e:
                rec["invalid"] = str(e)
                results.append(rec)
                continue
            rec["layout_name"] = dims.describe()
            for check in spec["checks"] + (["export"] if lay.get("export") else []):
                t0 = time.perf_counter()
                if dist.get_rank() == 0:
                    print(f"[worker] {fam} {dims.describe()} {check}", file=sys.stderr, flush=True)
                try:
                    if "dtype" in lay and check != "train":
                        raise ValueError(f"layout dtype is honoured by the train check only, not {check!r}")
                    groups = G.setup(dims)
                    if check == "parity":
                        rec["parity"] = logit_parity(hf, hf_dir, groups)
                    elif check == "train":
                        if fam not in refs:
                            refs[fam] = hf_train_steps(hf)
                        rec["train"] = megatron_train_steps(
                            hf.config, hf_dir, groups, distributed_optimizer=lay.get("opt") != "plain",
                            params_dtype=getattr(torch, lay.get("dtype", "float32")))
                        rec["train_ref"] = refs[fam]
                    elif check == "actor":
                        key = ("actor", fam)
                        if key not in refs:
                            refs[key] = make_rl_batch(hf)
                            refs[("actor_ref", fam)] = hf_actor_steps(hf, refs[key])
                        rec["actor"] = megatron_actor_steps(hf.config, hf_dir, groups, refs[key])
                        rec["actor_ref"] = refs[("actor_ref", fam)]
                    elif check == "export":
                        rec["export"] = export_check(hf.config, hf_dir, groups)
                    elif check == "logprobs":
                        if fam not in refs:
                            refs[fam] = hf_train_steps(hf)
                        rec["logprobs"] = logprob_parity(hf, hf_dir, groups)
                        G.teardown()
                        groups = G.setup(dims)
                        rec["logprob_train"] = megatron_train_steps(hf.config, hf_dir, groups, head="logprobs")
                        rec["train_ref"] = refs[fam]
                except Exception:
                    rec[f"{check}_error"] = traceback.format_exc()[-3000:]
                rec[f"{check}_s"] = time.perf_counter() - t0
                groups = None
                G.teardown()
                dist.barrier()
                # a layout that leaks its communicators leaks gloo threads (~50 per layout)
                rec[f"{check}_threads"] = len(os.listdir("/proc/self/task"))
            results.append(rec)
    if dist.get_rank() == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
