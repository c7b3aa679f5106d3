"""The embedded server's text side against SGLang 0.5.23's behaviour, written out here.

One in-process server over the tiny qwen3_moe model with a byte-level BPE tokenizer that adds
BOS (``<s>``) when it encodes text, and a context length of 64. Two kinds of output:
- the real model's greedy tokens, for text prompts, a stop string found in real output, and
  the budget rules;
- scripted tokens: a wrapper on the model's forward puts all mass on a chosen token at each
  output position, so adversarial outputs (special tokens, a character split over two byte
  tokens, a stop string spelled in more tokens than its own encoding) are produced on demand.

Expected values are SGLang's rules applied with a tokenizer loaded here, or literal strings:
- text: the stop token dropped unless ``no_stop_trim``; the ids decoded behind the prompt's
  last 5 tokens with ``skip_special_tokens`` (default true), the prompt part cut off; a
  matched stop string cut off (kept with ``no_stop_trim``) at its first occurrence
  (detokenizer_manager.py ``trim_matched_stop``);
- stop strings: checked after every token in the decoded tail (special tokens shown), before
  stop tokens; ``matched`` is the first listed one found; every token stays in output_ids
  (schedule_batch.py ``_check_str_based_finish``);
- logprob texts: each id decoded alone (tokenizer_manager.py ``detokenize_logprob_tokens``);
- budgets: absent 128, null unlimited, capped at ``context - prompt - 2``; an explicit budget
  over the context and a prompt of ``context - 6`` tokens or more are 400s;
- ``weight_versions``: contiguous ``{version, start, end}`` spans over the output.

The protocol details SGLang's ``io_struct.py``, ``tokenizer_manager.py``, ``scheduler.py`` and
``http_server.py`` decide are written out as literals (its messages, shapes and status codes):
log-prob fields it ignores or refuses, features it refuses when not enabled, duplicate request
ids, ``return_prompt_token_ids``, pause modes against ``/flush_cache`` and weight updates, the
model identity after ``/update_weights_from_disk``, ``/v1/models``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import httpx
import pytest
from moe_rl.rollout.config import EmbeddedEngineConfig
from moe_rl.rollout.embedded.engine import EmbeddedEngine
from moe_rl.rollout.embedded.http_context import ServerOptions
from moe_rl.rollout.embedded.tokenizer import load_tokenizer

from embedded_servers import InProcessServer, post_generate as gen

CONTEXT = 64
EOS, BOS, IM_START = 2, 1, 3  # the tiny model's eos; the tokenizer's special ids
PROMPT = [5, 6, 7, 8, 9, 10]  # scripted requests use this prompt length
GREEDY = {"temperature": 0}


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE tokens are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = dict(zip(printable, map(chr, printable))), 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_CHAR = _byte_chars()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model with a tokenizer saved beside it; encoding adds BOS (like Llama's)."""
    from tokenizers import processors

    from moe_rl.data.tokenizer import build_tokenizer
    from moe_rl.models.tiny import save_tiny_hf

    path = save_tiny_hf("qwen3_moe", tmp_path_factory.mktemp("tok") / "m", seed=0)
    tok = build_tokenizer(512)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(model_dir):
    """The reference tokenizer, loaded here as SGLang loads it (no clean-up of spaces)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir, clean_up_tokenization_spaces=False)


class Script:
    """Wraps the model's forward: while ``tokens`` is set, the logits at output position ``j``
    of a ``len(PROMPT)``-token prompt put all mass on ``tokens[j]``; ``delay_s`` slows every
    forward (to act while a request runs)."""

    def __init__(self, engine: EmbeddedEngine) -> None:
        self.tokens: list[int] | None = None
        self.delay_s = 0.0
        forward = engine.model.forward

        def scripted(*a, **kw):
            if self.delay_s:
                time.sleep(self.delay_s)
            out = forward(*a, **kw)
            if self.tokens is not None:
                for b, pos in enumerate(kw["position_ids"][:, -1].tolist()):
                    j = pos - (len(PROMPT) - 1)
                    if 0 <= j < len(self.tokens):
                        out.logits[b, -1] = -1e4
                        out.logits[b, -1, self.tokens[j]] = 1e4
            return out

        engine.model.forward = scripted

    @contextlib.contextmanager
    def run(self, tokens: list[int]):
        self.tokens = tokens
        try:
            yield
        finally:
            self.tokens = None


@pytest.fixture(scope="module")
def server(model_dir):
    engine = EmbeddedEngine(EmbeddedEngineConfig(model_path=model_dir, max_running=4, max_context_len=CONTEXT))
    engine.start()
    script = Script(engine)
    options = ServerOptions(model_path=model_dir, weight_roots=[os.path.dirname(model_dir)])
    srv = InProcessServer(engine, options, tokenizer=load_tokenizer(model_dir))
    srv.script = script
    yield srv
    srv.close()


def sglang_text(tok, prompt, out, finish, *, skip=True, no_stop_trim=False) -> str:
    """SGLang's response text (module docstring), written out."""
    matched = finish.get("matched")
    ids = out[:-1] if isinstance(matched, int) and not no_stop_trim else out
    surr = prompt[-5:]
    text = tok.decode(surr + ids, skip_special_tokens=skip)[len(tok.decode(surr, skip_special_tokens=skip)):]
    if isinstance(matched, str) and matched in text:
        pos = text.find(matched)
        text = text[: pos + len(matched)] if no_stop_trim else text[:pos]
    return text


def first_stop(tok, out, stops, window=None):
    """(tokens kept, matched) of the first token after which the decoded tail (all output, or
    SGLang's last ``window`` tokens) holds a stop string; None if never."""
    for k in range(1, len(out) + 1):
        tail = tok.decode(out[max(0, k - window) if window else 0:k])
        hit = next((s for s in stops if s in tail), None)
        if hit is not None:
            return k, hit
    return None


def sglang_window(tok, stops) -> int:
    return max(len(tok.encode(s, add_special_tokens=False)) for s in stops) + 1


# ----------------------------------------------------------------------------- real model
def test_text_prompts_get_the_tokenizers_special_tokens(server, tok):
    """SGLang tokenizes ``text`` with ``tokenizer(text)``: BOS added here."""
    ids = tok("hello world")["input_ids"]
    assert ids[0] == BOS and ids[1:] == tok("hello world", add_special_tokens=False)["input_ids"]
    sp = {**GREEDY, "max_new_tokens": 8, "ignore_eos": True}
    by_text = gen(server, {"text": "hello world", "sampling_params": sp})
    by_ids = gen(server, {"input_ids": ids, "sampling_params": sp})
    assert by_text["meta_info"]["prompt_tokens"] == len(ids)
    assert by_text["output_ids"] == by_ids["output_ids"] and by_text["text"] == by_ids["text"]
    assert by_text["text"] == sglang_text(tok, ids, by_ids["output_ids"], by_ids["meta_info"]["finish_reason"])
    batch = gen(server, {"text": ["a b", "hello"], "sampling_params": sp})
    assert [b["meta_info"]["prompt_tokens"] for b in batch] == [len(tok(t)["input_ids"]) for t in ("a b", "hello")]


def test_stop_string_in_real_output(server, tok):
    prompt = [40, 41, 42, 43]
    sp = {**GREEDY, "max_new_tokens": 40, "ignore_eos": True}
    out = gen(server, {"input_ids": prompt, "sampling_params": sp})["output_ids"]
    # a two-character stop string across a token boundary, from the middle of the output
    pieces = [tok.decode([t]) for t in out]
    k = next(i for i in range(10, len(out) - 1)
             if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i][-1] + pieces[i + 1][0])
    stop = pieces[k][-1] + pieces[k + 1][0]
    want = first_stop(tok, out, [stop])
    assert want == first_stop(tok, out, [stop], sglang_window(tok, [stop]))  # SGLang finds it at that token too
    r = gen(server, {"input_ids": prompt, "sampling_params": {**sp, "stop": stop}})
    assert r["output_ids"] == out[: want[0]] and r["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert r["text"] == sglang_text(tok, prompt, out[: want[0]], {"matched": stop})
    assert stop not in r["text"] and r["text"] + stop in tok.decode(out)
    kept = gen(server, {"input_ids": prompt, "sampling_params": {**sp, "stop": [stop], "no_stop_trim": True}})
    assert kept["text"] == r["text"] + stop


def test_max_new_tokens_null_and_context_caps(server):
    """SGLang: null = no limit; every budget capped at context - prompt - 2 (max_req_len =
    context - 1); absent = 128; an explicit budget over the context and a prompt of
    context - 6 tokens or more are refused."""
    p = [11, 12, 13, 14, 15]
    none = gen(server, {"input_ids": p, "sampling_params": {"max_new_tokens": None, "ignore_eos": True}})
    assert len(none["output_ids"]) == CONTEXT - len(p) - 2 == 57
    assert none["meta_info"]["finish_reason"] == {"type": "length", "length": 57}
    absent = gen(server, {"input_ids": p, "sampling_params": {"ignore_eos": True}})  # 128, capped silently
    assert len(absent["output_ids"]) == 57
    exact = gen(server, {"input_ids": p, "sampling_params": {"max_new_tokens": CONTEXT - len(p), "ignore_eos": True}})
    assert len(exact["output_ids"]) == 57
    small = gen(server, {"input_ids": p, "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}})
    assert len(small["output_ids"]) == 3
    r = gen(server, {"input_ids": p, "sampling_params": {"max_new_tokens": CONTEXT - len(p) + 1}}, 400)
    assert "exceeds the context length" in r["error"]["message"]
    longest = list(range(5, 5 + CONTEXT - 7))  # 57 tokens: the longest prompt the scheduler takes
    r = gen(server, {"input_ids": longest, "sampling_params": {"max_new_tokens": None, "ignore_eos": True}})
    assert len(r["output_ids"]) == CONTEXT - len(longest) - 2 == 5
    r = gen(server, {"input_ids": longest + [5], "sampling_params": {"max_new_tokens": 0}}, 400)
    assert "maximum allowed length (58 tokens" in r["error"]["message"]
    r = gen(server, {"input_ids": list(range(5, 5 + CONTEXT)), "sampling_params": {"max_new_tokens": None}}, 400)
    assert "longer than the model's context length" in r["error"]["message"]
    # /server_info reports the scheduler's limits as SGLang does (prompts shorter than
    # max_req_input_len = context - 1 - 5; KV capacity: 4 slots of one context each)
    info = httpx.get(server.url + "/server_info", timeout=10).json()
    assert info["max_req_input_len"] == len(longest) + 1 == CONTEXT - 6
    assert info["max_total_num_tokens"] == 4 * CONTEXT and info["context_length"] == CONTEXT
    assert info["skip_tokenizer_init"] is False and info["page_size"] == 1


# ----------------------------------------------------------------------------- scripted output
@pytest.fixture(scope="module")
def script_ids(tok):
    """Token ids of the scripted output, by name, and the whole script.

    ``merged`` is a vocabulary token " Xy" (its own encoding is that one token); later the same
    text is spelled one byte token at a time. "é" is two byte tokens (0xC3, 0xA9)."""
    vocab = tok.get_vocab()
    merged = sorted(k for k in vocab if k.startswith("Ġ") and len(k) == 3 and k[1:].isalpha())[0]
    ids = {c: vocab[BYTE_CHAR[ord(c)]] for c in "abcdxyz!qwvu "}
    ids["merged"], ids["e1"], ids["e2"] = vocab[merged], vocab[BYTE_CHAR[0xC3]], vocab[BYTE_CHAR[0xA9]]
    m_text = tok.decode([ids["merged"]])
    assert tok.encode(m_text, add_special_tokens=False) == [ids["merged"]]
    assert tok.encode("é", add_special_tokens=False) == [ids["e1"], ids["e2"]]
    spelled = [vocab[BYTE_CHAR[ord(c)]] for c in m_text]
    seq = ([ids["a"], ids["b"], ids["merged"], ids["c"], ids["d"]] + spelled
           + [ids["x"], ids["y"], ids["z"], IM_START, ids["!"], ids["e1"], ids["e2"], ids["q"], EOS,
              ids["w"], ids["v"], ids["u"]])
    return {"ids": ids, "m": m_text, "seq": seq}


def _run(server, seq, sp, prompt=PROMPT, **body):
    with server.script.run(seq):
        return gen(server, {"input_ids": prompt, "sampling_params": {**GREEDY, "max_new_tokens": len(seq), **sp},
                            **body})


def test_special_tokens_and_stop_token_trim(server, tok, script_ids):
    seq, m = script_ids["seq"], script_ids["m"]
    i_eos = seq.index(EOS)
    whole = _run(server, seq, {"ignore_eos": True})
    assert whole["output_ids"] == seq and whole["text"] == f"ab{m}cd{m}xyz!éqwvu"
    shown = _run(server, seq, {"ignore_eos": True, "skip_special_tokens": False})
    assert shown["text"] == f"ab{m}cd{m}xyz<|im_start|>!éq</s>wvu"
    nospace = _run(server, seq, {"ignore_eos": True, "skip_special_tokens": False,
                                 "spaces_between_special_tokens": False})
    assert nospace["text"] == tok.decode(seq, skip_special_tokens=False, spaces_between_special_tokens=False)
    # EOS finishes; it stays in output_ids and leaves the text (even when special tokens are shown)
    eos = _run(server, seq, {})
    assert eos["output_ids"] == seq[: i_eos + 1]
    assert eos["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    assert eos["text"] == f"ab{m}cd{m}xyz!éq"
    assert _run(server, seq, {"skip_special_tokens": False})["text"] == f"ab{m}cd{m}xyz<|im_start|>!éq"
    assert _run(server, seq, {"skip_special_tokens": False, "no_stop_trim": True})["text"] == \
        f"ab{m}cd{m}xyz<|im_start|>!éq</s>"
    # a stop_token_ids token is trimmed the same way
    st = _run(server, seq, {"stop_token_ids": [IM_START], "skip_special_tokens": False})
    assert st["meta_info"]["finish_reason"] == {"type": "stop", "matched": IM_START}
    assert st["output_ids"] == seq[: seq.index(IM_START) + 1] and st["text"] == f"ab{m}cd{m}xyz"
    assert _run(server, seq, {"stop_token_ids": [IM_START], "skip_special_tokens": False, "no_stop_trim": True})[
        "text"] == f"ab{m}cd{m}xyz<|im_start|>"
    # ignore_eos turns every token-based finish off, stop_token_ids included (SGLang); stop strings stay
    ign = _run(server, seq, {"ignore_eos": True, "stop_token_ids": [IM_START]})
    assert ign["output_ids"] == seq and ign["meta_info"]["finish_reason"] == {"type": "length", "length": len(seq)}
    ign_str = _run(server, seq, {"ignore_eos": True, "stop": ["xyz"]})
    assert ign_str["meta_info"]["finish_reason"] == {"type": "stop", "matched": "xyz"}
    for r, skip, nst in [(whole, True, False), (shown, False, False), (eos, True, False), (st, False, False)]:
        assert r["text"] == sglang_text(tok, PROMPT, r["output_ids"], r["meta_info"]["finish_reason"], skip=skip,
                                        no_stop_trim=nst)


def test_character_split_between_prompt_and_output(server, tok, script_ids):
    """SGLang decodes behind the prompt's last 5 tokens and cuts the prompt's text off: a
    character whose first byte ends the prompt is left out of the text."""
    ids = script_ids["ids"]
    prompt = PROMPT[:-1] + [ids["e1"]]
    r = _run(server, [ids["e2"], ids["q"], ids["w"]], {"ignore_eos": True}, prompt=prompt)
    assert r["text"] == "qw" and tok.decode(r["output_ids"]) == "\ufffdqw"


def test_logprob_entries_carry_token_text(server, tok, script_ids):
    seq = script_ids["seq"]
    r = _run(server, seq, {"ignore_eos": True}, return_logprob=True, return_text_in_logprobs=True)
    entries = r["meta_info"]["output_token_logprobs"]
    assert [e[1] for e in entries] == seq
    assert [e[2] for e in entries] == [tok.decode([t]) for t in seq]
    assert entries[seq.index(IM_START)][2] == "<|im_start|>" and entries[seq.index(EOS)][2] == "</s>"
    assert entries[seq.index(script_ids["ids"]["e1"])][2] == "\ufffd"
    plain = _run(server, seq, {"ignore_eos": True}, return_logprob=True)
    assert all(e[2] is None for e in plain["meta_info"]["output_token_logprobs"])


# (stop, extra sampling params, the token that completes it (kept through), matched, text);
# "{m}" is the merged token's text (" Xy"), "{m2}" its first two characters (" X").
STOP_CASES = [
    ("b{m2}", {}, "merged", "b{m2}", "a"),  # across a token boundary
    ("{m}x", {}, "x", "{m}x", "ab{m}cd"),  # spelled in more tokens than SGLang's window
    (["xyz", "yz"], {}, "z", "xyz", "ab{m}cd{m}"),  # both complete at "z": the first listed wins
    (["yz", "xyz"], {}, "z", "yz", "ab{m}cd{m}x"),
    ("{m2}", {"no_stop_trim": True}, "merged", "{m2}", "ab{m2}"),  # ends inside a token: the rest is cut
    ("{m2}", {}, "merged", "{m2}", "ab"),
    ("im_start", {}, IM_START, "im_start", "ab{m}cd{m}xyz"),  # special token's text: not in the text
    ("im_start", {"skip_special_tokens": False}, IM_START, "im_start", "ab{m}cd{m}xyz<|"),
    ("é", {}, "e2", "é", "ab{m}cd{m}xyz!"),  # one character, two byte tokens
    ("q</s>", {}, EOS, "q</s>", "ab{m}cd{m}xyz!éq"),  # a stop string beats EOS at the same token
    ("a", {}, "a", "a", ""),  # the first token
]
NOT_IN_SGLANG_WINDOW = 1  # STOP_CASES[1]: the one deliberate difference (stop_strings.py)


@pytest.mark.parametrize("case", range(len(STOP_CASES)))
def test_stop_strings_on_scripted_output(server, tok, script_ids, case):
    stop, extra, through, matched, text = STOP_CASES[case]
    seq, m = script_ids["seq"], script_ids["m"]
    fill = lambda x: x.format(m=m, m2=m[:2])  # noqa: E731
    stops = [fill(stop)] if isinstance(stop, str) else stop
    matched, text = fill(matched), fill(text)
    k = seq.index(through if isinstance(through, int) else script_ids["ids"][through]) + 1
    assert first_stop(tok, seq, stops) == (k, matched)  # the rule, on this script
    r = _run(server, seq, {"stop": stops[0] if isinstance(stop, str) else stops, **extra})
    assert r["meta_info"]["finish_reason"] == {"type": "stop", "matched": matched}, r
    assert r["output_ids"] == seq[:k] and r["meta_info"]["completion_tokens"] == k
    assert r["text"] == text
    assert r["text"] == sglang_text(tok, PROMPT, seq[:k], {"matched": matched},
                                    skip=extra.get("skip_special_tokens", True),
                                    no_stop_trim=extra.get("no_stop_trim", False))
    sglang = first_stop(tok, seq, stops, sglang_window(tok, stops))
    assert sglang == (None if case == NOT_IN_SGLANG_WINDOW else (k, matched))


def test_stop_strings_per_prompt_and_per_sample(server, tok, script_ids):
    seq, m = script_ids["seq"], script_ids["m"]
    with server.script.run(seq):
        two = gen(server, {"input_ids": [PROMPT, PROMPT], "sampling_params": [
            {**GREEDY, "max_new_tokens": len(seq), "stop": "xyz"},
            {**GREEDY, "max_new_tokens": len(seq), "stop": ["never", "cd"], "no_stop_trim": True}]})
        n2 = gen(server, {"input_ids": PROMPT, "sampling_params": {
            **GREEDY, "max_new_tokens": len(seq), "stop": "xyz", "n": 2}})
    assert [x["text"] for x in two] == [f"ab{m}cd{m}", f"ab{m}cd"]
    assert [x["meta_info"]["finish_reason"]["matched"] for x in two] == ["xyz", "cd"]
    assert [x["text"] for x in n2] == [f"ab{m}cd{m}"] * 2
    never = _run(server, seq, {"stop": ["zzz", "ba"], "ignore_eos": True})
    assert never["meta_info"]["finish_reason"] == {"type": "length", "length": len(seq)}
    assert never["text"] == f"ab{m}cd{m}xyz!éqwvu"
    most = _run(server, seq, {"stop": [f"s{i}" for i in range(31)] + ["cd"]})  # SGLang's limit: 32
    assert most["meta_info"]["finish_reason"]["matched"] == "cd"


@pytest.mark.parametrize("stop,status,where,msg", [
    ("", 400, ("error", "message"), "stop[0] is the empty string"),
    (["ok", ""], 400, ("error", "message"), "stop[1] is the empty string"),
    ([f"s{i}" for i in range(33)], 400, ("error", "message"), "at most 32 stop strings"),
    ([1], 400, ("error",), "sampling_params.stop must be a string or a list of strings"),
    ({"a": 1}, 400, ("error",), "sampling_params.stop must be a string or a list of strings"),
])
def test_bad_stop_values(server, stop, status, where, msg):
    r = gen(server, {"input_ids": PROMPT, "sampling_params": {"stop": stop}}, status)
    for key in where:
        r = r[key]
    assert msg in r, r


# ----------------------------------------------------------------------------- weight_versions
def test_weight_versions_spans(server, script_ids):
    v0 = httpx.get(server.url + "/model_info", timeout=10).json()["weight_version"]
    one = gen(server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}})
    assert one["meta_info"]["weight_versions"] == [{"version": v0, "start": 0, "end": 4}]
    zero = gen(server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 0}})
    assert zero["meta_info"]["weight_versions"] == [{"version": v0, "start": 0, "end": 0}]
    # the version changes while the request decodes: two spans, the newer one last
    out: list = []
    server.script.delay_s = 0.05
    try:
        t = threading.Thread(target=lambda: out.append(gen(server, {"input_ids": PROMPT, "sampling_params": {
            "max_new_tokens": 40, "ignore_eos": True}})))
        t.start()
        time.sleep(0.6)
        r = httpx.post(server.url + "/update_weight_version", json={"new_version": "v-next",
                                                                    "abort_all_requests": False}, timeout=30)
        assert r.status_code == 200, r.text
        t.join(timeout=60)
    finally:
        server.script.delay_s = 0.0
    meta = out[0]["meta_info"]
    spans = meta["weight_versions"]
    assert [s["version"] for s in spans] == [v0, "v-next"] and meta["weight_version"] == "v-next"
    assert spans[0]["start"] == 0 and 0 < spans[0]["end"] == spans[1]["start"] < spans[1]["end"] == 40
    assert sum(s["end"] - s["start"] for s in spans) == meta["completion_tokens"]


def test_word_level_tokenizer_without_unknown_token(tmp_path):
    """The toy tasks' character tokenizer cannot spell arbitrary text (no unknown token): the
    server still starts, a text it cannot spell is a 400 naming it, and stop strings work."""
    from moe_rl.data.tokenizer import build_char_tokenizer, char_vocab_size
    from moe_rl.models.tiny import save_tiny_hf

    alphabet = "0123456789,"
    d = tmp_path / "char"
    save_tiny_hf("qwen3_moe", d, seed=1, vocab_size=char_vocab_size(alphabet))
    tok = build_char_tokenizer(alphabet)
    tok.save_pretrained(str(d))
    engine = EmbeddedEngine(EmbeddedEngineConfig(model_path=str(d), max_running=2, max_context_len=CONTEXT))
    engine.start()
    srv = InProcessServer(engine, tokenizer=load_tokenizer(str(d)))  # builds the server context: no warm-up failure
    try:
        bad = gen(srv, {"text": "12x4", "sampling_params": GREEDY}, status=400)
        assert "text ('12x4') cannot be tokenized" in bad["error"]["message"]
        sp = {**GREEDY, "max_new_tokens": 12, "ignore_eos": True}
        free = gen(srv, {"text": "3,1,4", "sampling_params": sp})
        assert free["meta_info"]["prompt_tokens"] == len(tok("3,1,4")["input_ids"])
        out = free["output_ids"]
        want = first_stop(tok, out, [tok.decode(out[1:3])])  # a stop string the model spells at tokens 2-3
        got = gen(srv, {"text": "3,1,4", "sampling_params": {**sp, "stop": [tok.decode(out[1:3]), "xyz"]}})
        assert got["output_ids"] == out[: want[0]] and got["meta_info"]["finish_reason"] == \
            {"type": "stop", "matched": want[1]}
    finally:
        srv.close()


# ----------------------------------------------------------------------------- SGLang's request rules
def test_logprob_fields_sglang_ignores_and_those_refused(server):
    """scheduler.py: ``logprob_start_len`` is ignored without ``return_logprob``, and -1 (the
    default) means the prompt's length: output log-probs only; past the prompt it is a 400.
    tokenizer_manager.py: top log-probs only with ``return_logprob``. io_struct.py: a list-valued
    logprob field with ``n > 1`` is a 400. (Prompt, top and chosen-id log-probs themselves:
    test_sglang_logprobs_stream.py.)"""
    p = [11, 12, 13, 14, 15]
    sp = {**GREEDY, "max_new_tokens": 4, "ignore_eos": True}
    plain = gen(server, {"input_ids": p, "sampling_params": sp})
    want = gen(server, {"input_ids": p, "sampling_params": sp, "return_logprob": True})["meta_info"]
    for extra in ({"logprob_start_len": 0}, {"top_logprobs_num": 3}, {"token_ids_logprob": [5, 6]},
                  {"logprob_start_len": 0, "top_logprobs_num": 5, "return_logprob": False}):
        r = gen(server, {"input_ids": p, "sampling_params": sp, **extra})
        assert r["output_ids"] == plain["output_ids"] and "output_token_logprobs" not in r["meta_info"], extra
    for extra in ({"logprob_start_len": -1}, {"logprob_start_len": len(p)}, {"top_logprobs_num": 0},
                  {"logprob_start_len": None}, {"token_ids_logprob": []}, {"top_logprobs_num": -3}):
        meta = gen(server, {"input_ids": p, "sampling_params": sp, "return_logprob": True, **extra})["meta_info"]
        assert meta == {**want, "id": meta["id"], "e2e_latency": meta["e2e_latency"]}, extra
        assert meta["input_token_logprobs"] == [] and meta["output_token_logprobs_length"] == 4
    # a batch takes one value per prompt; only a prompt that asks for log-probs has its fields read
    two = gen(server, {"input_ids": [p, p], "sampling_params": sp, "return_logprob": True,
                       "logprob_start_len": [-1, len(p)], "top_logprobs_num": [0, 0]})
    for x in two:  # batched rows: the same tokens, log-probs up to float rounding
        got = x["meta_info"]["output_token_logprobs"]
        assert [e[1] for e in got] == [e[1] for e in want["output_token_logprobs"]]
        assert [e[0] for e in got] == pytest.approx([e[0] for e in want["output_token_logprobs"]], abs=1e-5)
    two = gen(server, {"input_ids": [p, p[:3]], "sampling_params": sp, "return_logprob": [False, True],
                       "logprob_start_len": [0, 3], "top_logprobs_num": [4, 0]})
    assert "output_token_logprobs" not in two[0]["meta_info"]
    assert two[1]["meta_info"]["output_token_logprobs_length"] == 4
    refused = [
        ({"logprob_start_len": -2}, "logprob_start_len=-2 must be -1 (output log-probs only) or a prompt position"),
        ({"logprob_start_len": len(p) + 1}, "req.logprob_start_len=6 is higher than the number of input tokens "
                                            "len(req.origin_input_ids)=5. Please use a smaller logprob_start_len."),
    ]
    for extra, msg in refused:
        r = gen(server, {"input_ids": p, "sampling_params": sp, "return_logprob": True, **extra}, 400)
        assert msg in r["error"]["message"], (extra, r)
    # what SGLang adds for the fields, in its key order (values: test_sglang_logprobs_stream.py)
    meta = gen(server, {"input_ids": p, "sampling_params": sp, "return_logprob": True, "logprob_start_len": 2,
                        "top_logprobs_num": 2, "token_ids_logprob": [5, 6]})["meta_info"]
    assert list(meta)[list(meta).index("input_token_logprobs"):] == [
        "input_token_logprobs", "output_token_logprobs", "output_token_logprobs_length", "input_top_logprobs",
        "output_top_logprobs", "input_token_ids_logprobs", "output_token_ids_logprobs"]
    assert [e[1] for e in meta["input_token_logprobs"]] == p[2:] and meta["input_token_logprobs"][0][0] is None
    n2 = {**sp, "n": 2}
    for key, value in (("return_logprob", [True]), ("logprob_start_len", [-1]), ("top_logprobs_num", [0])):
        r = gen(server, {"input_ids": p, "sampling_params": n2, key: value}, 400)
        assert r["error"]["message"] == f"Cannot use list {key} with parallel_sample_num > 1"
    assert len(gen(server, {"input_ids": p, "sampling_params": n2, "return_logprob": True,
                            "logprob_start_len": -1})) == 2
    r = gen(server, {"input_ids": p, "token_ids_logprob": [7, 512]}, 400)  # checked with or without return_logprob
    assert r["error"]["message"] == ("token_ids_logprob contains out-of-vocabulary token id 512; valid range is "
                                     "[0, 512).")
    r = gen(server, {"input_ids": p, "sampling_params": n2, "token_ids_logprob": [[5]]}, 400)
    assert r["error"]["message"] == "Cannot use list token_ids_logprob with parallel_sample_num > 1"
    r = gen(server, {"input_ids": p, "logprob_start_len": "0"}, 400)  # pydantic: not an integer
    assert r["object"] == "error" and "logprob_start_len" in r["message"]


SGLANG_REFUSES = [  # tokenizer_manager.py, on a server launched without the feature
    ({"lora_path": "adapter-1"}, "LoRA adapter 'adapter-1' was requested, but LoRA is not enabled. Please launch "
                                 "the server with --enable-lora flag"),
    ({"input_ids": [PROMPT, PROMPT], "lora_path": ""}, "LoRA adapter 'None' was requested"),  # a batch repeats it
    ({"lora_path": [None, "a2"], "input_ids": [PROMPT, PROMPT]}, "LoRA adapter 'a2' was requested"),
    ({"custom_logit_processor": "{\"callable\": \"x\"}"}, "The server is not configured to enable custom logit "
                                                          "processor. Please set `--enable-custom-logit-processor`"),
    ({"return_hidden_states": True}, "The server is not configured to return hidden states."),
    ({"return_hidden_states": "last"}, "The server is not configured to return hidden states."),
    ({"max_thinking_tokens": 16}, "max_thinking_tokens requires the server to be launched with "
                                  "--enable-strict-thinking"),
    ({"routed_dp_rank": 1}, "routed_dp_rank=1 out of range [0, 1)"),
    ({"data_parallel_rank": -1}, "routed_dp_rank=-1 out of range [0, 1)"),  # the deprecated alias
]
SGLANG_ACCEPTS = [{"lora_path": None}, {"lora_path": ""}, {"input_ids": [PROMPT, PROMPT], "lora_path": []},
                  {"custom_logit_processor": None}, {"input_ids": [PROMPT], "custom_logit_processor": [None]},
                  {"return_hidden_states": False}, {"routed_dp_rank": 0}, {"data_parallel_rank": 0},
                  {"max_thinking_tokens": None}]


def test_features_sglang_refuses_when_not_enabled(server):
    for extra, msg in SGLANG_REFUSES:
        r = gen(server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}, **extra}, 400)
        assert r["error"]["message"].startswith(msg), (extra, r)
    for extra in SGLANG_ACCEPTS:
        gen(server, {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}, **extra})
    r = gen(server, {"input_ids": PROMPT, "return_hidden_states": "full"}, 400)  # neither a boolean nor "last"
    assert r["object"] == "error" and "return_hidden_states" in r["message"]


def test_empty_grammars_are_unset_and_prompt_token_ids_come_back(server, tok):
    """sampling_params.py normalizes ``""`` grammars to None; ``return_prompt_token_ids`` puts
    the tokenized prompt at the top level of each item (tokenizer_manager.py)."""
    sp = {**GREEDY, "max_new_tokens": 3, "ignore_eos": True}
    plain = gen(server, {"text": "hello world", "sampling_params": sp})
    assert "prompt_token_ids" not in plain
    r = gen(server, {"text": "hello world", "return_prompt_token_ids": True, "sampling_params": {
        **sp, "json_schema": "", "regex": "", "ebnf": "", "structural_tag": ""}})
    assert r["output_ids"] == plain["output_ids"] and r["prompt_token_ids"] == tok("hello world")["input_ids"]
    assert "prompt_token_ids" not in r["meta_info"]
    n2 = gen(server, {"text": ["a b", "hello"], "return_prompt_token_ids": True, "sampling_params": {**sp, "n": 2}})
    assert [x["prompt_token_ids"] for x in n2] == [tok(t)["input_ids"] for t in ("a b", "a b", "hello", "hello")]
    for key in ("json_schema", "regex", "ebnf", "structural_tag"):
        r = gen(server, {"input_ids": PROMPT, "sampling_params": {key: "a+"}}, 400)
        assert f"sampling_params.{key}='a+' is not supported" in r["error"]["message"]


def _states(server) -> dict:
    return httpx.get(server.url + "/server_info", timeout=10).json()["internal_states"][0]


def _until(server, cond, what: str, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = _states(server)
        if cond(st):
            return st
        time.sleep(0.02)
    raise AssertionError(f"{what}: {st}")


@contextlib.contextmanager
def _in_background(server, body: dict, out: list):
    """``body`` posted in a thread while the model is slowed down; joined on exit."""
    server.script.delay_s = 0.03
    t = threading.Thread(target=lambda: out.append(httpx.post(server.url + "/generate", json=body, timeout=120)))
    t.start()
    try:
        yield
    finally:
        server.script.delay_s = 0.0
        t.join(timeout=120)


def test_duplicate_request_ids(server):
    """io_struct.py: ids repeated within a request; tokenizer_manager.py: an id still in flight."""
    sp = {"max_new_tokens": 2}
    r = gen(server, {"input_ids": [PROMPT, PROMPT, PROMPT], "rid": ["d", "e", "d"], "sampling_params": sp}, 400)
    assert r["error"]["message"] == "Duplicate request IDs detected within the request: ['d']"
    out: list = []
    with _in_background(server, {"input_ids": PROMPT, "rid": "busy", "sampling_params": {
            "max_new_tokens": 40, "ignore_eos": True}}, out):
        _until(server, lambda st: st["num_running_reqs"] == 1, "the request never ran")
        r = gen(server, {"input_ids": PROMPT, "rid": "busy", "sampling_params": sp}, 400)
        assert r["error"]["message"] == "Duplicate request ID detected: busy"
        r = gen(server, {"input_ids": [PROMPT, PROMPT], "rid": ["free", "busy"], "sampling_params": sp}, 400)
        assert r["error"]["message"] == "Duplicate request ID detected: busy"
        assert gen(server, {"input_ids": PROMPT, "rid": "free", "sampling_params": sp})["meta_info"]["id"] == "free"
    assert out[0].status_code == 200 and out[0].json()["meta_info"]["id"] == "busy"
    assert gen(server, {"input_ids": PROMPT, "rid": "busy", "sampling_params": sp})["meta_info"]["id"] == "busy"


@pytest.fixture(scope="module")
def other_ckpt(model_dir):
    """A second checkpoint (other weights) under the server's weight root."""
    from moe_rl.models.tiny import save_tiny_hf

    return save_tiny_hf("qwen3_moe", os.path.join(os.path.dirname(model_dir), "m1"), seed=1)


CACHE_NOT_FLUSHED = ("Weights were updated, but the cache was not flushed because requests are still running or "
                     "queued. Retract or finish them, then call /flush_cache.")  # weight_updater.py


def _post(server, path, body=None):
    return httpx.post(server.url + path, json=body if body is not None else {}, timeout=60)


def _param(server, name="model.layers.0.self_attn.q_proj.weight"):
    return server.engine.model.get_parameter(name).detach().clone()


def _ckpt_tensor(path, name="model.layers.0.self_attn.q_proj.weight"):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))[name]


def test_retract_frees_kv_so_flush_and_update_succeed(server, model_dir, other_ckpt):
    """scheduler.py pause_generation(retract): running requests go back to the waiting queue
    with their KV freed, so /flush_cache and an update's flush succeed while paused; on
    /continue_generation they recompute it and go on (greedy: the uninterrupted output, here
    with the weights put back before the recompute), counting ``num_retractions``."""
    import torch

    prompts = [[20, 21, 22], [30, 31, 32, 33], [40, 41]]
    sp = {**GREEDY, "max_new_tokens": 40, "ignore_eos": True}
    ref = gen(server, {"input_ids": prompts, "sampling_params": sp})
    assert all(r["meta_info"]["num_retractions"] == 0 for r in ref)
    v0 = httpx.get(server.url + "/model_info", timeout=10).json()["weight_version"]
    out: list = []
    with _in_background(server, {"input_ids": prompts, "sampling_params": sp}, out):
        _until(server, lambda st: st["num_running_reqs"] == 3, "the requests never ran")
        assert _post(server, "/pause_generation", {"mode": "retract"}).status_code == 200
        st = _states(server)
        assert (st["num_running_reqs"], st["num_waiting_reqs"], st["paused"]) == (0, 3, True)
        r = _post(server, "/flush_cache")
        assert r.status_code == 200 and r.text.startswith("Cache flushed.")
        r = _post(server, "/update_weights_from_disk", {"model_path": other_ckpt, "weight_version": "other"})
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        assert torch.equal(_param(server), _ckpt_tensor(other_ckpt))
        r = _post(server, "/update_weights_from_disk", {"model_path": model_dir, "weight_version": v0})
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        assert _post(server, "/continue_generation").status_code == 200
    got = out[0].json()
    assert [x["output_ids"] for x in got] == [x["output_ids"] for x in ref]
    assert [x["meta_info"]["num_retractions"] for x in got] == [1, 1, 1]


def test_in_place_pause_keeps_kv_so_the_update_flush_fails(server, model_dir, other_ckpt):
    """SGLang's in_place pause leaves requests holding KV: /flush_cache is a 400, and so is a
    weight update with ``flush_cache`` (its default): weight_updater.py loads the weights, then
    the flush is refused and the call fails with CACHE_NOT_FLUSHED; tokenizer_manager.py then
    keeps the model path and weight version. With ``flush_cache: false`` it succeeds, and
    /model_info, /v1/models name the new path (model_path and served_model_name move, the
    tokenizer path and /server_info keep the startup path)."""
    import torch

    info0 = httpx.get(server.url + "/model_info", timeout=10).json()
    v0 = info0["weight_version"]
    assert info0["model_path"] == info0["served_model_name"] == info0["tokenizer_path"] == model_dir
    out: list = []
    body = {"input_ids": [[50, 51, 52], [60, 61]], "sampling_params": {**GREEDY, "max_new_tokens": 40,
                                                                        "ignore_eos": True}}
    with _in_background(server, body, out):
        _until(server, lambda st: st["num_running_reqs"] == 2, "the requests never ran")
        assert _post(server, "/pause_generation", {"mode": "in_place"}).status_code == 200
        assert _states(server)["num_running_reqs"] == 2
        r = _post(server, "/flush_cache")
        assert r.status_code == 400 and "not flushed" in r.text.lower()
        r = _post(server, "/update_weights_from_disk", {"model_path": other_ckpt, "weight_version": "x"})
        assert r.status_code == 400 and {k: r.json()[k] for k in ("success", "message", "num_paused_requests")} == {
            "success": False, "message": CACHE_NOT_FLUSHED, "num_paused_requests": 0}
        assert torch.equal(_param(server), _ckpt_tensor(other_ckpt))  # the weights did change
        info = httpx.get(server.url + "/model_info", timeout=10).json()
        assert (info["model_path"], info["weight_version"]) == (model_dir, v0)
        r = _post(server, "/update_weights_from_disk", {"model_path": other_ckpt, "weight_version": "x",
                                                        "flush_cache": False})
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        info = httpx.get(server.url + "/model_info", timeout=10).json()
        assert (info["model_path"], info["served_model_name"], info["tokenizer_path"], info["weight_version"]) == (
            other_ckpt, other_ckpt, model_dir, "x")
        sinfo = httpx.get(server.url + "/server_info", timeout=10).json()
        assert sinfo["model_path"] == sinfo["tokenizer_path"] == model_dir
        models = httpx.get(server.url + "/v1/models", timeout=10).json()
        card = models["data"][0]
        assert models["object"] == "list" and len(models["data"]) == 1
        assert {k: card[k] for k in ("id", "object", "owned_by", "root", "parent", "max_model_len")} == {
            "id": other_ckpt, "object": "model", "owned_by": "sglang", "root": other_ckpt, "parent": None,
            "max_model_len": CONTEXT}
        assert isinstance(card["created"], int) and abs(card["created"] - time.time()) < 60
        assert httpx.get(server.url + "/v1/models/" + other_ckpt.lstrip("/"), timeout=10).status_code == 404
        assert httpx.get(server.url + "/v1/models/" + other_ckpt, timeout=10).json()["id"] == other_ckpt
        assert _post(server, "/continue_generation").status_code == 200
    spans = [[s["version"] for s in x["meta_info"]["weight_versions"]] for x in out[0].json()]
    assert spans == [[v0, "x"], [v0, "x"]]  # the version that loaded while they were paused
    r = _post(server, "/update_weights_from_disk", {"model_path": model_dir, "weight_version": v0})
    assert r.status_code == 200
    assert httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"] == model_dir


def test_requests_arriving_during_a_pause_wait_for_continue(server):
    """tokenizer_manager.py: a request that arrives while paused waits before the scheduler
    (``is_pause_cond``), so the scheduler's ``abort_all`` (the default of /update_weight_version,
    and /abort_request's) does not end it and a flush does not count it; /ready
    (``is_ready``: not paused and healthy) is 503 meanwhile. After /continue_generation it runs
    as if sent then."""
    sp = {**GREEDY, "max_new_tokens": 6, "ignore_eos": True}
    ref = gen(server, {"input_ids": [70, 71, 72], "sampling_params": sp})
    v0 = httpx.get(server.url + "/model_info", timeout=10).json()["weight_version"]
    out: list = []
    assert _post(server, "/pause_generation").status_code == 200
    try:
        t = threading.Thread(target=lambda: out.append(httpx.post(
            server.url + "/generate", json={"input_ids": [70, 71, 72], "sampling_params": sp}, timeout=120)))
        t.start()
        st = _until(server, lambda st: st["num_held_reqs"] == 1, "the request was not held")
        assert (st["num_running_reqs"], st["num_waiting_reqs"]) == (0, 0)
        assert httpx.get(server.url + "/ready", timeout=10).status_code == 503
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        r = _post(server, "/update_weight_version", {"new_version": "held-1"})  # abort_all_requests: true
        assert r.status_code == 200 and r.json()["success"] is True, r.text
        assert httpx.post(server.url + "/abort_request", json={"abort_all": True}, timeout=10).status_code == 200
        r = _post(server, "/flush_cache")
        assert r.status_code == 200 and r.text.startswith("Cache flushed.")
        time.sleep(0.2)
        assert not out and _states(server)["num_held_reqs"] == 1  # still waiting, not aborted
    finally:
        assert _post(server, "/continue_generation").status_code == 200
        t.join(timeout=120)
    got = out[0].json()
    assert got["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    assert got["output_ids"] == ref["output_ids"] and got["meta_info"]["weight_version"] == "held-1"
    assert httpx.get(server.url + "/ready", timeout=10).status_code == 200
    assert _post(server, "/update_weight_version", {"new_version": v0}).status_code == 200
    # a held request is still aborted by its own rid (a client that gave up)
    assert _post(server, "/pause_generation").status_code == 200
    try:
        t = threading.Thread(target=lambda: out.append(httpx.post(server.url + "/generate", json={
            "input_ids": [70, 71, 72], "rid": "held-rid", "sampling_params": sp}, timeout=120)))
        t.start()
        _until(server, lambda st: st["num_held_reqs"] == 1, "the request was not held")
        assert httpx.post(server.url + "/abort_request", json={"rid": "held-rid"}, timeout=10).status_code == 200
        t.join(timeout=120)
        assert out[1].json()["meta_info"]["finish_reason"]["type"] == "abort"
        assert _states(server)["num_held_reqs"] == 0
    finally:
        assert _post(server, "/continue_generation").status_code == 200


def test_flush_cache_timeout_waits_for_idle(server):
    """http_server.py flush_cache(timeout >= 0) and flush_wrapper.py: with a timeout the flush
    waits for the running requests to finish; past it, "Timed out waiting for idle state."."""
    for bad in ("-1", "abc", "inf"):
        r = httpx.post(server.url + f"/flush_cache?timeout={bad}", timeout=10)
        assert r.status_code == 400 and "timeout" in r.json()["message"], (bad, r.text)
    out: list = []
    body = {"input_ids": [[80, 81], [82, 83]], "sampling_params": {**GREEDY, "max_new_tokens": 30,
                                                                    "ignore_eos": True}}
    with _in_background(server, body, out):
        _until(server, lambda st: st["num_running_reqs"] == 2, "the requests never ran")
        r = httpx.post(server.url + "/flush_cache?timeout=0.05", timeout=10)
        assert r.status_code == 400 and r.text.startswith("Timed out waiting for idle state."), r.text
        r = httpx.post(server.url + "/flush_cache?timeout=60", timeout=70)
        assert r.status_code == 200 and r.text.startswith("Cache flushed."), r.text
        assert _states(server)["num_running_reqs"] == 0  # it answered once they finished
    assert out[0].status_code == 200 and all(len(x["output_ids"]) == 30 for x in out[0].json())


def test_abort_request_matches_rid_prefixes_with_sglangs_messages(server):
    """scheduler.py abort_request: a rid ends every request whose rid STARTS with it (so a
    request's rid ends its ``rid_i`` samples), FINISH_ABORT's "Aborted" for a running one,
    the tokenizer manager's "Abort in waiting queue" for one not started; other rids run on."""
    # a batch with one string rid: its prompts are rid_0, rid_1, ... (io_struct.py)
    out: list = []
    sp = {**GREEDY, "max_new_tokens": 40, "ignore_eos": True}
    n = len(server.engine._slots) + 1  # every slot runs one sample, the last one waits
    with _in_background(server, {"input_ids": [PROMPT] * n, "rid": "grp", "sampling_params": sp}, out):
        _until(server, lambda st: st["num_running_reqs"] == n - 1 and st["num_waiting_reqs"] == 1,
               "every slot running, one sample waiting")
        assert httpx.post(server.url + "/abort_request", json={"rid": "grp"}, timeout=10).status_code == 200
    other = gen(server, {"input_ids": PROMPT, "rid": "grpx-not-aborted-later", "sampling_params": {
        **sp, "max_new_tokens": 3}})
    got = {x["meta_info"]["id"]: x["meta_info"]["finish_reason"] for x in out[0].json()}
    assert set(got) == {f"grp_{i}" for i in range(n)}
    assert [f["type"] for f in got.values()] == ["abort"] * n
    assert sorted(f["message"] for f in got.values()) == ["Abort in waiting queue"] + ["Aborted"] * (n - 1)
    assert other["meta_info"]["finish_reason"] == {"type": "length", "length": 3}  # a prefix abort is not sticky
