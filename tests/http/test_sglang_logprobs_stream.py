"""Prompt / top-k / chosen-id log-probs and streaming of the embedded server, against
independent references.

One in-process server over the tiny qwen3_moe model (vocabulary 512) with a byte-level BPE
tokenizer saved beside it. References:
- log-probs: a plain HF ``transformers`` forward of prompt + output, ``log_softmax`` written
  out here: prompt positions without temperature (SGLang's input log-probs), output positions
  at the request's temperature (its sampled-token log-probs); top-k by ``torch.topk`` of
  those rows; SGLang's layout written out (entries for prompt tokens ``start..P-1``, the first
  one's log-prob null; ids at or above ``vocab - 1`` reported as 0);
- token texts: each id decoded alone by the tokenizer loaded here;
- streams: the SSE bytes split by hand (``data: <json>\\n\\n`` ... ``data: [DONE]\\n\\n``), and
  every sample's last chunk compared with the non-streamed reply to the same greedy request;
- aborts and disconnects: the server's own ``/server_info`` counters and a next request.
"""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
import torch

from moe_rl.rollout.config import EmbeddedEngineConfig
from moe_rl.rollout.embedded.engine import EmbeddedEngine
from moe_rl.rollout.embedded.http_context import ServerOptions
from moe_rl.rollout.embedded.tokenizer import load_tokenizer

from embedded_servers import InProcessServer, post_generate as gen

VOCAB = 512
CONTEXT = 256
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from moe_rl.data.tokenizer import build_tokenizer
    from moe_rl.models.tiny import save_tiny_hf

    path = save_tiny_hf("qwen3_moe", tmp_path_factory.mktemp("lp") / "m", seed=0)
    build_tokenizer(VOCAB).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tok(model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def hf(model_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


class Slow:
    """Wraps the model's forward to take at least ``delay_s`` (to act while a request runs)."""

    def __init__(self, engine: EmbeddedEngine) -> None:
        self.delay_s = 0.0
        forward = engine.model.forward

        def slow(*a, **kw):
            if self.delay_s:
                time.sleep(self.delay_s)
            return forward(*a, **kw)

        engine.model.forward = slow


@pytest.fixture(scope="module")
def server(model_dir):
    engine = EmbeddedEngine(EmbeddedEngineConfig(model_path=model_dir, max_running=4, max_context_len=CONTEXT))
    engine.start()
    slow = Slow(engine)
    srv = InProcessServer(engine, ServerOptions(model_path=model_dir, weight_roots=[os.path.dirname(model_dir)]),
                          tokenizer=load_tokenizer(model_dir))
    srv.slow = slow
    yield srv
    srv.close()


def sse_events(raw: bytes) -> list:
    """Split an SSE body by hand: every event is ``data: <payload>\\n\\n``; the last is [DONE]."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = raw[:-2].split(b"\n\n")
    out = []
    for e in events:
        assert e.startswith(b"data: ") and b"\n" not in e, e[:200]
        payload = e[len(b"data: "):]
        out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    assert out and out[-1] == "[DONE]" and "[DONE]" not in out[:-1]
    return out[:-1]


def stream(srv, body: dict) -> tuple[httpx.Response, list]:
    r = httpx.post(srv.url + "/generate", json={**body, "stream": True}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    return r, sse_events(r.content)


def without_latency(item: dict) -> dict:
    return {**item, "meta_info": {k: v for k, v in item["meta_info"].items() if k not in ("e2e_latency", "id")}}


def ref_rows(hf, ids: list[int]) -> torch.Tensor:
    """Logits of a plain full forward, fp32 ``[len(ids), V]``."""
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def log_softmax(x: torch.Tensor) -> torch.Tensor:
    return x - x.max(-1, keepdim=True).values - (x - x.max(-1, keepdim=True).values).exp().sum(-1, keepdim=True).log()


def text_of(tok, t: int) -> str:
    return tok.decode([t])


def assert_entries(got: list, want: list, atol: float = 2e-5) -> None:
    """Entries ``[logprob, id, text]``: ids and texts equal, log-probs close (None equal)."""
    assert len(got) == len(want), (len(got), len(want))
    for g, w in zip(got, want):
        assert g[1:] == w[1:], (g, w)
        assert (g[0] is None) == (w[0] is None), (g, w)
        if w[0] is not None:
            assert g[0] == pytest.approx(w[0], abs=atol), (g, w)


def assert_positions(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g is None) == (w is None), (g, w)
        if w is not None:
            assert_entries(g, w)


# ----------------------------------------------------------------------------- log-probs
@pytest.mark.parametrize("start", [0, 3])
def test_prompt_top_and_chosen_logprobs_match_a_plain_forward(server, hf, tok, start):
    prompt = [40, 41, 511, 42, 43, 44, 45, 46, 47]  # 511 = vocab - 1: SGLang reports it as id 0
    P = len(prompt)
    temp, k, asked = 0.7, 4, [5, 300, 511]
    r = gen(server, {"input_ids": prompt, "sampling_params": {"temperature": temp, "max_new_tokens": 6,
                                                              "ignore_eos": True, "sampling_seed": 3},
                     "return_logprob": True, "logprob_start_len": start, "top_logprobs_num": k,
                     "token_ids_logprob": asked, "return_text_in_logprobs": True})
    out = r["output_ids"]
    meta = r["meta_info"]
    logits = ref_rows(hf, prompt + out)
    raw = log_softmax(logits)  # prompt positions: no temperature
    hot = log_softmax(logits / temp)  # output positions: the request's temperature

    def entry(lp, t):
        return [lp, t, text_of(tok, t)]

    def top(row):
        v, i = row.topk(k)
        return [entry(a, b) for a, b in zip(v.tolist(), i.tolist())]

    shown = [t if t < VOCAB - 1 else 0 for t in prompt]
    want_in = [entry(None, shown[start])] + [entry(raw[j - 1, prompt[j]].item(), shown[j]) for j in range(start + 1, P)]
    assert_entries(meta["input_token_logprobs"], want_in)
    assert_positions(meta["input_top_logprobs"], [None] + [top(raw[j - 1]) for j in range(start + 1, P)])
    assert_positions(meta["input_token_ids_logprobs"],
                     [None] + [[entry(raw[j - 1, t].item(), t) for t in asked] for j in range(start + 1, P)])
    out_rows = hot[P - 1: P - 1 + len(out)]
    assert_entries(meta["output_token_logprobs"], [entry(out_rows[i, t].item(), t) for i, t in enumerate(out)])
    assert meta["output_token_logprobs_length"] == len(out) == 6
    assert_positions(meta["output_top_logprobs"], [top(row) for row in out_rows])
    assert_positions(meta["output_token_ids_logprobs"], [[entry(row[t].item(), t) for t in asked] for row in out_rows])
    # the extras change nothing about the sample itself
    plain = gen(server, {"input_ids": prompt, "sampling_params": {"temperature": temp, "max_new_tokens": 6,
                                                                  "ignore_eos": True, "sampling_seed": 3},
                         "return_logprob": True})
    assert plain["output_ids"] == out
    assert set(plain["meta_info"]) == set(meta) - {"input_top_logprobs", "output_top_logprobs",
                                                   "input_token_ids_logprobs", "output_token_ids_logprobs"}


def test_logprob_layouts_of_groups_batches_and_prefill_only(server, hf):
    p, q = [60, 61, 62, 63, 64], [70, 71, 72]
    sp = {**GREEDY, "max_new_tokens": 3, "ignore_eos": True}
    # n = 2: both samples carry the group's one set of prompt log-probs
    two = gen(server, {"input_ids": p, "sampling_params": {**sp, "n": 2}, "return_logprob": True,
                       "logprob_start_len": 1, "top_logprobs_num": 2})
    raw = log_softmax(ref_rows(hf, p))
    want = [[None, p[1], None]] + [[raw[j - 1, p[j]].item(), p[j], None] for j in range(2, len(p))]
    for x in two:
        assert_entries(x["meta_info"]["input_token_logprobs"], want)
        assert x["meta_info"]["input_top_logprobs"][0] is None and len(x["meta_info"]["input_top_logprobs"]) == 4
        assert x["meta_info"]["output_top_logprobs"][0][0][1] == x["output_ids"][0]  # greedy: the top token
    # a batch reads one value per prompt; start = prompt length or -1: no prompt entries
    b = gen(server, {"input_ids": [p, q, q], "sampling_params": sp, "return_logprob": True,
                     "logprob_start_len": [0, len(q), -1], "top_logprobs_num": [0, 3, 1],
                     "token_ids_logprob": [[7], [], [8, 9]]})
    assert len(b[0]["meta_info"]["input_token_logprobs"]) == len(p) and "input_top_logprobs" not in b[0]["meta_info"]
    chosen = b[0]["meta_info"]["input_token_ids_logprobs"]
    assert chosen[0] is None and len(chosen) == len(p) and all(len(e) == 1 for e in chosen[1:])
    for x in b[1:]:
        assert x["meta_info"]["input_token_logprobs"] == [] and x["meta_info"]["input_top_logprobs"] == []
        assert x["meta_info"]["input_token_ids_logprobs"] == []
    assert b[1]["meta_info"]["output_token_ids_logprobs"] == [None] * 3  # an empty id list: null positions
    assert [len(e) for e in b[2]["meta_info"]["output_token_ids_logprobs"]] == [2] * 3
    # max_new_tokens 0: the prefill alone gives the prompt log-probs
    z = gen(server, {"input_ids": p, "sampling_params": {**sp, "max_new_tokens": 0}, "return_logprob": True,
                     "logprob_start_len": 0})
    assert z["output_ids"] == [] and z["meta_info"]["output_token_logprobs"] == []
    assert_entries(z["meta_info"]["input_token_logprobs"],
                   [[None, p[0], None]] + [[raw[j - 1, p[j]].item(), p[j], None] for j in range(1, len(p))])
    # refused: a start below -1 (SGLang mishandles it), more top entries than the vocabulary
    for extra, msg in (({"logprob_start_len": -2}, "logprob_start_len=-2 must be -1"),
                       ({"top_logprobs_num": VOCAB + 1}, f"top_logprobs_num={VOCAB + 1} exceeds the vocabulary"),
                       ({"token_ids_logprob": [[5], [6]]}, "token_ids_logprob has 2 lists for 1 prompts")):
        r = gen(server, {"input_ids": p, "sampling_params": sp, "return_logprob": True, **extra}, 400)
        assert msg in r["error"]["message"], r


# ----------------------------------------------------------------------------- streaming
def test_stream_chunks_are_cumulative_and_end_with_the_non_streamed_reply(server, tok):
    body = {"input_ids": [30, 31, 32, 33], "sampling_params": {**GREEDY, "max_new_tokens": 10, "ignore_eos": True},
            "return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 1, "return_text_in_logprobs": True,
            "return_prompt_token_ids": True}
    whole = gen(server, body)
    _, chunks = stream(server, body)
    assert "index" not in chunks[-1]
    assert without_latency(chunks[-1]) == without_latency(whole)
    assert "e2e_latency" in chunks[-1]["meta_info"]
    out = whole["output_ids"]
    for c in chunks[:-1]:  # running: finish_reason null, a prefix of everything, no latency
        m = c["meta_info"]
        n = len(c["output_ids"])
        assert m["finish_reason"] is None and "e2e_latency" not in m and 1 <= n < len(out)
        assert c["output_ids"] == out[:n] and m["completion_tokens"] == n
        assert m["output_token_logprobs"] == whole["meta_info"]["output_token_logprobs"][:n]
        assert m["output_top_logprobs"] == whole["meta_info"]["output_top_logprobs"][:n]
        assert m["input_token_logprobs"] == whole["meta_info"]["input_token_logprobs"]
        assert m["weight_versions"] == [{"version": "default", "start": 0, "end": n}]
        assert c["prompt_token_ids"] == body["input_ids"] and whole["text"].startswith(c["text"])
    assert [len(c["output_ids"]) for c in chunks] == sorted({len(c["output_ids"]) for c in chunks})


def test_batch_streams_carry_index_and_stream_interval(server):
    sp = {**GREEDY, "max_new_tokens": 7, "ignore_eos": True}
    # (no log-probs: rows batched differently may differ in the last bits)
    body = {"input_ids": [[20, 21, 22], [23, 24]], "sampling_params": {**sp, "n": 2}}
    whole = gen(server, body)  # greedy: both samples of a prompt alike, so compare by index
    _, chunks = stream(server, body)
    last = {}
    for c in chunks:
        assert isinstance(c["index"], int) and c["index"] not in last, c  # nothing after a sample's last chunk
        if c["meta_info"]["finish_reason"] is not None:
            last[c["index"]] = c
    assert sorted(last) == [0, 1, 2, 3]
    for i, item in enumerate(whole):
        got = dict(last[i])
        assert got.pop("index") == i
        assert without_latency(got) == without_latency(item)
    # stream_interval 3: the first token at once, then every 3 tokens (chunks may coalesce)
    _, chunks = stream(server, {"input_ids": [25, 26], "sampling_params": {**sp, "stream_interval": 3}})
    running = [len(c["output_ids"]) for c in chunks if c["meta_info"]["finish_reason"] is None]
    assert set(running) <= {1, 4} and len(chunks[-1]["output_ids"]) == 7


def test_stream_errors_as_sglang_sends_them(server):
    # refused by SGLang's tokenizer manager / scheduler: HTTP 200, one error event, [DONE]
    r = httpx.post(server.url + "/generate", json={"input_ids": [5, 6], "stream": True, "return_logprob": True,
                                                   "logprob_start_len": 3}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.content == (b'data: {"error":{"message":"req.logprob_start_len=3 is higher than the number of input '
                         b'tokens len(req.origin_input_ids)=2. Please use a smaller logprob_start_len.",'
                         b'"type":"invalid_request_error","code":400,"retryable":false}}\n\ndata: [DONE]\n\n')
    # refused by its API schema before any stream starts: a plain 400
    r = httpx.post(server.url + "/generate", json={"input_ids": [5, 6], "stream": True,
                                                   "sampling_params": {"bogus": 1}}, timeout=60)
    assert r.status_code == 400 and "unknown field `bogus`" in r.json()["error"]
    r = httpx.post(server.url + "/generate", json={"input_ids": [5, 6], "stream": "yes"}, timeout=60)
    assert r.status_code == 400


def _first_chunk_then(srv, body: dict, action) -> list:
    """Stream ``body``; after its first chunk run ``action()``; return every chunk."""
    chunks = []
    with httpx.stream("POST", srv.url + "/generate", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        buf = b""
        acted = False
        for part in r.iter_bytes():
            buf += part
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                payload = event[len(b"data: "):]
                chunks.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
                if not acted:
                    acted = True
                    action()
    assert chunks[-1] == "[DONE]"
    return chunks[:-1]


def _idle(srv, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = httpx.get(srv.url + "/server_info", timeout=10).json()["internal_states"][0]
        if st["num_running_reqs"] == 0 and st["num_waiting_reqs"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"server still busy: {st}")


def test_abort_and_pause_end_a_stream_with_the_abort_chunk(server):
    long = {**GREEDY, "max_new_tokens": 150, "ignore_eos": True}
    server.slow.delay_s = 0.01
    try:
        chunks = _first_chunk_then(server, {"input_ids": [9, 8, 7], "rid": "s-abort", "sampling_params": long},
                                   lambda: httpx.post(server.url + "/abort_request", json={"rid": "s-abort"}))
        fin = chunks[-1]["meta_info"]["finish_reason"]
        assert fin["type"] == "abort" and 1 <= len(chunks[-1]["output_ids"]) < 150
        assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])

        def pause_then_continue():
            assert httpx.post(server.url + "/pause_generation", json={"mode": "in_place"}).status_code == 200
            time.sleep(0.3)  # the stream waits while paused
            assert httpx.post(server.url + "/continue_generation", json={}).status_code == 200

        short = {**long, "max_new_tokens": 12}
        chunks = _first_chunk_then(server, {"input_ids": [9, 8, 7], "sampling_params": short}, pause_then_continue)
        assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
        assert chunks[-1]["output_ids"] == gen(server, {"input_ids": [9, 8, 7], "sampling_params": short})["output_ids"]

        def pause_abort():
            assert httpx.post(server.url + "/pause_generation", json={}).status_code == 200

        chunks = _first_chunk_then(server, {"input_ids": [9, 8, 7], "sampling_params": long}, pause_abort)
        assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert httpx.post(server.url + "/continue_generation", json={}).status_code == 200
    finally:
        server.slow.delay_s = 0.0
    _idle(server)


def test_client_gone_mid_stream_frees_the_slot_and_the_rid(server):
    server.slow.delay_s = 0.02  # 200 tokens take over 4 s: being idle sooner means it was aborted
    try:
        body = {"input_ids": [4, 5, 6], "rid": "gone-1", "stream": True,
                "sampling_params": {**GREEDY, "max_new_tokens": 200, "ignore_eos": True}}
        before = server.engine.num_generated_tokens
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", server.url + "/generate", json=body) as r:
                first = next(r.iter_bytes())
                assert first.startswith(b"data: ")
            # leaving the block closes the connection mid-stream
        _idle(server, timeout=2.0)
        assert server.engine.num_generated_tokens - before < 100
    finally:
        server.slow.delay_s = 0.0
    # the server still serves, and the request id is free again
    again = gen(server, {**body, "stream": False, "sampling_params": {**GREEDY, "max_new_tokens": 3}})
    assert again["meta_info"]["id"] == "gone-1" and len(again["output_ids"]) == 3
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
