"""Rollout throughput: the embedded engine vs ``transformers`` ``generate`` (not a test).

Workload: a random Qwen3-MoE (hidden 256, 4 layers, 8 experts top-2), 64 prompts of 64-256
tokens, 8 samples per prompt; every sample's response budget is drawn once, log-uniform on
[8, 256] (long-tailed: median ~45, a few near 256). EOS is ignored, so both sides produce
exactly the budgeted tokens; at most 32 sequences decode at once on both sides.

- theirs: ``generate`` on batches of 4 prompts x ``num_return_sequences=8`` (32 rows),
  ``max_new_tokens`` = the batch's largest budget, with the faster of the dynamic (default)
  and static caches (measured on the first batch); only budgeted tokens count as useful.
- ours: ``EmbeddedEngine`` with 32 slots: each group is prefilled once, finished slots are
  refilled at once.

Prints ``speedup=<ours/theirs useful tokens per s>``. ``--quick`` uses 16 prompts.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="16 prompts instead of 64")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import transformers as tf

    from moe_rl.models.tiny import randomize_, tiny_hf_config
    from moe_rl.rollout.config import EmbeddedEngineConfig
    from moe_rl.rollout.embedded.engine import EmbeddedEngine
    from moe_rl.rollout.types import SamplingParams

    n_prompts, n_samples, slots = (16 if a.quick else 64), 8, 32
    cfg = tiny_hf_config("qwen3_moe", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, moe_intermediate_size=256, intermediate_size=512,
                         num_experts=8, num_experts_per_tok=2, max_position_embeddings=1024)
    torch.manual_seed(a.seed)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    randomize_(model, a.seed)

    g = torch.Generator().manual_seed(a.seed)
    prompts = [torch.randint(3, 512, (int(torch.randint(64, 257, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n_prompts)]
    u = torch.rand(n_prompts, n_samples, generator=g)
    budgets = torch.exp(math.log(8) + u * (math.log(256) - math.log(8))).round().long().clamp(8, 256).tolist()
    useful = sum(sum(b) for b in budgets)
    print(f"prompts={n_prompts} samples/prompt={n_samples} useful_tokens={useful} "
          f"mean_budget={useful / (n_prompts * n_samples):.1f} threads={torch.get_num_threads()}", flush=True)

    # ---- theirs
    gen_cfg = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=n_samples,
                   eos_token_id=None, pad_token_id=0)
    per_batch = slots // n_samples

    def hf_batch(i, cache_impl, cap=None):
        ps, bs = prompts[i:i + per_batch], budgets[i:i + per_batch]
        L = max(len(p) for p in ps)
        ids = torch.tensor([[0] * (L - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in ps])
        m = min(max(max(b) for b in bs), cap or 1 << 30)
        kw = {"cache_implementation": "static"} if cache_impl == "static" else {}
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=m, **gen_cfg, **kw)
        assert out.shape == (len(ps) * n_samples, L + m), out.shape

    hf_batch(0, "dynamic", cap=4)  # warm-up
    t0 = time.perf_counter(); hf_batch(0, "dynamic", cap=48); t_dyn = time.perf_counter() - t0
    t0 = time.perf_counter(); hf_batch(0, "static", cap=48); t_static = time.perf_counter() - t0
    cache_impl = "static" if t_static < t_dyn else "dynamic"
    print(f"theirs cache probe (48 tokens): dynamic {t_dyn:.2f}s static {t_static:.2f}s -> {cache_impl}", flush=True)
    t0 = time.perf_counter()
    for i in range(0, n_prompts, per_batch):
        hf_batch(i, cache_impl)
    t_theirs = time.perf_counter() - t0

    # ---- ours
    eng = EmbeddedEngine(EmbeddedEngineConfig(max_running=slots, max_context_len=1024, capture_routed_experts=True),
                         model=model)
    t0 = time.perf_counter()
    futs = [f for p, bs in zip(prompts, budgets)
            for f in eng.submit(p, [SamplingParams(max_new_tokens=b, temperature=1.0, ignore_eos=True) for b in bs])]
    while not all(f.done() for f in futs):
        eng.step()
    t_ours = time.perf_counter() - t0
    got = sum(len(f.result().output_ids) for f in futs)
    assert got == useful, (got, useful)

    theirs_tps, ours_tps = useful / t_theirs, useful / t_ours
    print(f"theirs: {t_theirs:.1f}s {theirs_tps:.0f} useful tok/s ({cache_impl} cache)")
    print(f"ours:   {t_ours:.1f}s {ours_tps:.0f} useful tok/s (routed experts captured)")
    print(f"speedup={ours_tps / theirs_tps:.2f}")


if __name__ == "__main__":
    main()
