"""``/generate`` with SGLang 0.5.23's penalties and ``logit_bias``, against its rules written out
here over a plain HF forward of the same tiny model (full context recomputed every token):
output-token counts only; ``l -= frequency * count + presence * (count > 0)``; stop tokens -inf
while fewer than ``min_new_tokens`` are out; repetition (``l * p`` if ``l < 0`` else ``l / p``)
on tokens already out; ``+ logit_bias``; greedy log-probs ``log_softmax`` of that.

Validation replies are SGLang's literal messages (``sampling_params.py`` ``verify`` and
``raise_if_tokenizer_required``), 400 ``{"error": {"message"}}``; wrong JSON types are the API
contract's 400 ``{"error": "<text>"}``.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
import transformers as tf
from moe_rl.rollout.config import EmbeddedEngineConfig
from moe_rl.rollout.embedded.engine import EmbeddedEngine
from moe_rl.rollout.embedded.http_context import ServerOptions
from moe_rl.rollout.embedded.tokenizer import load_tokenizer

from embedded_servers import InProcessServer, post_generate as gen, tiny_model_with_tokenizer

CONTEXT = 64
EOS = 2  # the tiny model's and its tokenizer's EOS
PROMPT = [5, 9, 33, 100, 7, 41]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("pen") / "m")


@pytest.fixture(scope="module")
def hf(model_dir):
    return tf.AutoModelForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def tok(model_dir):
    return tf.AutoTokenizer.from_pretrained(model_dir, clean_up_tokenization_spaces=False)


def _serve(path: str, tokenizer):
    engine = EmbeddedEngine(EmbeddedEngineConfig(model_path=path, max_running=4, max_context_len=CONTEXT),
                            tokenizer=tokenizer)
    engine.start()
    return InProcessServer(engine, ServerOptions(model_path=path), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = _serve(model_dir, load_tokenizer(model_dir))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def bare_server(model_dir, tmp_path_factory):
    """The same model without a tokenizer (SGLang: --skip-tokenizer-init)."""
    path = str(tmp_path_factory.mktemp("bare") / "m")
    shutil.copytree(model_dir, path, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    assert load_tokenizer(path) is None and os.path.exists(os.path.join(path, "config.json"))
    srv = _serve(path, None)
    yield srv
    srv.close()


def reference(hf, prompt: list[int], sp: dict) -> tuple[list[int], list[float]]:
    """Greedy tokens and log-probs under SGLang's rules (module docstring), by hand."""
    freq, pres = sp.get("frequency_penalty", 0.0), sp.get("presence_penalty", 0.0)
    rep, min_new = sp.get("repetition_penalty", 1.0), sp.get("min_new_tokens", 0)
    bias = {int(k): v for k, v in (sp.get("logit_bias") or {}).items()}
    stops = {EOS, *sp.get("stop_token_ids", [])}
    out: list[int] = []
    lps: list[float] = []
    while len(out) < sp["max_new_tokens"]:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float().clone()
        for t in set(out):
            logits[t] -= freq * out.count(t) + pres
        if len(out) < min_new:
            logits[list(stops)] = float("-inf")
        for t in set(out):
            logits[t] = logits[t] * rep if logits[t] < 0 else logits[t] / rep
        for t, b in bias.items():
            logits[t] += b
        t = int(logits.argmax())
        out.append(t)
        lps.append(float(torch.log_softmax(logits, -1)[t]))
        if not sp.get("ignore_eos") and t in stops:
            break
    return out, lps


PENALISED = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True, "frequency_penalty": 1.5,
             "presence_penalty": 0.3, "repetition_penalty": 1.4, "logit_bias": {"7": 2.0, "0300": -1.0}}


def test_penalties_tokens_and_logprobs(server, hf):
    """Tokens and ``output_token_logprobs`` equal the hand-applied rules; ``"0300"`` is token 300."""
    r = gen(server, {"input_ids": PROMPT, "sampling_params": PENALISED, "return_logprob": True})
    ref, ref_lp = reference(hf, PROMPT, {**PENALISED, "logit_bias": {"7": 2.0, "300": -1.0}})
    assert r["output_ids"] == ref
    lp = r["meta_info"]["output_token_logprobs"]
    assert [x[1] for x in lp] == ref
    torch.testing.assert_close(torch.tensor([x[0] for x in lp]), torch.tensor(ref_lp), atol=1e-5, rtol=0)
    plain = gen(server, {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 12,
                                                                  "ignore_eos": True}})
    assert plain["output_ids"] != ref  # the options act


def test_min_new_tokens_masks_stop_tokens_not_stop_strings(server, hf, tok):
    """EOS biased to the argmax: stops at once; ``min_new_tokens: 3`` holds it back three tokens
    (finish ``matched`` EOS, four tokens). A stop string still ends the sample before
    ``min_new_tokens`` (SGLang only masks stop *tokens*)."""
    sp = {"temperature": 0, "max_new_tokens": 10, "logit_bias": {"2": 30}}
    now = gen(server, {"input_ids": PROMPT, "sampling_params": sp})
    assert now["output_ids"] == [EOS] and now["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    r = gen(server, {"input_ids": PROMPT, "sampling_params": {**sp, "min_new_tokens": 3}, "return_logprob": True})
    ref, ref_lp = reference(hf, PROMPT, {**sp, "min_new_tokens": 3})
    assert r["output_ids"] == ref and len(ref) == 4 and ref[-1] == EOS
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert r["meta_info"]["completion_tokens"] == 4
    torch.testing.assert_close(torch.tensor([x[0] for x in r["meta_info"]["output_token_logprobs"]]),
                               torch.tensor(ref_lp), atol=1e-5, rtol=0)
    # a stop string from the plain greedy text, matched before min_new_tokens
    plain = gen(server, {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 10,
                                                                  "ignore_eos": True}})["output_ids"]
    k = next(i for i, t in enumerate(plain) if tok.decode([t]).strip().isalnum())
    stop = tok.decode([plain[k]]).strip()
    end = next(j for j in range(1, len(plain) + 1) if stop in tok.decode(plain[:j]))
    r = gen(server, {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 10,
                                                              "min_new_tokens": 10, "stop": stop}})
    assert r["output_ids"] == plain[:end] and end < 10
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_min_new_tokens_is_lowered_to_the_capped_budget(server):
    """``max_new_tokens: null`` leaves min_new_tokens unbounded at the door; the scheduler caps
    the budget at ``context - prompt - 2`` and lowers min_new_tokens to it: the sample runs to
    the cap with EOS (biased to the argmax) never drawn."""
    r = gen(server, {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": None,
                                                              "min_new_tokens": 1000, "logit_bias": {"2": 30}}})
    cap = CONTEXT - len(PROMPT) - 2
    assert len(r["output_ids"]) == cap and EOS not in r["output_ids"]
    assert r["meta_info"]["finish_reason"] == {"type": "length", "length": cap}


def test_mixed_batch(server, hf):
    """A batch of a plain, a penalised and a biased prompt: each item equals its own request
    and the reference."""
    prompts = [PROMPT, [8, 8, 200, 17], [300, 4, 61]]
    plain = {"temperature": 0, "max_new_tokens": 9, "ignore_eos": True}
    sps = [plain, {**PENALISED, "max_new_tokens": 9},
           {**plain, "repetition_penalty": 0.6, "logit_bias": {"11": 1.5}}]
    items = gen(server, {"input_ids": prompts, "sampling_params": sps, "return_logprob": True})
    for p, sp, item in zip(prompts, sps, items):
        ref, ref_lp = reference(hf, p, sp)
        assert item["output_ids"] == ref, sp
        torch.testing.assert_close(torch.tensor([x[0] for x in item["meta_info"]["output_token_logprobs"]]),
                                   torch.tensor(ref_lp), atol=1e-5, rtol=0)
        alone = gen(server, {"input_ids": p, "sampling_params": sp})
        assert alone["output_ids"] == item["output_ids"]


VALIDATION = [
    ({"frequency_penalty": 3}, "frequency_penalty must be in [-2, 2], got 3."),
    ({"presence_penalty": -2.5}, "presence_penalty must be in [-2, 2], got -2.5."),
    ({"repetition_penalty": 0}, "repetition_penalty must be in (0, 2] (1.0 = no penalty), got 0."),
    ({"repetition_penalty": 2.5}, "repetition_penalty must be in (0, 2] (1.0 = no penalty), got 2.5."),
    ({"min_new_tokens": -1}, "min_new_tokens must be in [0, max_new_tokens], got -1."),
    ({"min_new_tokens": 200}, "min_new_tokens must be in [0, max_new_tokens(128)], got 200."),
    ({"min_new_tokens": 5, "max_new_tokens": 4}, "min_new_tokens must be in [0, max_new_tokens(4)], got 5."),
    ({"logit_bias": {"512": 1}}, "logit_bias must has keys in [0, 511], got 512."),
    ({"logit_bias": {"-1": 1}}, "logit_bias must has keys in [0, 511], got -1."),
    ({"logit_bias": {"abc": 1}}, "invalid literal for int() with base 10: 'abc'"),
]


@pytest.mark.parametrize("sp, message", VALIDATION)
def test_validation_messages_are_sglangs(server, sp, message):
    r = gen(server, {"input_ids": PROMPT, "sampling_params": sp}, 400)
    assert r["error"]["message"] == message


@pytest.mark.parametrize("sp, field", [({"frequency_penalty": "x"}, "frequency_penalty"),
                                       ({"min_new_tokens": 1.5}, "min_new_tokens"),
                                       ({"logit_bias": [1]}, "logit_bias"),
                                       ({"logit_bias": {"5": "x"}}, "logit_bias")])
def test_wrong_types_are_contract_errors(server, sp, field):
    r = gen(server, {"input_ids": PROMPT, "sampling_params": sp}, 400)
    assert isinstance(r["error"], str) and "invalid type" in r["error"] and field in r["error"]


def test_without_a_tokenizer_min_new_tokens_is_refused(bare_server, hf):
    """SGLang with --skip-tokenizer-init refuses min_new_tokens (no eos_token_id); the other
    penalties still run."""
    r = gen(bare_server, {"input_ids": PROMPT, "sampling_params": {"min_new_tokens": 1}}, 400)
    assert r["error"]["message"] == ("min_new_tokens=1 is unavailable when skip_tokenizer_init=True "
                                     "(requires tokenizer for eos_token_id).")
    r = gen(bare_server, {"input_ids": PROMPT, "sampling_params": PENALISED})
    assert r["output_ids"] == reference(hf, PROMPT, {**PENALISED, "logit_bias": {"7": 2.0, "300": -1.0}})[0]
