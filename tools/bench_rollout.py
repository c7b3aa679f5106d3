"""Rollout throughput of the embedded engine, as ratios measured in one run (not a test).

Workload: a random Qwen3-MoE (hidden 256, 4 layers, 8 experts top-2, vocab 512), ``--prompts``
prompts of 64-256 tokens, 8 samples per prompt; every sample's response budget is drawn once,
log-uniform on [8, 256] (long-tailed: median ~45, mean ~72, a few near 256). EOS is ignored,
so every side produces exactly the budgeted tokens; 32 rows decode at once everywhere.

Three measurements, all of the same HF model forward (``transformers``' own modelling code):

1. static batching: ``transformers`` ``generate`` on batches of 4 prompts x 8 samples (32
   rows), ``max_new_tokens`` = the batch's largest budget, static KV cache; only budgeted
   tokens count as useful, the rest is padding.
2. continuous batching: ``EmbeddedEngine`` with 32 slots (each group's prompt prefilled once,
   a finished slot refilled at once, routed experts captured).
3. ceiling: a bare loop of single-token forwards of 32 rows with a preallocated
   ``transformers.StaticCache`` of the workload's longest context, no scheduling and no
   sampling: the most any engine built on this HF forward can decode. Its input ids are drawn
   uniformly at random each step, so its rows spread over the experts as sampled text does
   (a greedy loop soon feeds 32 identical rows to the same two experts, a cheaper MoE step).
   Its steps are interleaved with the other two (one every ``--ceiling-every`` decode steps;
   inside ``generate`` through a logits processor), so each is compared with the ceiling
   under the same machine load; its time is subtracted from generate's and never counted
   as the engine's.

Per decoded row (1) and (2) run at HF's speed: ``speedup`` is what continuous batching saves
on this workload's padding (and the shared prefill), not a faster forward. It is computed
from each side's fraction of the ceiling measured alongside it (robust to load that changes
between the two phases on a shared machine); the raw wall-clock ratio is printed with it.
``engine_vs_ceiling`` is the engine's useful tokens/s over the ceiling's tokens/s (goal
>= 0.85); the line before it splits it into occupancy (useful tokens / (decode steps x 32):
what the workload's long tail leaves once fewer samples than slots remain), forward speed
(ceiling step / our decode step) and the share of the engine's time in decode forwards.

One torch thread by default: on a shared machine multi-threaded CPU timings swing several-fold
(OpenMP threads wait for each other; measured 0.75x to 5.4x raw speedup on the same workload);
``--threads 0`` keeps torch's default. A run takes about 45 s on an idle core.

Usage: python tools/bench_rollout.py [--prompts 16] [--threads 1] [--no-static] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time

import torch

SLOTS, SAMPLES, PER_BATCH = 32, 8, 4  # engine slots = generate rows = ceiling rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16, help="prompts (x8 samples); a multiple of 4")
    ap.add_argument("--quick", action="store_true", help="4 prompts (a smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0 = torch's default)")
    ap.add_argument("--ceiling-every", type=int, default=4, help="one ceiling step per this many decode steps")
    ap.add_argument("--no-static", action="store_true", help="skip transformers.generate (engine vs ceiling only)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import transformers as tf

    from moe_rl.models.tiny import randomize_, tiny_hf_config
    from moe_rl.rollout.config import EmbeddedEngineConfig
    from moe_rl.rollout.embedded.engine import EmbeddedEngine
    from moe_rl.rollout.embedded.hf_contract import cache_kwarg
    from moe_rl.rollout.types import SamplingParams

    n_prompts = 4 if a.quick else a.prompts
    if n_prompts < PER_BATCH or n_prompts % PER_BATCH:
        raise SystemExit(f"--prompts ({n_prompts}) must be a positive multiple of {PER_BATCH}")
    cfg = tiny_hf_config("qwen3_moe", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, moe_intermediate_size=256, intermediate_size=512,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)
    torch.manual_seed(a.seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    randomize_(model, a.seed)
    bare = copy.deepcopy(model)  # the ceiling's copy: the engine hooks its routers into `model`

    g = torch.Generator().manual_seed(a.seed)
    prompts = [torch.randint(3, 512, (int(torch.randint(64, 257, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n_prompts)]
    u = torch.rand(n_prompts, SAMPLES, generator=g)
    budgets = torch.exp(math.log(8) + u * (math.log(256) - math.log(8))).round().long().clamp(8, 256).tolist()
    useful = sum(sum(b) for b in budgets)
    max_ctx = max(len(p) + max(b) for p, b in zip(prompts, budgets))
    print(f"workload: prompts={n_prompts} samples/prompt={SAMPLES} rows={SLOTS} useful_tokens={useful} "
          f"mean_budget={useful / (n_prompts * SAMPLES):.1f} max_context={max_ctx} "
          f"threads={torch.get_num_threads()} loadavg={os.getloadavg()[0]:.2f}/{os.cpu_count()} cores", flush=True)

    # ---- 3. the ceiling, stepped from inside the other two measurements
    ckw = cache_kwarg(bare)
    ceiling_cache = tf.StaticCache(config=cfg, max_cache_len=max_ctx)
    ceil = {"pos": 0, "times": [], "gen": torch.Generator().manual_seed(a.seed + 1)}

    @torch.no_grad()
    def ceiling_step() -> float:
        if ceil["pos"] == max_ctx:
            ceiling_cache.reset()
            ceil["pos"] = 0
        ids = torch.randint(3, cfg.vocab_size, (SLOTS, 1), generator=ceil["gen"])
        pos = torch.full((SLOTS, 1), ceil["pos"])
        t = time.perf_counter()
        bare(input_ids=ids, position_ids=pos, use_cache=True, **{ckw: ceiling_cache})
        dt = time.perf_counter() - t
        ceil["pos"] += 1
        ceil["times"].append(dt)
        return dt

    def ceiling_mean(since: int) -> float:
        ts = ceil["times"][since:]
        return sum(ts) / len(ts)

    for _ in range(3):
        ceiling_step()  # warm-up
    del ceil["times"][:]

    # ---- 1. static batching: transformers.generate
    static_frac = None
    if not a.no_static:
        gen_cfg = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=SAMPLES,
                       eos_token_id=None, pad_token_id=0, cache_implementation="static")

        class CeilingProbe(tf.LogitsProcessor):
            """Runs a ceiling step every ``--ceiling-every`` generate steps; scores untouched."""

            calls, seconds = 0, 0.0

            def __call__(self, input_ids, scores):
                CeilingProbe.calls += 1
                if CeilingProbe.calls % a.ceiling_every == 0:
                    CeilingProbe.seconds += ceiling_step()
                return scores

        def hf_batch(i: int, cap: int | None = None) -> int:
            ps, bs = prompts[i:i + PER_BATCH], budgets[i:i + PER_BATCH]
            L = max(len(p) for p in ps)
            ids = torch.tensor([[0] * (L - len(p)) + p for p in ps])
            mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps])
            m = min(max(max(b) for b in bs), cap or 1 << 30)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=m, **gen_cfg,
                                     logits_processor=tf.LogitsProcessorList([CeilingProbe()]))
            assert out.shape == (len(ps) * SAMPLES, L + m), out.shape
            return len(ps) * SAMPLES * m

        hf_batch(0, cap=4)  # warm-up
        del ceil["times"][:]
        CeilingProbe.seconds = 0.0
        t0 = time.perf_counter()
        decoded = sum(hf_batch(i) for i in range(0, n_prompts, PER_BATCH))
        t_static = time.perf_counter() - t0 - CeilingProbe.seconds
        static_tps = useful / t_static
        static_frac = static_tps / (SLOTS / ceiling_mean(0))
        print(f"static batching (transformers.generate, static cache, {PER_BATCH} prompts x {SAMPLES} samples "
              f"per batch, every row decoded to its batch's largest budget): {t_static:.1f}s, "
              f"{static_tps:.0f} useful tok/s = {static_frac:.2f} of the ceiling alongside; {decoded} row-tokens "
              f"decoded, {useful / decoded:.0%} useful", flush=True)

    # ---- 2. continuous batching: the embedded engine, its forwards timed from outside
    eng = EmbeddedEngine(EmbeddedEngineConfig(max_running=SLOTS, max_context_len=1024,
                                              capture_routed_experts=True), model=model)
    acc = {"prefill_s": 0.0, "prefills": 0, "decode_s": 0.0, "decodes": 0, "live_rows": 0, "rows": 0}
    prefill, decode = eng.forward_prefill, eng.forward_decode

    def timed_prefill(*args, **kw):
        t = time.perf_counter()
        try:
            return prefill(*args, **kw)
        finally:
            acc["prefill_s"] += time.perf_counter() - t
            acc["prefills"] += 1

    def timed_decode(ids_B, pos_B, cache):
        acc["live_rows"] += eng.num_running
        acc["rows"] += ids_B.shape[0]
        t = time.perf_counter()
        try:
            return decode(ids_B, pos_B, cache)
        finally:
            acc["decode_s"] += time.perf_counter() - t
            acc["decodes"] += 1

    eng.forward_prefill, eng.forward_decode = timed_prefill, timed_decode
    futs = [f for p, bs in zip(prompts, budgets)
            for f in eng.submit(p, [SamplingParams(max_new_tokens=b, temperature=1.0, ignore_eos=True) for b in bs])]
    first_ceiling = len(ceil["times"])
    t_ours, steps = 0.0, 0
    while not all(f.done() for f in futs):
        t = time.perf_counter()
        eng.step()
        t_ours += time.perf_counter() - t
        steps += 1
        if steps % a.ceiling_every == 0:
            ceiling_step()
    got = sum(len(f.result().output_ids) for f in futs)
    assert got == useful, (got, useful)
    ours_tps = useful / t_ours
    t_step = ceiling_mean(first_ceiling)
    ceiling_tps = SLOTS / t_step
    ours_frac = ours_tps / ceiling_tps
    print(f"continuous batching (EmbeddedEngine, {SLOTS} slots, one prefill per group, routed experts "
          f"captured): {t_ours:.1f}s, {ours_tps:.0f} useful tok/s = {ours_frac:.2f} of the ceiling alongside",
          flush=True)
    if static_frac is not None:
        print("  per decoded row both run the same HF forward at HF's speed: the speedup is the padding and "
              "repeated prefill that continuous batching avoids, not a faster forward")
        print(f"speedup={ours_frac / static_frac:.2f}  (continuous / static batching, useful tok/s, each against "
              f"the ceiling measured alongside it; raw wall-clock ratio {ours_tps / static_tps:.2f})", flush=True)

    occupancy = useful / (acc["decodes"] * SLOTS)
    fwd_speed = acc["decodes"] * t_step / acc["decode_s"]
    decode_share = acc["decode_s"] / t_ours
    other_s = t_ours - acc["decode_s"] - acc["prefill_s"]
    print(f"ceiling (bare HF decode loop: {SLOTS} rows, StaticCache of {max_ctx} positions, random ids, "
          f"no scheduling): {t_step * 1e3:.1f} ms/step = {ceiling_tps:.0f} tok/s, mean of "
          f"{len(ceil['times']) - first_ceiling} steps interleaved with the engine's")
    print(f"engine time: decode forwards {acc['decode_s']:.1f}s ({acc['decodes']} steps, "
          f"{acc['live_rows'] / acc['decodes']:.1f} live of {acc['rows'] / acc['decodes']:.1f} rows computed), "
          f"prefill {acc['prefill_s']:.1f}s ({acc['prefills']} groups), other {other_s:.1f}s "
          f"(scheduling, sampling, route capture)")
    print(f"  engine_vs_ceiling = occupancy {occupancy:.2f} (useful tokens / (decode steps x {SLOTS})) "
          f"x forward speed {fwd_speed:.2f} (ceiling step / our decode step) "
          f"x decode share {decode_share:.2f} (decode forwards / engine time)")
    print(f"engine_vs_ceiling={ours_frac:.2f}  (engine useful tok/s / ceiling tok/s, same run; goal >= 0.85)")


if __name__ == "__main__":
    main()
