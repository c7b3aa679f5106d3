"""Value ranges are checked when the config loads, naming the dotted field and the value:
sampling (rollout.temperature/top_p/top_k), the optimizer (optim.*), the engine's attention
backend and the toy data size; and an empty data file is refused by the launcher's preflight."""

import pytest

from launcher import ROOT
from moe_rl.config import load_config
from moe_rl.config.run import RunConfig
from moe_rl.launch import preflight

QUICKSTART = ROOT / "launch/configs/quickstart.yaml"


def _cfg(*overrides):
    return load_config(RunConfig, QUICKSTART, list(overrides))


@pytest.mark.parametrize("override, message", [
    ("rollout.top_p=0", "rollout.top_p (0.0) must be in (0, 1]"),
    ("rollout.top_p=1.5", "rollout.top_p (1.5) must be in (0, 1]"),
    ("rollout.top_p=nan", "rollout.top_p (nan) must be in (0, 1]"),
    ("rollout.top_k=0", "rollout.top_k (0) must be >= 1, or -1 for all tokens"),
    ("rollout.top_k=-2", "rollout.top_k (-2) must be >= 1, or -1 for all tokens"),
    ("rollout.temperature=-0.5", "rollout.temperature (-0.5) must be a finite number >= 0"),
    ("rollout.temperature=inf", "rollout.temperature (inf) must be a finite number >= 0"),
    ("rollout.embedded.attn_implementation=flash_attention_2",
     "embedded.attn_implementation ('flash_attention_2') must be one of sdpa, eager"),
    ("optim.adam_beta1=1.0", "optim.adam_beta1 must be in [0, 1), got 1.0"),
    ("optim.adam_beta2=-0.1", "optim.adam_beta2 must be in [0, 1), got -0.1"),
    ("optim.adam_eps=0", "optim.adam_eps must be > 0, got 0.0"),
    ("optim.weight_decay=-0.01", "optim.weight_decay must be >= 0, got -0.01"),
    ("optim.lr=-1e-6", "optim.lr must be >= 0, got -1e-06"),
    ("optim.lr=nan", "optim.lr must be a finite number, got nan"),
    ("optim.min_lr=-1e-9", "optim: need 0 <= min_lr (-1e-09) <= lr"),
    ("data.toy_num_prompts=0", "data.toy_num_prompts (0) must be >= 1"),
    ("train.ppo_epochs=0", "train.ppo_epochs must be >= 1, got 0"),
    ("algorithm.entropy_coeff=nan", "algorithm.entropy_coeff (nan) must be finite"),
])
def test_value_ranges_are_checked_at_load_naming_field_and_value(override, message):
    """Out-of-range sampling and optimizer values stop at config load, not in the first rollout
    request (SamplingParams) or, silently, as a run that trains nothing or diverges."""
    with pytest.raises(ValueError) as e:
        _cfg(override)
    assert message in str(e.value)


def test_sampling_and_optimizer_edges_that_are_valid_load():
    cfg = _cfg("rollout.temperature=0", "rollout.top_p=1", "rollout.top_k=-1", "rollout.top_k=1",
               "optim.adam_beta1=0", "optim.weight_decay=0", "rollout.embedded.attn_implementation=eager")
    assert (cfg.rollout.temperature, cfg.rollout.top_k, cfg.optim.adam_beta1) == (0.0, 1, 0.0)


def test_an_empty_data_file_is_refused_by_preflight(tmp_path):
    """Before any process group or model: not datasets' bare StopIteration at load."""
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"data.path: '.*prompts.jsonl' is empty"):
        preflight(_cfg(f"data.path={empty}"), world=2)
