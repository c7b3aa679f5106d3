"""The end-to-end probe after a sync: do the engines compute what the trainer computes?

A fixed batch of prompts (random token ids from a fixed seed, the same every sync) is sent
to every engine directly; each generates ``new_tokens`` greedy tokens and reports their
log-probs (temperature 1, as SGLang and the embedded engine score greedy tokens). The
trainer scores the same tokens with its own forward (the vocab-parallel log-prob head the
RL loss uses). ``weights/probe_logprob_diff`` is the mean |difference| over every engine,
prompt and token, ``weights/probe_logprob_max_diff`` the largest one.

Wrong weights (an expert sent to the wrong slot, a fused tensor split the wrong way, a stale
bucket) move log-probs by O(1); the same weights in another precision or kernel move them by
1e-5 (fp32) to ~1e-2 (bf16), hence the default threshold of 0.1 (``WeightSyncConfig``).

Engines behind HTTP are asked by rank 0; in-process engines (one per rank, ``sync`` mode on
one node) each answer for themselves, so a rank whose engine applied a bucket wrongly is named.

Parallel semantics: every rank calls :func:`probe`; rank 0 talks to the engines (or every rank
asks its own), every rank runs the forward, every rank returns the same metrics.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist

from moe_rl.rollout.client import RolloutClient
from moe_rl.weights import job
from moe_rl.weights.verify import SyncError

# B sequences (engines x prompts), S tokens, P prompt tokens, K generated tokens


def engine_outputs(client: RolloutClient, prompts: list[list[int]], new_tokens: int) -> list[list[tuple[list[int], list[float]]]]:
    """Per engine, per prompt: (greedy token ids, their log-probs)."""
    body = {"input_ids": prompts, "return_logprob": True,
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0.0, "ignore_eos": True}}
    out = []
    for url, items in zip([s.url for s in client.servers], client.probe_generate(body)):
        items = items if isinstance(items, list) else [items]
        if len(items) != len(prompts):
            raise SyncError(f"{url}: probe: {len(items)} answers for {len(prompts)} prompts")
        per = []
        for it in items:
            lps = it["meta_info"]["output_token_logprobs"]
            per.append(([int(x[1]) for x in lps], [float(x[0]) for x in lps]))
        out.append(per)
    return out


@torch.no_grad()
def trainer_logprobs(built, groups, tokens_BS: torch.Tensor) -> torch.Tensor:
    """log p(tokens[:, s+1] | tokens[:, :s+1]) for every s, [B, S] float32 (the last column
    is meaningless), on every rank."""
    from moe_rl.train.policy_head import emit_hidden_states, sequence_logprobs
    from moe_rl.train.schedule import forward_backward

    B, S = tokens_BS.shape
    d = groups.dims
    # the layout splits S over 2 x CP chunks and (sequence parallelism) TP; padding at the end changes nothing before it
    multiple = math.lcm(2 * d.cp if d.cp > 1 else 1, d.cp * d.tp)
    pad = (-S) % multiple
    tokens = torch.nn.functional.pad(tokens_BS, (0, pad))
    targets = torch.roll(tokens, -1, dims=1)
    dev = next(built.chunks[0].parameters()).device
    got: list[torch.Tensor] = []

    def score(hidden, mb):
        logp, _ = sequence_logprobs(hidden, built.head, mb["targets"], groups,
                                    vocab_size=built.hf_config.vocab_size, temperature=1.0)
        got.append(logp.float())
        return logp.sum() * 0.0, {}

    # the interleaved schedule (virtual pipeline) runs a multiple of PP micro-batches: the
    # batch repeated, the first copy kept
    mbs = [{"tokens": tokens.to(dev), "targets": targets.to(dev)}] * (d.pp if len(built.chunks) > 1 else 1)
    was_training = [c.training for c in built.chunks]
    for c in built.chunks:
        c.eval()
    try:
        with emit_hidden_states(built.head):
            forward_backward(built.chunks, mbs, score, groups, forward_only=True)
    finally:
        for c, mode in zip(built.chunks, was_training):
            c.train(mode)
    out = torch.zeros(B, S + pad, dtype=torch.float32, device=dev)
    if got and groups.tp_rank == 0 and groups.dp_rank == 0 and groups.cp_rank == 0:  # one copy: last stage, TP/DP/CP 0
        out.copy_(got[0])
    if dist.is_initialized():
        dist.all_reduce(out)
    return out[:, :S].cpu()


def local_outputs(engine, prompts: list[list[int]], new_tokens: int) -> list[tuple[list[int], list[float]]]:
    """Per prompt: (greedy token ids, their log-probs) from an in-process embedded engine."""
    from moe_rl.rollout.types import RolloutRequest, SamplingParams

    sp = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    got = engine.generate([RolloutRequest(p, sp, group_id=i) for i, p in enumerate(prompts)])
    return [(s.response_ids, s.rollout_logprobs_T.tolist()) for s in got]


def probe(client: RolloutClient | None, built, groups, *, prompts: int, prompt_len: int, new_tokens: int,
          seed: int, engine=None) -> dict[str, float]:
    """The probe's metrics (see the module docstring); ``client`` is used on rank 0 only;
    ``engine``: this rank's in-process engine instead (every rank's answers)."""
    vocab = built.hf_config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (prompts, prompt_len), generator=g).tolist()  # 0-2: pad/bos/eos
    answers, error = None, None
    if engine is not None:
        try:
            mine = local_outputs(engine, prompt_ids, new_tokens)
        except Exception as e:  # noqa: BLE001 - reported on every rank
            mine, error = None, f"probe: rank {job.rank()}'s engine: {e}"
        both = job.gather_objects((mine, error))
        answers, errors = [a for a, _ in both], [x for _, x in both if x]
        error = errors[0] if errors else None
        names = [f"rank {r}'s engine" for r in range(len(answers))]
    else:
        if job.rank() == 0:
            try:
                answers = engine_outputs(client, prompt_ids, new_tokens)
            except Exception as e:  # noqa: BLE001 - reported on every rank
                error = f"probe: {e}"
        answers, error = job.from_rank0((answers, error))
        names = [s.url for s in client.servers] if client is not None else [f"engine {e}" for e in range(len(answers or []))]
    if error:
        raise SyncError(error)
    rows, engine_lps, where = [], [], []
    for e, per in enumerate(answers):
        for p, (ids, lps) in enumerate(per):
            if len(ids) != new_tokens:
                raise SyncError(f"{names[e]}: probe prompt {p}: {len(ids)} tokens generated, {new_tokens} asked")
            rows.append(prompt_ids[p] + ids)
            engine_lps.append(lps)
            where.append(e)
    ours_BS = trainer_logprobs(built, groups, torch.tensor(rows, dtype=torch.long))
    ours_BK = ours_BS[:, prompt_len - 1:prompt_len - 1 + new_tokens]
    diff_BK = (ours_BK - torch.tensor(engine_lps, dtype=torch.float32)).abs()
    per_engine = [float(diff_BK[[i for i, w in enumerate(where) if w == e]].mean()) for e in range(len(answers))]
    return {"weights/probe_logprob_diff": float(diff_BK.mean()),
            "weights/probe_logprob_max_diff": float(diff_BK.max()),
            "per_engine": per_engine}


def probe_and_check(cfg, version: int, client: RolloutClient | None, built, groups, names: list[str],
                    engine=None) -> dict[str, float]:
    """Run the probe of ``cfg`` (``WeightSyncConfig``); its metrics (``weights/probe_*``), or a
    SyncError naming the worst engine of ``names`` when the mean |diff| is above the threshold."""
    t1 = time.perf_counter()
    found = probe(client, built, groups, prompts=cfg.probe_prompts, prompt_len=cfg.probe_prompt_len,
                  new_tokens=cfg.probe_new_tokens, seed=cfg.probe_seed, engine=engine)
    per_engine = found.pop("per_engine")
    found["weights/probe_s"] = time.perf_counter() - t1
    if found["weights/probe_logprob_diff"] > cfg.probe_max_logprob_diff:
        worst = max(range(len(per_engine)), key=per_engine.__getitem__)
        raise SyncError(
            f"weight version {version}: the engines' log-probs differ from the trainer's by "
            f"{found['weights/probe_logprob_diff']:.4g} on average (max {found['weights/probe_logprob_max_diff']:.4g}"
            f"; weights.probe_max_logprob_diff is {cfg.probe_max_logprob_diff:g}); worst engine "
            f"{names[worst]} ({per_engine[worst]:.4g})")
    return found
