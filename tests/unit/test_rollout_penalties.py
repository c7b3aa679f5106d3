"""The embedded engine's penalties and ``logit_bias`` against SGLang 0.5.23's rules, written out
here over a plain HF forward of the same tiny model (full context recomputed every token):

- counts are of *output* tokens only (the prompt never counts);
- ``l[v] -= frequency * count[v] + presence * (count[v] > 0)``; while fewer than
  ``min_new_tokens`` tokens are out, the stop tokens (stop_token_ids, the model's EOS) are -inf;
- then repetition on tokens already out: ``l * p`` where ``l < 0``, else ``l / p``;
- then ``+ logit_bias``; then temperature, top-k / top-p on top;
- the returned log-prob is ``log_softmax`` of those processed logits (``/ temperature``; greedy: 1).
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from moe_rl.models.tiny import save_tiny_hf
from moe_rl.rollout.config import EmbeddedEngineConfig
from moe_rl.rollout.embedded import engine as engine_mod
from moe_rl.rollout.embedded.engine import EmbeddedEngine
from moe_rl.rollout.types import FinishReason, RolloutRequest, SamplingParams

EOS = 2  # the tiny model's config EOS


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_hf("qwen3_moe", tmp_path_factory.mktemp("pen") / "m", seed=0)


@pytest.fixture(scope="module")
def hf(ckpt):
    return tf.AutoModelForCausalLM.from_pretrained(ckpt).eval()


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (L,), generator=g).tolist() for L in [6, 3, 9, 4][:n]]


def processed(hf, prompt: list[int], out: list[int], sp: SamplingParams, stops: set[int]) -> torch.Tensor:
    """SGLang's processed next-token logits after ``prompt + out``, one token at a time by hand."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + out])).logits[0, -1].float().clone()
    for t in set(out):
        logits[t] -= sp.frequency_penalty * out.count(t) + sp.presence_penalty
    if len(out) < sp.min_new_tokens:
        for t in stops | set(sp.stop_token_ids):
            logits[t] = float("-inf")
    for t in set(out):
        logits[t] = logits[t] * sp.repetition_penalty if logits[t] < 0 else logits[t] / sp.repetition_penalty
    for t, b in (sp.logit_bias or {}).items():
        logits[t] += b
    return logits


def greedy_reference(hf, prompt, sp: SamplingParams, stops=frozenset({EOS})) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs under SGLang's rules, ending on a stop token unless ignore_eos."""
    out, lps = [], []
    while len(out) < sp.max_new_tokens:
        logits = processed(hf, prompt, out, sp, set(stops))
        tok = int(logits.argmax())
        out.append(tok)
        lps.append(float(torch.log_softmax(logits, -1)[tok]))
        if not sp.ignore_eos and (tok in stops or tok in sp.stop_token_ids):
            break
    return out, lps


def _engine(ckpt, max_running=4):
    return EmbeddedEngine(EmbeddedEngineConfig(model_path=ckpt, max_running=max_running))


GREEDY_CASES = {
    "frequency": dict(frequency_penalty=1.5),
    "presence": dict(presence_penalty=2.0),
    "repetition": dict(repetition_penalty=2.0),
    "repetition_boost": dict(repetition_penalty=0.5),
    "negative_frequency": dict(frequency_penalty=-1.0),
    "all": dict(frequency_penalty=0.7, presence_penalty=0.4, repetition_penalty=1.6, logit_bias={7: 3.0, 300: -5.0}),
}


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_penalties_match_the_rules_by_hand(case, ckpt, hf):
    """Tokens and returned log-probs equal the hand-applied rules over a full HF forward, and
    differ from plain greedy (the option acts)."""
    prompts = _prompts(3, seed=11)
    eng = _engine(ckpt)
    sp = SamplingParams(max_new_tokens=14, temperature=0.0, ignore_eos=True, **GREEDY_CASES[case])
    plain = SamplingParams(max_new_tokens=14, temperature=0.0, ignore_eos=True)
    got = eng.generate([RolloutRequest(p, sp, group_id=i) for i, p in enumerate(prompts)])
    base = eng.generate([RolloutRequest(p, plain, group_id=i) for i, p in enumerate(prompts)])
    for p, s in zip(prompts, got):
        ref, ref_lp = greedy_reference(hf, p, sp)
        assert s.response_ids == ref, (case, p)
        torch.testing.assert_close(s.rollout_logprobs_T, torch.tensor(ref_lp), atol=1e-5, rtol=0)
    assert any(s.response_ids != b.response_ids for s, b in zip(got, base)), case


def test_prompt_tokens_do_not_count(ckpt, hf):
    """A prompt made of the plain greedy continuation's tokens: the first output token is still
    scored with no penalty (its log-prob equals the unpenalised one)."""
    p = _prompts(1, seed=12)[0]
    eng = _engine(ckpt)
    plain = eng.generate([RolloutRequest(p, SamplingParams(max_new_tokens=1, temperature=0.0))])[0]
    p2 = p + plain.response_ids * 3  # the greedy token, repeated in the prompt
    sp = SamplingParams(max_new_tokens=1, temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0,
                        repetition_penalty=2.0)
    a = eng.generate([RolloutRequest(p2, sp)])[0]
    b = eng.generate([RolloutRequest(p2, SamplingParams(max_new_tokens=1, temperature=0.0))])[0]
    assert a.response_ids == b.response_ids
    torch.testing.assert_close(a.rollout_logprobs_T, b.rollout_logprobs_T, atol=0, rtol=0)


def test_sampled_logprobs_come_from_penalised_logits_over_temperature(ckpt, hf):
    """Sampling: each token's log-prob is ``log_softmax(processed / T)`` at it, and top_k keeps
    the draw inside the top k of the *processed* logits."""
    temp, k = 0.7, 5
    prompts = _prompts(2, seed=13)
    sp = SamplingParams(max_new_tokens=10, temperature=temp, top_k=k, ignore_eos=True, n=2, sampling_seed=3,
                        frequency_penalty=1.2, repetition_penalty=1.5, logit_bias={11: 2.0})
    samples = _engine(ckpt).generate([RolloutRequest(p, sp, group_id=i) for i, p in enumerate(prompts)])
    for s in samples:
        out = s.response_ids
        for j, tok in enumerate(out):
            logits = processed(hf, s.prompt_ids, out[:j], sp, {EOS})
            lp = torch.log_softmax(logits / temp, -1)
            assert abs(float(lp[tok]) - float(s.rollout_logprobs_T[j])) < 1e-5
            assert tok in logits.topk(k).indices.tolist()


def test_min_new_tokens_holds_stop_tokens_back(ckpt, hf):
    """EOS made the argmax with logit_bias: greedy stops at once; with min_new_tokens=4 the
    first four tokens cannot be EOS (nor a stop_token_id), the fifth is EOS. Stop tokens are
    held back even with ignore_eos (SGLang masks them regardless)."""
    p = _prompts(1, seed=14)[0]
    eng = _engine(ckpt)
    bias = {EOS: 30.0}
    now = eng.generate([RolloutRequest(p, SamplingParams(max_new_tokens=10, temperature=0.0, logit_bias=bias))])[0]
    assert now.response_ids == [EOS] and now.finish_reason is FinishReason.STOP
    sp = SamplingParams(max_new_tokens=10, temperature=0.0, logit_bias=bias, min_new_tokens=4)
    s = eng.generate([RolloutRequest(p, sp)])[0]
    ref, ref_lp = greedy_reference(hf, p, sp)
    assert s.response_ids == ref and len(ref) == 5 and ref[-1] == EOS and EOS not in ref[:4]
    assert s.finish_reason is FinishReason.STOP
    torch.testing.assert_close(s.rollout_logprobs_T, torch.tensor(ref_lp), atol=1e-5, rtol=0)
    # a stop_token_id the model would pick first: held back for min_new_tokens tokens
    g = eng.generate([RolloutRequest(p, SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))])[0]
    sp = SamplingParams(max_new_tokens=6, temperature=0.0, stop_token_ids=[g.response_ids[0]], min_new_tokens=2)
    s = eng.generate([RolloutRequest(p, sp)])[0]
    ref, ref_lp = greedy_reference(hf, p, sp)
    assert s.response_ids == ref and s.response_ids[0] != g.response_ids[0]
    torch.testing.assert_close(s.rollout_logprobs_T, torch.tensor(ref_lp), atol=1e-5, rtol=0)
    sp = SamplingParams(max_new_tokens=6, temperature=0.0, logit_bias=bias, min_new_tokens=3, ignore_eos=True)
    s = eng.generate([RolloutRequest(p, sp)])[0]
    assert EOS not in s.response_ids[:3] and s.response_ids[3:] == [EOS] * 3


def test_mixed_batch_and_retraction(ckpt, hf):
    """One batch mixing plain, penalised and biased rows (3 slots, 4 requests, so slots are
    refilled), retracted mid-flight and resumed: every row equals its own reference, plain
    rows included, and the penalised rows' counts are rebuilt from their output."""
    prompts = _prompts(4, seed=15)
    sps = [SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True),
           SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, frequency_penalty=1.5,
                          presence_penalty=0.5),
           SamplingParams(max_new_tokens=9, temperature=0.0, ignore_eos=True, repetition_penalty=1.8,
                          logit_bias={5: 2.5}),
           SamplingParams(max_new_tokens=10, temperature=0.0, logit_bias={EOS: 30.0}, min_new_tokens=7)]
    eng = _engine(ckpt, max_running=3)
    futs = [f for p, sp in zip(prompts, sps) for f in eng.submit(p, sp)]
    for _ in range(5):
        eng.step()
    running = [s for s in eng._slots if s is not None]
    assert len(running) == 3 and all(len(s.out_ids) >= 2 for s in running)
    eng.pause("retract")
    assert all(s.penalties is None or s.penalties.counts_V is None for s in running)
    eng.resume()
    while not all(f.done() for f in futs):
        eng.step()
    for p, sp, f in zip(prompts, sps, futs):
        res = f.result()
        ref, ref_lp = greedy_reference(hf, p, sp)
        assert res.output_ids == ref, sp
        torch.testing.assert_close(torch.tensor(res.output_logprobs), torch.tensor(ref_lp), atol=1e-5, rtol=0)
    assert [f.result().num_retractions for f in futs] == [1, 1, 1, 0]
    assert futs[3].result().output_ids[-1] == EOS and len(futs[3].result().output_ids) == 8


def test_plain_requests_take_the_plain_path(ckpt, monkeypatch):
    """Without any of the options a sequence has no penalty state and the step never calls the
    penalty code."""
    def boom(*a, **kw):
        raise AssertionError("apply_penalties called for plain rows")

    monkeypatch.setattr(engine_mod, "apply_penalties", boom)
    eng = _engine(ckpt)
    sp = SamplingParams(max_new_tokens=4, temperature=0.8, frequency_penalty=0.0, repetition_penalty=1.0,
                        logit_bias={})
    assert sp.logit_bias is None and not sp.shapes_logits
    out = eng.generate([RolloutRequest(p, sp) for p in _prompts(2, seed=16)])
    assert all(len(s.response_ids) == 4 or s.finish_reason is FinishReason.STOP for s in out)


@pytest.mark.parametrize("kw, message", [
    (dict(frequency_penalty=3.0), "frequency_penalty must be in [-2, 2], got 3.0."),
    (dict(presence_penalty=-2.5), "presence_penalty must be in [-2, 2], got -2.5."),
    (dict(repetition_penalty=0.0), "repetition_penalty must be in (0, 2] (1.0 = no penalty), got 0.0."),
    (dict(repetition_penalty=2.5), "repetition_penalty must be in (0, 2] (1.0 = no penalty), got 2.5."),
    (dict(min_new_tokens=-1), "min_new_tokens must be in [0, max_new_tokens], got -1."),
    (dict(min_new_tokens=9, max_new_tokens=8), "min_new_tokens must be in [0, max_new_tokens(8)], got 9."),
    (dict(logit_bias={-1: 1.0}), "logit_bias key -1 must be a token id"),
    (dict(logit_bias={3: float("inf")}), "logit_bias[3] (inf) must be a finite number"),
])
def test_sampling_params_checks_are_sglangs(kw, message):
    """SGLang's ranges and messages (sampling_params.py verify)."""
    with pytest.raises(ValueError) as e:
        SamplingParams(**kw)
    assert message in str(e.value)


def test_logit_bias_outside_vocab_and_sglang_keys(ckpt):
    eng = _engine(ckpt)
    with pytest.raises(ValueError, match=r"logit_bias must has keys in \[0, 511\], got 512\."):
        eng.submit([5, 6], SamplingParams(logit_bias={512: 1.0}))
    sp = SamplingParams(frequency_penalty=0.5, presence_penalty=-0.5, repetition_penalty=1.2, min_new_tokens=3,
                        logit_bias={7: -1.5})
    out = sp.to_sglang()
    assert {k: out[k] for k in ("frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens",
                                "logit_bias")} == {"frequency_penalty": 0.5, "presence_penalty": -0.5,
                                                   "repetition_penalty": 1.2, "min_new_tokens": 3,
                                                   "logit_bias": {"7": -1.5}}
    plain = SamplingParams().to_sglang()
    assert not {"frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens",
                "logit_bias"} & set(plain)


@pytest.mark.parametrize("temp", [1e-40, 1e-7, 0.0])
def test_temperature_below_sglang_eps_is_greedy_at_temperature_one(temp, ckpt, hf):
    """SGLang's rule (``sampling_params.py``): ``0 <= temperature < 1e-6`` is greedy (temperature
    1, top-k 1), its log-prob ``log_softmax`` of the unscaled logits. Alone in a batch (the
    all-greedy path) and beside a sampled row (the mixed path), tokens and log-probs equal a
    plain HF greedy forward's; no division by the tiny temperature (1e-40: inf, then NaN)."""
    p = _prompts(1, seed=17)[0]
    sp = SamplingParams(max_new_tokens=6, temperature=temp, ignore_eos=True)
    ref, ref_lp = greedy_reference(hf, p, SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
    eng = _engine(ckpt)
    alone = eng.generate([RolloutRequest(p, sp)])[0]
    mixed = eng.generate([RolloutRequest(p, sp), RolloutRequest(p, SamplingParams(
        max_new_tokens=6, temperature=1.0, ignore_eos=True, sampling_seed=1), group_id=1)])[0]
    for s in (alone, mixed):
        assert s.response_ids == ref, temp
        torch.testing.assert_close(s.rollout_logprobs_T, torch.tensor(ref_lp), atol=1e-5, rtol=0)


def test_temperature_at_sglang_eps_is_sampled(ckpt, hf):
    """1e-6 itself is not below SGLang's eps: it samples at temperature 1e-6, the log-prob is
    ``log_softmax(logits / 1e-6)`` (about 0 for the all-but-certain top token)."""
    p = _prompts(1, seed=18)[0]
    s = _engine(ckpt).generate([RolloutRequest(p, SamplingParams(max_new_tokens=3, temperature=1e-6,
                                                                   ignore_eos=True, sampling_seed=2))])[0]
    for j, tok in enumerate(s.response_ids):
        with torch.no_grad():
            logits = hf(torch.tensor([p + s.response_ids[:j]])).logits[0, -1].double()
        assert tok == int(logits.argmax())
        expect = float(torch.log_softmax(logits / 1e-6, -1)[tok])
        assert abs(float(s.rollout_logprobs_T[j]) - expect) < 1e-5
        assert abs(float(s.rollout_logprobs_T[j]) - float(torch.log_softmax(logits, -1)[tok])) > 1e-3


def test_logit_bias_beyond_float32_is_refused_and_huge_ones_never_nan(ckpt):
    """A bias that is inf in fp32 (1e300) is refused, naming the token. A finite fp32 bias near
    the limit, over temperature 0.5, overflows fp32 (3e38 / 0.5): it is held at the largest
    float32, so the row never turns NaN. Expected, from the rule in exact (float64) arithmetic:
    ``(l + 3e38) / 0.5`` dwarfs every other logit, so every token is 7 with log-prob 0."""
    with pytest.raises(ValueError, match=r"logit_bias\[5\] \(1e\+300\) must be a finite number within float32"):
        SamplingParams(logit_bias={5: 1e300})
    with pytest.raises(ValueError, match=r"logit_bias\[5\]"):
        SamplingParams(logit_bias={5: -3.5e38})
    SamplingParams(logit_bias={5: -3.4e38})  # within float32's range
    p = _prompts(1, seed=19)[0]
    sp = SamplingParams(max_new_tokens=5, temperature=0.5, ignore_eos=True, n=2, sampling_seed=4,
                        logit_bias={7: 3e38, 9: -3e38})
    for s in _engine(ckpt).generate([RolloutRequest(p, sp)]):
        assert s.response_ids == [7] * 5
        assert s.rollout_logprobs_T.tolist() == [0.0] * 5


@pytest.mark.parametrize("seed", [-5, -(2 ** 63), 2 ** 63 - 1])
def test_sampling_seed_range_is_sglangs(seed, ckpt, hf):
    """SGLang's [-2**63, 2**63 - 1]: one past either end is refused; a negative seed is served
    reproducibly, its draws those of a torch generator seeded with ``seed mod 2**64`` (written
    out here: Gumbel-max over an HF forward's ``log_softmax``, one ``rand(V)`` per token)."""
    for bad in (-(2 ** 63) - 1, 2 ** 63):
        with pytest.raises(ValueError, match=r"sampling_seed must be in \[-2\*\*63, 2\*\*63 - 1\], got "
                                             + str(bad)):
            SamplingParams(sampling_seed=bad)
    p = _prompts(1, seed=20)[0]
    eng = _engine(ckpt)
    sp = SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True, sampling_seed=seed)
    a, b = (eng.generate([RolloutRequest(p, sp)])[0] for _ in range(2))
    assert a.response_ids == b.response_ids
    g = torch.Generator().manual_seed(seed & ((1 << 64) - 1))
    out: list[int] = []
    for _ in range(6):
        with torch.no_grad():
            lp = torch.log_softmax(hf(torch.tensor([p + out])).logits[0, -1].float(), -1)
        u = torch.rand(lp.shape[-1], generator=g).clamp(1e-20, 1.0 - 1e-7)
        out.append(int((lp - torch.log(-torch.log(u))).argmax()))
    assert a.response_ids == out
