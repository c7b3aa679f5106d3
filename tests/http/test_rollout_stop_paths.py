"""``rollout.stop`` and ``rollout.stop_token_ids`` through both rollout paths of a run: the
in-process engine (``InProcessRollout``, one gloo rank) and the HTTP client against the embedded
server (an in-process server on 127.0.0.1), over the tiny qwen3_moe model with a byte-level BPE
tokenizer saved beside it.

Reference, independent of the engine's matcher: the same seeded requests without stops, cut
by SGLang's rule written out here (``schedule_batch.py``): after each sampled token, a stop
string found in the decoded output (special tokens shown) ends the sample, else a stop token
does; ``output_ids`` keeps every token through the one that finished it, finish reason ``stop``.
Seeded sampling draws each token from the sample's own generator, so the run with stops is the
run without them, cut.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.distributed as dist

from moe_rl.config.run import RunConfig
from moe_rl.rollout.config import ClientConfig, EmbeddedEngineConfig, RolloutConfig
from moe_rl.rollout.types import FinishReason

from embedded_servers import InProcessServer, tiny_model_with_tokenizer

pytestmark = pytest.mark.timeout(120)

PROMPTS = [[40, 41, 42, 43], [7, 8, 9, 10, 11, 12], [100, 200, 300]]
N = 2  # samples per prompt
BUDGET = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_with_tokenizer(tmp_path_factory.mktemp("stop") / "m")


@pytest.fixture(scope="module")
def tok(model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(model_dir, clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo group: InProcessRollout splits and gathers over the job's ranks."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def run_cfg(**stops) -> RunConfig:
    return RunConfig(rollout=RolloutConfig(n_samples_per_prompt=N, max_new_tokens=BUDGET, temperature=1.0, **stops))


def prompts():
    return [types.SimpleNamespace(input_ids=p) for p in PROMPTS]


def in_process(cfg: RunConfig, model_dir: str):
    from moe_rl.rollout.embedded.engine import EmbeddedEngine
    from moe_rl.rollout.in_process import InProcessRollout, engine_tokenizer

    # as launch.py builds it: with the checkpoint's tokenizer, which the rollout reuses for stop strings
    engine = EmbeddedEngine(EmbeddedEngineConfig(model_path=model_dir, max_running=4),
                            tokenizer=engine_tokenizer(cfg, model_dir))
    trainer = types.SimpleNamespace(built=types.SimpleNamespace(hf_config=engine.hf_config))
    return InProcessRollout(cfg, engine, None, trainer, show_progress=False).generate(0, 0, prompts())


def over_http(cfg: RunConfig, model_dir: str):
    from moe_rl.rollout.client import RolloutClient
    from moe_rl.rollout.embedded.engine import EmbeddedEngine
    from moe_rl.rollout.embedded.tokenizer import load_tokenizer
    from moe_rl.rollout.requests import make_requests

    tokenizer = load_tokenizer(model_dir)  # as server.py's main: one tokenizer for the engine and the app
    engine = EmbeddedEngine(EmbeddedEngineConfig(model_path=model_dir, max_running=4), tokenizer=tokenizer)
    engine.start()
    srv = InProcessServer(engine, tokenizer=tokenizer)
    try:
        client = RolloutClient(ClientConfig(server_urls=[srv.url], return_routed_experts=False))
        return client.generate(make_requests(cfg, 0, 0, prompts()))
    finally:
        srv.close()


def by_key(samples):
    return sorted(samples, key=lambda s: (s.group_id, s.sample_index))


def sglang_cut(tok, out: list[int], finish: FinishReason, stops: list[str], stop_ids: list[int]):
    """(tokens, finish) of a sample whose unstopped output is ``out``, by SGLang's rule."""
    for k in range(1, len(out) + 1):
        text = tok.decode(out[:k])
        if any(s in text for s in stops) or out[k - 1] in stop_ids:
            return out[:k], FinishReason.STOP
    return out, finish


def pick_stop_string(tok, out: list[int]) -> str:
    """Two characters across a token boundary in the middle of ``out``."""
    pieces = [tok.decode([t]) for t in out]
    k = next(i for i in range(len(out) // 2, len(out) - 1)
             if pieces[i] and pieces[i + 1] and "\ufffd" not in pieces[i][-1] + pieces[i + 1][0])
    return pieces[k][-1] + pieces[k + 1][0]


def test_both_paths_stop_where_sglang_does(one_rank, model_dir, tok):
    free = by_key(in_process(run_cfg(), model_dir))
    assert len(free) == len(PROMPTS) * N
    assert all(len(s.response_ids) > 8 for s in free), [len(s.response_ids) for s in free]
    stops = [pick_stop_string(tok, free[0].response_ids)]
    stop_ids = [free[3].response_ids[len(free[3].response_ids) // 2]]
    want = [sglang_cut(tok, s.response_ids, s.finish_reason, stops, stop_ids) for s in free]
    assert want[0][1] is FinishReason.STOP and len(want[0][0]) < len(free[0].response_ids)
    assert want[3][1] is FinishReason.STOP and len(want[3][0]) < len(free[3].response_ids)

    cfg = run_cfg(stop=stops, stop_token_ids=stop_ids)
    local = by_key(in_process(cfg, model_dir))
    http = by_key(over_http(cfg, model_dir))
    for name, got in (("in-process", local), ("http", http)):
        assert [(s.group_id, s.sample_index) for s in got] == [(s.group_id, s.sample_index) for s in free], name
        assert [s.response_ids for s in got] == [w[0] for w in want], name
        assert [s.finish_reason for s in got] == [w[1] for w in want], name
        for s, f in zip(got, free):  # the kept tokens were drawn exactly as without stops
            torch.testing.assert_close(s.rollout_logprobs_T, f.rollout_logprobs_T[: len(s.response_ids)],
                                       atol=1e-5, rtol=0)
    stopped_by_string = tok.decode(local[0].response_ids)
    assert stops[0] in stopped_by_string and stops[0] not in tok.decode(local[0].response_ids[:-1])
