"""Stop strings and stop token ids of a run (``rollout.stop``, ``rollout.stop_token_ids``): the
config refuses what SGLang refuses (at most 32 strings, no empty string) with the field and the
value in the message, the requests carry them in SGLang's ``sampling_params`` keys, and a run
whose engine checkpoint has no tokenizer to match text with stops at start.

The end-to-end behaviour (both rollout paths stop at the same token) is in
``tests/http/test_rollout_stop_paths.py``.
"""

from __future__ import annotations

import types

import pytest

from moe_rl.config import ConfigError, load_config
from moe_rl.config.run import RunConfig
from moe_rl.rollout.config import EmbeddedEngineConfig, RolloutConfig
from moe_rl.rollout.types import RolloutRequest, SamplingParams

SGLANG_MAX_STOP_COUNT = 32  # sglang 0.5.23 sampling_params.py MAX_STOP_COUNT


@pytest.mark.parametrize("kwargs, message", [
    ({"stop": [""]}, r"rollout\.stop\[0\] is the empty string"),
    ({"stop": ["</answer>", "ok", ""]}, r"rollout\.stop\[2\] is the empty string"),
    ({"stop": ["s"] * (SGLANG_MAX_STOP_COUNT + 1)}, r"rollout\.stop has 33 strings; SGLang takes at most 32"),
    ({"stop": "</answer>"}, r"rollout\.stop \('</answer>'\) must be a list of strings"),
    ({"stop": ["a", 3]}, r"rollout\.stop \(\['a', 3\]\) must be a list of strings"),
    ({"stop_token_ids": [7, -1]}, r"rollout\.stop_token_ids\[1\] \(-1\) must be a non-negative integer"),
    ({"stop_token_ids": [2.5]}, r"rollout\.stop_token_ids\[0\] \(2\.5\) must be a non-negative integer"),
    ({"stop_token_ids": [True]}, r"rollout\.stop_token_ids\[0\] \(True\) must be a non-negative integer"),
])
def test_config_refuses_bad_stops_naming_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RolloutConfig(**kwargs)


def test_config_accepts_stops_from_yaml_overrides():
    assert RolloutConfig().stop == [] and RolloutConfig().stop_token_ids == []
    assert len(RolloutConfig(stop=[f"s{i}" for i in range(SGLANG_MAX_STOP_COUNT)]).stop) == SGLANG_MAX_STOP_COUNT
    cfg = load_config(RunConfig, None, ['rollout.stop=["</answer>", "\\n\\n"]', "rollout.stop_token_ids=[0, 151645]"])
    assert cfg.rollout.stop == ["</answer>", "\n\n"] and cfg.rollout.stop_token_ids == [0, 151645]
    with pytest.raises((ValueError, ConfigError), match=r"rollout\.stop_token_ids\[0\] \(-3\)"):
        load_config(RunConfig, None, ["rollout.stop_token_ids=[-3]"])
    with pytest.raises(ConfigError, match="rollout.stop"):
        load_config(RunConfig, None, ["rollout.stop=abc"])


def test_sampling_params_send_sglang_keys():
    """SGLang's ``sampling_params`` has ``stop`` (list of strings) and ``stop_token_ids``; both
    are left out when empty (SGLang's defaults)."""
    from moe_rl.rollout.client import generate_body

    plain = SamplingParams().to_sglang()
    assert "stop" not in plain and "stop_token_ids" not in plain
    sp = SamplingParams(stop=["</answer>", "\n\n"], stop_token_ids=[7, 9], n=4, sampling_seed=5)
    out = sp.to_sglang()
    assert out["stop"] == ["</answer>", "\n\n"] and out["stop_token_ids"] == [7, 9]
    body = generate_body(RolloutRequest([1, 2, 3], sp), 2, False)
    assert body["sampling_params"]["stop"] == ["</answer>", "\n\n"]
    assert body["sampling_params"]["stop_token_ids"] == [7, 9]
    out["stop"].append("x")  # the dict is the caller's to change
    assert sp.stop == ["</answer>", "\n\n"]
    for bad in ([""], "ab", [None]):
        with pytest.raises(ValueError, match="stop"):
            SamplingParams(stop=bad)


def test_make_requests_take_stops_from_the_config():
    from moe_rl.rollout.requests import make_requests

    cfg = RunConfig(rollout=RolloutConfig(n_samples_per_prompt=2, stop=["</answer>"], stop_token_ids=[11]))
    reqs = make_requests(cfg, 0, 0, [types.SimpleNamespace(input_ids=[4, 5]), types.SimpleNamespace(input_ids=[6])])
    assert [r.sampling.stop for r in reqs] == [["</answer>"]] * 2
    assert [r.sampling.stop_token_ids for r in reqs] == [[11]] * 2
    assert reqs[0].sampling.stop is not cfg.rollout.stop  # a request never aliases the config's list


@pytest.fixture(scope="module")
def bare_ckpt(tmp_path_factory):
    """A tiny checkpoint directory without tokenizer files."""
    from moe_rl.models.tiny import save_tiny_hf

    return save_tiny_hf("qwen3_moe", tmp_path_factory.mktemp("bare") / "m", seed=0)


def test_stop_strings_without_a_tokenizer_fail_at_start(bare_ckpt):
    from moe_rl.rollout.http_rollout import start_engine_server
    from moe_rl.rollout.in_process import InProcessRollout

    cfg = RunConfig(rollout=RolloutConfig(n_samples_per_prompt=2, stop=["</answer>"]))
    engine = types.SimpleNamespace(cfg=EmbeddedEngineConfig(model_path=str(bare_ckpt)))
    trainer = types.SimpleNamespace(built=None)
    with pytest.raises(ValueError, match=r"rollout\.stop \(\['</answer>'\]\).*" + str(bare_ckpt) + ".*no tokenizer"):
        InProcessRollout(cfg, engine, None, trainer, show_progress=False)
    # the embedded server would refuse every request: the run does not start it
    with pytest.raises(ValueError, match=r"rollout\.stop .*no tokenizer"):
        start_engine_server(cfg, str(bare_ckpt))
    # stop token ids need no tokenizer
    ok = RunConfig(rollout=RolloutConfig(n_samples_per_prompt=2, stop_token_ids=[3]))
    from moe_rl.rollout.in_process import stop_tokenizer

    assert stop_tokenizer(ok, str(bare_ckpt)) is None


def test_engine_generate_refuses_stop_strings_without_a_tokenizer(bare_ckpt):
    from moe_rl.rollout.embedded.engine import EmbeddedEngine

    eng = EmbeddedEngine(EmbeddedEngineConfig(model_path=str(bare_ckpt), max_running=2))
    with pytest.raises(ValueError, match=r"stop strings \['ab'\] need the checkpoint's tokenizer"):
        eng.generate([RolloutRequest([5, 6], SamplingParams(max_new_tokens=4, stop=["ab"]))])
    assert eng.num_waiting == 0  # nothing was queued
