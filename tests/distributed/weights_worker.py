"""Runs under torchrun: the weight checks of many (family, layout) pairs in ONE launch.

    torchrun --nproc-per-node N tests/distributed/weights_worker.py OUT.json SPEC.json

SPEC: {"families": {name: hf_dir}, "layouts": [{"tp":..,"pp":..,"ep":..,"etp":..}],
       "checks": ["export", ...], "bucket_bytes": int}
Checks:
  export  build at the layout, load the HF checkpoint, run the export stream: every HF tensor
          comes out exactly once, bitwise equal to the checkpoint's; at most two buckets alive.

SPEC may also hold "convert" (rank 0, in one process before the job's process group starts):
{"cases": [{"name", "hf", "mcore", "back"}], "errors_dir": DIR}: HF -> mcore -> HF for each
case, compared bitwise with the original; then bad inputs, each refused with a clear error;
"mcore_logits": [[family, layout], ...]: build at the layout, load the converted mcore
checkpoint (Megatron reshards it), logits against ``transformers`` on the original HF weights;
"rl_checkpoint": {"family", "layout", "dir", "back"}: a run checkpoint as the RL loop saves it
(``run_state.save``, model + distributed optimizer at that layout, its config in its own hf/)
under the root "dir", converted to HF from the run's directory (the parent of "dir") by rank 0
once the job's group is gone, compared bitwise with the original.

SPEC may also hold "sync": {"url", "disk_dir", "family", "cases": [{"layout": {...}, "transport": ...}]}:
the trainer (built at the case's layout from the family's checkpoint, then changed so its
weights are in no checkpoint) syncs into the running embedded server at "url" through the
case's transport, with the log-prob probe on. Rank 0 then saves what the export stream gives
(the reference) and compares the server's greedy tokens and log-probs with ``transformers``
loading that reference. The last case also swaps two experts inside the server behind the
trainer's back: the probe must see it.
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


PROMPTS = [[5, 17, 33, 2, 91, 7, 300, 41], [250, 3, 3, 77, 12]]
NEW_TOKENS = 12


def _perturb(built):
    """New trainer weights, the same on every replica of a tensor (a function of its values)."""
    import torch

    with torch.no_grad():
        for p in built.module.parameters():
            p.copy_(p * 1.02 + 0.01 * torch.sin(37.0 * p))


def _export_reference(plan, built, groups, cfg_dir, out_dir):
    """Every HF tensor the export stream gives, saved as an HF checkpoint on rank 0."""
    import shutil

    from safetensors.torch import save_file

    from moe_rl.weights import job
    from moe_rl.weights.export import export_buckets

    mine = {}
    for b in export_buckets(plan, built, groups):
        mine.update({n: t.clone() for n, t in b.named()})
    parts = job.gather_objects(mine)
    if job.rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        save_file({k: v for p in parts for k, v in p.items()}, os.path.join(out_dir, "model.safetensors"))
        shutil.copyfile(os.path.join(cfg_dir, "config.json"), os.path.join(out_dir, "config.json"))


def _engine_vs_transformers(url, ref_dir):
    """Max |log-prob diff| and whether the greedy tokens agree, server vs transformers."""
    import httpx
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    same, diff = True, 0.0
    for prompt in PROMPTS:
        r = httpx.post(url + "/generate", json={"input_ids": prompt, "return_logprob": True, "sampling_params": {
            "max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}}, timeout=60).json()
        ids = r["output_ids"]
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
            logits = model(torch.tensor([prompt + ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(-1, torch.tensor(ids)[:, None])[:, 0]
        got = torch.tensor([x[0] for x in r["meta_info"]["output_token_logprobs"]])
        same &= ids == ref
        diff = max(diff, float((lp - got).abs().max()))
    return {"greedy_equal": same, "logprob_max_diff": diff, "version": r["meta_info"]["weight_version"]}


def sync_check(case, version, spec, hf_dir, groups, tmp):
    import httpx
    import torch

    from moe_rl.models.hf_checkpoint import HFCheckpoint
    from moe_rl.rollout.client import RolloutClient
    from moe_rl.rollout.config import ClientConfig
    from moe_rl.train.model import build_model, load_hf_weights
    from moe_rl.weights import job
    from moe_rl.weights.config import WeightSyncConfig
    from moe_rl.weights.payload import encode_safetensors
    from moe_rl.weights.plan import checkpoint_shapes, plan_export
    from moe_rl.weights.probe import probe
    from moe_rl.weights.sync import WeightSync

    url = spec["url"]
    deadline = time.monotonic() + 120  # the server starts while this launch imports
    while job.rank() == 0:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not become healthy")
        time.sleep(0.2)
    job.barrier()
    with HFCheckpoint(hf_dir) as ckpt:
        cfg = ckpt.config()
        built = build_model(cfg, groups)
        load_hf_weights(built, ckpt, groups)
    _perturb(built)
    wcfg = WeightSyncConfig(transport=case["transport"], bucket_bytes=spec.get("bucket_bytes", 1 << 18),
                            disk_dir=spec["disk_dir"], timeout_s=60, probe_max_logprob_diff=1e-3)
    plan = plan_export(cfg, checkpoint_shapes(hf_dir), groups.dims, bucket_bytes=wcfg.bucket_bytes)
    client = RolloutClient(ClientConfig(server_urls=[url], control_timeout_s=60))
    sync = WeightSync(wcfg, client, plan, groups, hf_dir=hf_dir)
    try:
        metrics = sync.sync(built, version)
    finally:
        sync.close()
    rec = {"metrics": metrics, "staging": sync.staging, "verify": sync.verify}
    ref_dir = os.path.join(tmp, f"reference_v{version}")
    _export_reference(plan, built, groups, hf_dir, ref_dir)
    if job.rank() == 0:
        rec["engine_vs_transformers"] = _engine_vs_transformers(url, ref_dir)
    if case.get("swap_experts"):
        if job.rank() == 0:  # experts 0 and 1 of layer 1 trade places inside the server only
            with HFCheckpoint(ref_dir) as ref:
                p = "model.layers.1.mlp.experts."
                named = [(f"{p}{a}.{w}.weight", ref.get(f"{p}{b}.{w}.weight"))
                         for a, b in ((0, 1), (1, 0)) for w in ("gate_proj", "up_proj", "down_proj")]
            r = httpx.post(url + "/update_weights_from_tensor", timeout=60, json={
                "serialized_named_tensors": [encode_safetensors(named)], "load_format": "safetensors"})
            assert r.status_code == 200, r.text
        job.barrier()
        found = probe(client, built, groups, prompts=wcfg.probe_prompts, prompt_len=wcfg.probe_prompt_len,
                      new_tokens=wcfg.probe_new_tokens, seed=wcfg.probe_seed)
        found.pop("per_engine")
        rec["swapped_probe"] = found
    return rec


def convert_phase(spec):
    """Rank 0, before torch.distributed starts: conversions and refused inputs."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from moe_rl.checkpoint.convert import convert
    from moe_rl.checkpoint.megatron_format import CheckpointError
    from moe_rl.models.hf_checkpoint import HFCheckpoint

    out = {"cases": {}, "errors": {}}
    for case in spec["cases"]:
        t0 = time.perf_counter()
        convert(case["hf"], case["mcore"], to="mcore")
        convert(case["mcore"], case["back"], to="hf")
        with HFCheckpoint(case["hf"]) as a, HFCheckpoint(case["back"]) as b:
            bad = [k for k in a.keys() if k not in b.weight_map or not (
                a.get(k).dtype == b.get(k).dtype and torch.equal(a.get(k), b.get(k)))]
            extra = sorted(set(b.keys()) - set(a.keys()))
        side = sorted(f for f in os.listdir(case["back"]) if f.endswith(".json"))
        out["cases"][case["name"]] = {"bad": bad[:5], "extra": extra[:5], "side_files": side,
                                      "seconds": time.perf_counter() - t0}
    d = spec.get("errors_dir")
    if d:
        good = spec["errors_source"]
        tensors = load_file(os.path.join(good, "model.safetensors"))

        def broken(name, change):
            p = os.path.join(d, name)
            shutil.copytree(good, p)
            t = dict(tensors)
            change(t)
            save_file(t, os.path.join(p, "model.safetensors"), metadata={"format": "pt"})
            return p

        victim = "model.layers.1.self_attn.k_proj.weight"
        cases = {
            "missing": broken("missing", lambda t: t.pop(victim)),
            "extra": broken("extra", lambda t: t.update({"model.layers.9.bogus.weight": torch.zeros(2)})),
            "shape": broken("shape", lambda t: t.update({victim: torch.zeros(16, 64)})),
        }
        for name, path in cases.items():
            try:
                convert(path, os.path.join(d, name + "_out"), to="mcore")
                out["errors"][name] = "NOT REFUSED"
            except CheckpointError as e:
                out["errors"][name] = str(e)
        # interrupted half way: nothing under the output name, no temporary left behind
        import moe_rl.checkpoint.megatron_format as mf

        real = mf.write_dist_checkpoint

        def crash(path, shards, read_tensor, **kw):
            n = [0]

            def read(name):
                n[0] += 1
                if n[0] > 5:
                    raise RuntimeError("simulated crash")
                return read_tensor(name)

            return real(path, shards, read, **kw)

        mf.write_dist_checkpoint = crash
        try:
            convert(good, os.path.join(d, "crashed"), to="mcore")
            out["errors"]["crashed"] = "NOT INTERRUPTED"
        except Exception as e:  # noqa: BLE001 - DCP wraps it in its own exception type
            out["errors"]["crashed"] = f"{type(e).__name__}: {e}"[:300]
        finally:
            mf.write_dist_checkpoint = real
        out["errors"]["crashed_left"] = sorted(f for f in os.listdir(d) if "crashed" in f)
    return out


def mcore_logits_check(hf_dir, mcore_dir, groups):
    import torch
    import torch.distributed as dist
    import transformers

    from moe_rl.checkpoint.megatron_format import load_into
    from moe_rl.train.model import build_model
    from moe_rl.train.parity import megatron_logits, random_tokens

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    built = build_model(hf.config, groups)
    load_into(built, mcore_dir)
    mbs = [random_tokens(hf.config.vocab_size, 2, 32, seed) for seed in (11, 12)]
    ours = megatron_logits(built, mbs, groups)
    diff = 0.0
    with torch.no_grad():
        for t, o in zip(mbs, ours):
            diff = max(diff, float((o - hf(t).logits.float()).abs().max()))
    d = torch.tensor([diff], dtype=torch.float64)
    dist.all_reduce(d, op=dist.ReduceOp.MAX)
    return {"max_abs_diff": float(d)}


def save_rl_checkpoint(hf_dir, root, groups):
    """A run checkpoint exactly as the RL loop writes it (``run_state.save``: model and
    distributed optimizer at this layout), of the HF weights: one optimizer step at lr 0
    (Megatron's distributed optimizer has no state to save before its first step) leaves
    every weight as loaded."""
    from moe_rl.checkpoint import run_state as rs
    from moe_rl.models.hf_checkpoint import HFCheckpoint
    from moe_rl.train.config import OptimConfig
    from moe_rl.train.model import build_model, load_hf_weights
    from moe_rl.train.optimizer import optimizer_step, wrap_for_training

    with HFCheckpoint(hf_dir) as ckpt:
        cfg = ckpt.config()
        built = build_model(cfg, groups)
        load_hf_weights(built, ckpt, groups)
    st = wrap_for_training(built.module, OptimConfig(lr=0.0), groups)
    optimizer_step(st)
    # as a run on a generated tiny model: no model.hf_dir; the checkpoint's own hf/ has the config
    path = rs.save(root, 5, train_state=st, built=built, groups=groups, hf_files=hf_dir,
                   run_state={"model": rs.model_identity(cfg)}, config_text="model:\n  hf_dir: null\n")
    return {"saved": path}


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
    results = []
    if spec.get("convert"):  # one process, before the job's group exists: rank 0 converts, the others wait
        marker = out_path + ".converted"
        if int(os.environ.get("RANK", "0")) == 0:
            t0 = time.perf_counter()
            try:
                rec = {"convert": convert_phase(spec["convert"])}
            except Exception:
                rec = {"convert_error": traceback.format_exc()[-3000:]}
            rec["convert_s"] = time.perf_counter() - t0
            with open(marker + ".tmp", "w") as f:
                json.dump(rec, f)
            os.replace(marker + ".tmp", marker)
        deadline = time.monotonic() + 300
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        results.append(json.load(open(marker)))
    G.init_distributed()
    world = dist.get_world_size()
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
            extra = [c for c, pairs in (("mcore_logits", spec.get("mcore_logits", [])),
                                         ("rl_checkpoint", [[spec["rl_checkpoint"]["family"],
                                                             spec["rl_checkpoint"]["layout"]]]
                                          if spec.get("rl_checkpoint") else []))
                     if [fam, lay] in pairs]
            for check in spec["checks"] + extra:
                t0 = time.perf_counter()
                if dist.get_rank() == 0:
                    print(f"[worker] {fam} {dims.describe()} {check}", file=sys.stderr, flush=True)
                try:
                    groups = G.setup(dims)
                    if check == "export":
                        rec["export"] = export_check(hf_dir, groups, spec.get("bucket_bytes", 1 << 16))
                    elif check == "mcore_logits":
                        rec["mcore_logits"] = mcore_logits_check(hf_dir, spec["mcore_dirs"][fam], groups)
                    elif check == "rl_checkpoint":
                        rec["rl_checkpoint"] = save_rl_checkpoint(hf_dir, spec["rl_checkpoint"]["dir"], groups)
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
    sync = spec.get("sync")
    for i, case in enumerate(sync["cases"] if sync else []):
        hf_dir = spec["families"][sync["family"]]
        lay = case["layout"]
        pcfg = ParallelConfig(tensor_parallel=lay.get("tp", 1), pipeline_parallel=lay.get("pp", 1),
                              expert_parallel=lay.get("ep", 1), expert_tensor_parallel=lay.get("etp"))
        rec = {"sync_case": i, "layout": lay, "transport": case["transport"]}
        t0 = time.perf_counter()
        if dist.get_rank() == 0:
            print(f"[worker] sync {case}", file=sys.stderr, flush=True)
        try:
            cfg = transformers.AutoConfig.from_pretrained(hf_dir)
            groups = G.setup(ParallelDims.build(pcfg, world, family_for(cfg).shape(cfg)))
            rec["sync"] = sync_check(case, str(i + 1), sync, hf_dir, groups, os.path.dirname(out_path))
        except Exception:
            rec["sync_error"] = f"rank {dist.get_rank()}: " + traceback.format_exc()[-3000:]
            print(f"[worker] {rec['sync_error']}", file=sys.stderr, flush=True)
        errors = [None] * world
        dist.all_gather_object(errors, rec.get("sync_error"))
        if any(errors):
            rec["sync_error"] = "\n".join(e for e in errors if e)
        rec["sync_s"] = time.perf_counter() - t0
        groups = None
        G.teardown()
        dist.barrier()
        results.append(rec)
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    rl = spec.get("rl_checkpoint")
    if rl and rank == 0:  # the job's group is gone: convert the RL run's checkpoint in this one process
        t0 = time.perf_counter()
        try:
            import torch

            from moe_rl.checkpoint.convert import convert
            from moe_rl.models.hf_checkpoint import HFCheckpoint

            convert(os.path.dirname(rl["dir"]), rl["back"], to="hf")  # the run's output directory
            with HFCheckpoint(spec["families"][rl["family"]]) as a, HFCheckpoint(rl["back"]) as b:
                bad = [k for k in a.keys() if k not in b.weight_map or not torch.equal(a.get(k), b.get(k))]
                rec = {"rl_convert": {"bad": bad[:5], "tensors": len(b.keys()), "expected": len(a.keys())}}
        except Exception:
            rec = {"rl_convert_error": traceback.format_exc()[-3000:]}
        rec["rl_convert_s"] = time.perf_counter() - t0
        results.append(rec)
    if rank == 0:
        with open(out_path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(out_path + ".tmp", out_path)


if __name__ == "__main__":
    main()
