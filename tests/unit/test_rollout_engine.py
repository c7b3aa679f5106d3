"""Embedded engine vs independent references: HF ``generate`` (greedy tokens), a full HF
forward (log-probs), and the routers' own logits from that forward (routed experts)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from moe_rl.models.tiny import TINY_FAMILIES, save_tiny_hf
from moe_rl.rollout.config import EmbeddedEngineConfig
from moe_rl.rollout.embedded.engine import EmbeddedEngine
from moe_rl.rollout.types import FinishReason, RolloutRequest, SamplingParams

MOE = ["qwen3_moe", "mixtral", "deepseek_v3"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny_hf(f, root / f, seed=0) for f in TINY_FAMILIES}


@pytest.fixture(scope="module")
def hf_models(ckpts):
    return {f: tf.AutoModelForCausalLM.from_pretrained(d).eval() for f, d in ckpts.items()}


def _prompts(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    lens = [5, 11, 3, 17, 8, 2, 6][:n]
    return [torch.randint(3, 512, (L,), generator=g).tolist() for L in lens]


def _engine(path, max_running=3):
    return EmbeddedEngine(EmbeddedEngineConfig(model_path=path, max_running=max_running))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_greedy_matches_hf_generate(family, ckpts, hf_models):
    # 5 prompts through 3 slots: slots are refilled mid-flight and rows run at different lengths
    prompts = _prompts()
    budgets = [12, 4, 16, 7, 10]
    eng = _engine(ckpts[family])
    reqs = [RolloutRequest(p, SamplingParams(max_new_tokens=b, temperature=0.0, ignore_eos=True), group_id=i)
            for i, (p, b) in enumerate(zip(prompts, budgets))]
    samples = eng.generate(reqs)
    hf = hf_models[family]
    for p, b, s in zip(prompts, budgets, samples):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=b, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
        assert s.response_ids == ref, (family, p)
        assert s.finish_reason is FinishReason.LENGTH and len(s.response_ids) == b


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_logprobs_and_routes_match_full_forward(family, ckpts, hf_models):
    temp = 0.7
    prompts = _prompts(4, seed=2)
    eng = _engine(ckpts[family], max_running=4)
    reqs = [RolloutRequest(p, SamplingParams(max_new_tokens=9, temperature=temp, top_k=50, top_p=0.9,
                                             ignore_eos=True, n=2), group_id=i) for i, p in enumerate(prompts)]
    samples = eng.generate(reqs)
    assert [(s.group_id, s.sample_index) for s in samples] == [(g, j) for g in range(4) for j in range(2)]
    hf = hf_models[family]
    cfg = hf.config
    for s in samples:
        P = len(s.prompt_ids)
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        with torch.no_grad():
            out = hf(ids, output_router_logits=family in MOE)
        # the trainer's scoring: log_softmax(logits / T) in fp32 at the sampled tokens
        lp_NV = torch.log_softmax(out.logits[0].float() / temp, dim=-1)
        ref_T = lp_NV[P - 1:-1].gather(-1, torch.tensor(s.response_ids)[:, None])[:, 0]
        torch.testing.assert_close(s.rollout_logprobs_T, ref_T, atol=1e-5, rtol=0)
        if family not in MOE:
            assert s.routed_experts_NLK is None
            continue
        N = P + len(s.response_ids) - 1  # every position but the last, prompt included
        ref_routes = []
        for logits_NE, layer in zip(out.router_logits, _moe_layers(hf)):
            rows_NE = logits_NE[:N].float()
            ref_routes.append(_reference_topk(family, rows_NE, layer, cfg))
        ref_NLK = torch.stack(ref_routes, dim=1)
        assert s.routed_experts_NLK.shape == ref_NLK.shape == (N, len(ref_routes), cfg.num_experts_per_tok)
        assert torch.equal(s.routed_experts_NLK.sort(-1).values.long(), ref_NLK.sort(-1).values)


def _moe_layers(hf):
    return [layer.mlp for layer in hf.model.layers if hasattr(layer.mlp, "experts")]


def _reference_topk(family, logits_TE, moe_block, cfg):
    """Top-k written from the papers' routing rules, from the raw router logits."""
    K = cfg.num_experts_per_tok
    if family in ("qwen3_moe", "mixtral"):  # softmax top-k (renormalisation does not change the set)
        return logits_TE.softmax(-1).topk(K, dim=-1).indices
    # DeepSeek-V3: sigmoid scores + correction bias; keep the topk_group best groups (by their
    # top-2 sum), then top-k experts inside them.
    scores = logits_TE.sigmoid() + moe_block.gate.e_score_correction_bias.float()
    T, E = scores.shape
    grp = scores.view(T, cfg.n_group, E // cfg.n_group)
    grp_score = grp.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(grp_score).scatter(1, grp_score.topk(cfg.topk_group, dim=-1).indices, 1.0)
    masked = scores.masked_fill(~keep.bool().repeat_interleave(E // cfg.n_group, dim=1), float("-inf"))
    return masked.topk(K, dim=-1).indices


def test_stops_seeds_and_shared_prefill(ckpts):
    eng = _engine(ckpts["qwen3_moe"], max_running=3)
    p = _prompts(1, seed=3)[0]
    greedy = eng.generate([RolloutRequest(p, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))])[0]
    stop_tok = greedy.response_ids[3]
    first = greedy.response_ids.index(stop_tok)
    s = eng.generate([RolloutRequest(p, SamplingParams(max_new_tokens=8, temperature=0.0,
                                                       stop_token_ids=[stop_tok]))])[0]
    assert s.finish_reason is FinishReason.STOP and s.response_ids == greedy.response_ids[:first + 1]
    # top_k=1 is greedy whatever the temperature
    s = eng.generate([RolloutRequest(p, SamplingParams(max_new_tokens=8, temperature=1.3, top_k=1,
                                                       ignore_eos=True))])[0]
    assert s.response_ids == greedy.response_ids
    # a seeded request gives the same tokens alone or batched with others
    sp = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True, sampling_seed=7)
    alone = eng.generate([RolloutRequest(p, sp)])[0].response_ids
    mixed = eng.generate([RolloutRequest(q, SamplingParams(max_new_tokens=5, ignore_eos=True))
                          for q in _prompts(3, seed=4)] + [RolloutRequest(p, sp)])[-1].response_ids
    assert alone == mixed
    # n samples of a group share one prefill but are drawn independently
    many = eng.generate([RolloutRequest(p, SamplingParams(max_new_tokens=6, temperature=1.0, n=5,
                                                          ignore_eos=True))])
    assert len({tuple(m.response_ids) for m in many}) > 1
    zero = eng.generate([RolloutRequest(p, SamplingParams(max_new_tokens=0))])[0]
    assert zero.response_ids == [] and zero.finish_reason is FinishReason.LENGTH
    # a prompt that fills the context is refused by name (it crashed inside the KV cache)
    with pytest.raises(ValueError, match=rf"a prompt of {eng.context_len} tokens leaves no room for a response in "
                                         rf"the engine's context of {eng.context_len} tokens"):
        eng.generate([RolloutRequest([5] * eng.context_len, SamplingParams(max_new_tokens=1))])
    assert eng.generate([RolloutRequest(p, SamplingParams(max_new_tokens=2, ignore_eos=True))])[0].response_ids


def test_transformers_contract_is_checked_at_start(ckpts, monkeypatch):
    """The engine relies on transformers calling ``cache.update(key, value, layer_idx, ...)`` and
    attending to what it returns, on 4-D masks used as given, and on ``cache=`` /
    ``past_key_values=``. A transformers that breaks one of these must stop the engine at
    start with a message naming it, not fail (or hang) on the first request."""
    from moe_rl.rollout.embedded import kv_cache
    from moe_rl.rollout.embedded.hf_contract import EngineContractError, cache_kwarg

    model = tf.AutoModelForCausalLM.from_pretrained(ckpts["qwen3_moe"]).eval()
    assert cache_kwarg(model) in ("cache", "past_key_values")

    class NoCache(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids

    with pytest.raises(EngineContractError, match="neither `cache` nor `past_key_values`"):
        cache_kwarg(NoCache())

    original = kv_cache.SlotKVCache.update

    def attends_to_new_token_only(self, k, v, layer_idx, *args, **kwargs):
        original(self, k, v, layer_idx, *args, **kwargs)
        return k, v  # what a cache that is ignored (or returns the wrong thing) amounts to

    monkeypatch.setattr(kv_cache.SlotKVCache, "update", attends_to_new_token_only)
    with pytest.raises(EngineContractError, match=r"transformers .*(decode logits through the engine's KV cache"
                                                  r"|probe forward .* failed)"):
        EmbeddedEngine(EmbeddedEngineConfig(model_path=ckpts["qwen3_moe"]))

    monkeypatch.setattr(kv_cache.SlotKVCache, "update", original)
    layer = model.model.layers[0].self_attn
    forward = type(layer).forward
    monkeypatch.setattr(type(layer), "forward", lambda self, *a, **kw: forward(self, *a, **{
        k: v for k, v in kw.items() if k not in ("cache", "past_key_values")}))
    with pytest.raises(EngineContractError, match="called cache.update 0 times"):
        EmbeddedEngine(EmbeddedEngineConfig(model_path=ckpts["qwen3_moe"]), model=model)


def test_seeded_group_draws_distinct_samples(ckpts):
    eng = _engine(ckpts["qwen3_moe"], max_running=4)
    p = _prompts(1, seed=5)[0]
    sp = dict(max_new_tokens=8, temperature=1.0, ignore_eos=True, sampling_seed=123)
    group = eng.generate([RolloutRequest(p, SamplingParams(**sp, n=4))])
    alone = eng.generate([RolloutRequest(p, SamplingParams(**sp))])[0]
    assert len({tuple(s.response_ids) for s in group}) == 4
    assert group[0].response_ids == alone.response_ids


def test_tail_compaction_moves_rows_and_keeps_tokens_exact(ckpts, hf_models, monkeypatch):
    """When low slots finish with nothing waiting, the highest busy rows move down (one KV copy
    each): the moved sequences' greedy tokens and log-probs stay exactly HF's."""
    from moe_rl.rollout.embedded import kv_cache

    moves = []
    original = kv_cache.SlotKVCache.move
    monkeypatch.setattr(kv_cache.SlotKVCache, "move",
                        lambda self, src, dst, n: (moves.append((src, dst, n)), original(self, src, dst, n)))
    prompts = _prompts(4, seed=6)
    budgets = [3, 5, 2, 14]  # slots 0-2 finish first; the sequence in slot 3 moves down
    eng = _engine(ckpts["llama"], max_running=4)
    samples = eng.generate([RolloutRequest(p, SamplingParams(max_new_tokens=b, temperature=0.0, ignore_eos=True))
                            for p, b in zip(prompts, budgets)])
    assert moves and moves[0][0] == 3 and moves[0][1] < 3
    hf = hf_models["llama"]
    for p, b, s in zip(prompts, budgets, samples):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=b, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
            lp = torch.log_softmax(hf(torch.tensor([p + ref])).logits[0].float(), -1)[len(p) - 1:-1]
        assert s.response_ids == ref
        torch.testing.assert_close(s.rollout_logprobs_T, lp.gather(-1, torch.tensor(ref)[:, None])[:, 0],
                                   atol=1e-5, rtol=0)


def test_eos_ids_of_generation_config_also_stop(ckpts, tmp_path):
    """SGLang stops on the config's EOS ids and on generation_config.json's (model_config.py
    _get_hf_eos_token_id). A checkpoint whose generation_config.json adds the token the
    model greedily emits first stops there; without that file the same request runs on."""
    import shutil

    src = tmp_path / "ck"
    shutil.copytree(ckpts["qwen3_moe"], src)
    (src / "generation_config.json").unlink(missing_ok=True)
    p = _prompts(1)[0]
    free = _engine(str(src)).generate([RolloutRequest(p, SamplingParams(max_new_tokens=6, temperature=0.0))])[0]
    first = free.response_ids[0]
    assert len(free.response_ids) == 6 and first != 2  # the tiny model's config EOS is 2
    tf.GenerationConfig(eos_token_id=[2, first]).save_pretrained(str(src))
    stopped = _engine(str(src)).generate([RolloutRequest(p, SamplingParams(max_new_tokens=6, temperature=0.0))])[0]
    assert stopped.response_ids == [first] and stopped.finish_reason == FinishReason.STOP


def _tokenizer_with_eos(path: str, eos_id: int):
    """The tiny models' tokenizer saved in ``path`` with ``eos_id`` as its EOS token (the
    model's config keeps EOS 2), loaded back as a run loads it for its in-process engine
    (``launch.py``: ``engine_tokenizer``; None before the tokenizer is saved)."""
    from moe_rl.config.run import RunConfig
    from moe_rl.data.tokenizer import build_tokenizer
    from moe_rl.rollout.in_process import engine_tokenizer

    assert engine_tokenizer(RunConfig(), path) is None
    tok = build_tokenizer(512)
    tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    tok.save_pretrained(path)
    loaded = engine_tokenizer(RunConfig(), path)
    assert loaded.eos_token_id == eos_id
    return loaded


def test_tokenizer_eos_also_stops(ckpts, tmp_path):
    """SGLang's scheduler also stops on the tokenizer's EOS (``_check_token_based_finish``:
    ``token_id == tokenizer.eos_token_id``). A checkpoint whose tokenizer names a token the model
    greedily emits as its EOS (config EOS stays 2) stops there when the engine has the
    tokenizer, runs on without it; ``ignore_eos`` turns it off."""
    import shutil

    src = tmp_path / "ck"
    shutil.copytree(ckpts["qwen3_moe"], src)
    p = _prompts(1, seed=7)[0]
    req = RolloutRequest(p, SamplingParams(max_new_tokens=8, temperature=0.0))
    free = _engine(str(src)).generate([req])[0].response_ids
    k = next(i for i, t in enumerate(free) if t > 3)  # a plain token (not pad/bos/eos/<|im_start|>)
    tok = _tokenizer_with_eos(str(src), free[k])
    eng = EmbeddedEngine(EmbeddedEngineConfig(model_path=str(src), max_running=2), tokenizer=tok)
    assert eng.hf_config.eos_token_id == 2 and free[k] in eng.eos_ids
    stopped = eng.generate([req])[0]
    assert stopped.response_ids == free[: free.index(free[k]) + 1] and stopped.finish_reason is FinishReason.STOP
    ignored = eng.generate([RolloutRequest(p, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))])[0]
    assert ignored.response_ids == free and ignored.finish_reason is FinishReason.LENGTH


def test_tokenizer_stop_ids_are_sglangs():
    """EOS plus the added-vocabulary tokens SGLang's ``attach_additional_stop_token_ids`` lists
    ("<|eom_id|>", "<|content_model_end_sampling|>", "<|ifm|im_end|>"); other added tokens are not."""
    from moe_rl.data.tokenizer import build_tokenizer
    from moe_rl.rollout.embedded.tokenizer import tokenizer_stop_ids

    tok = build_tokenizer(512)
    assert tokenizer_stop_ids(tok) == {2} and tokenizer_stop_ids(None) == set()
    tok.add_tokens(["<|eom_id|>", "<|im_end|>", "<|ifm|im_end|>"], special_tokens=True)
    ids = tok.convert_tokens_to_ids(["<|eom_id|>", "<|im_end|>", "<|ifm|im_end|>"])
    assert tokenizer_stop_ids(tok) == {2, ids[0], ids[2]}


def test_retracted_sequences_recompute_and_continue_exactly(ckpts, hf_models):
    """``pause("retract")`` (SGLang's retract mode) frees every running sequence's slot and puts
    it back to wait; admitted again it re-prefills prompt + output and decodes on. Greedy tokens,
    log-probs and routed experts then equal an uninterrupted run's and a full HF forward's."""
    family = "qwen3_moe"
    prompts = _prompts(3, seed=8)
    budgets = [9, 5, 12]
    eng = _engine(ckpts[family], max_running=2)  # 3 prompts, 2 slots: one waits unstarted
    sps = [SamplingParams(max_new_tokens=b, temperature=0.0, ignore_eos=True) for b in budgets]
    futs = [f for p, sp in zip(prompts, sps) for f in eng.submit(p, sp)]
    for _ in range(3):
        eng.step()
    assert eng.num_running == 2
    eng.pause("retract")
    assert eng.num_running == 0 and eng.num_waiting == 3 and eng.paused
    eng.cache.release()  # nothing holds KV now: it can go (SGLang: flush / release succeed)
    eng.step()
    assert not any(f.done() for f in futs)  # paused: nothing moves
    eng.resume()
    while not all(f.done() for f in futs):
        eng.step()
    hf = hf_models[family]
    for p, b, f in zip(prompts, budgets, futs):
        res = f.result()
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=b, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
            out = hf(torch.tensor([p + ref]), output_router_logits=True)
        assert res.output_ids == ref
        lp = torch.log_softmax(out.logits[0].float(), -1)[len(p) - 1:-1].gather(-1, torch.tensor(ref)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(res.output_logprobs), lp, atol=1e-5, rtol=0)
        N = len(p) + b - 1
        ref_NLK = torch.stack([rl[:N].softmax(-1).topk(hf.config.num_experts_per_tok, -1).indices
                               for rl in out.router_logits], 1)
        assert torch.equal(res.routes_NLK.long().sort(-1).values, ref_NLK.sort(-1).values)
    assert [f.result().num_retractions for f in futs] == [1, 1, 0]  # the third was never running


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_prompt_and_top_logprobs_match_full_forward(family, ckpts, hf_models):
    """A group submitted with a ``LogprobSpec`` reports SGLang's prompt log-probs (raw logits,
    no temperature; positions start..P-1, the first None) and, per output token, the top-k and
    chosen-id log-probs of the sampled row (``log_softmax(logits / T)``), against a full HF
    forward with ``log_softmax`` written out; a retraction keeps them; tokens are reported to
    ``on_token`` in order, and a callback that raises is dropped without stopping the engine."""
    from moe_rl.rollout.embedded.logprobs import LogprobSpec

    temp, k, asked, start = 0.8, 3, (4, 99), 2
    prompts = _prompts(3, seed=5)
    eng = _engine(ckpts[family], max_running=2)
    spec = LogprobSpec(input_start=start, top_k=k, token_ids=asked)
    seen: dict[int, list[int]] = {}

    def record(g):
        return lambda ev: seen.setdefault(g, []).append(ev.token)

    def boom(ev):
        raise RuntimeError("consumer bug")

    sp = SamplingParams(max_new_tokens=6, temperature=temp, ignore_eos=True, sampling_seed=11)
    futs = [eng.submit(p, sp, logprobs=spec, on_token=record(g) if g != 1 else boom)[0] for g, p in enumerate(prompts)]
    for _ in range(2):
        eng.step()
    eng.pause("retract")  # re-prefill after it must not touch the group's prompt log-probs
    eng.resume()
    while not all(f.done() for f in futs):
        eng.step()
    hf = hf_models[family]
    for g, (p, f) in enumerate(zip(prompts, futs)):
        res = f.result()
        with torch.no_grad():
            logits = hf(torch.tensor([p + res.output_ids])).logits[0].float()
        m = logits.max(-1, keepdim=True).values
        raw = logits - m - (logits - m).exp().sum(-1, keepdim=True).log()
        hot = torch.log_softmax(logits / temp, -1)
        P = len(p)
        want_in = [raw[j - 1, p[j]].item() for j in range(start + 1, P)]
        assert res.input_logprobs.token_logprobs[0] is None and len(res.input_logprobs.token_logprobs) == P - start
        assert res.input_logprobs.token_logprobs[1:] == pytest.approx(want_in, abs=2e-5)
        for j, (vals, ids) in zip(range(start + 1, P), res.input_logprobs.top[1:]):
            v, i = raw[j - 1].topk(k)
            assert ids == i.tolist() and vals == pytest.approx(v.tolist(), abs=2e-5)
        assert res.input_logprobs.token_ids[0] is None
        for j, row in zip(range(start + 1, P), res.input_logprobs.token_ids[1:]):
            assert row == pytest.approx(raw[j - 1, list(asked)].tolist(), abs=2e-5)
        rows = hot[P - 1:-1]
        assert res.output_logprobs == pytest.approx(rows.gather(-1, torch.tensor(res.output_ids)[:, None])[:, 0]
                                                    .tolist(), abs=2e-5)
        for row, (vals, ids), chosen in zip(rows, res.output_top, res.output_token_ids_logprobs):
            v, i = row.topk(k)
            assert ids == i.tolist() and vals == pytest.approx(v.tolist(), abs=2e-5)
            assert chosen == pytest.approx(row[list(asked)].tolist(), abs=2e-5)
        if g != 1:
            assert seen[g] == res.output_ids
    assert 1 not in seen and eng.error is None
    assert [f.result().num_retractions for f in futs] == [1, 1, 0]
