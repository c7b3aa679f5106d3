"""The TransformerConfig the trainer builds with: Megatron's MoE load-balancing loss is the
trainer's setting (``train.moe_aux_loss_coeff``, default off), never the checkpoint's
``router_aux_loss_coef`` (0.001 in Qwen3-MoE, 0.02 in Mixtral configs)."""

import logging

import pytest
import transformers

from moe_rl.config import load_config
from moe_rl.config.run import RunConfig
from moe_rl.models.tiny import save_tiny_hf
from moe_rl.parallel import ParallelConfig, ParallelDims
from moe_rl.train.model import megatron_config


@pytest.fixture(scope="module")
def mixtral_with_aux(tmp_path_factory):
    d = save_tiny_hf("mixtral", tmp_path_factory.mktemp("aux") / "mixtral", num_hidden_layers=2,
                     router_aux_loss_coef=0.02)
    hf = transformers.AutoConfig.from_pretrained(d)
    assert hf.router_aux_loss_coef == 0.02  # the checkpoint does carry a non-zero coefficient
    return hf


def test_checkpoint_coefficient_is_not_picked_up(mixtral_with_aux, caplog):
    with caplog.at_level(logging.INFO, logger="moe_rl.train.model"):
        tc = megatron_config(mixtral_with_aux, ParallelDims.build(ParallelConfig(), 1),
                          moe_aux_loss_coeff=RunConfig().train.moe_aux_loss_coeff)
    assert tc.moe_aux_loss_coeff == 0.0 and tc.moe_router_load_balancing_type == "none"
    assert caplog.records == []  # nothing to announce when it is off


def test_setting_is_used_and_announced_once(mixtral_with_aux, caplog):
    cfg = load_config(RunConfig, None, ["train.moe_aux_loss_coeff=0.005"])
    with caplog.at_level(logging.INFO, logger="moe_rl.train.model"):
        tc = megatron_config(mixtral_with_aux, ParallelDims.build(ParallelConfig(), 1),
                          moe_aux_loss_coeff=cfg.train.moe_aux_loss_coeff)
    assert tc.moe_aux_loss_coeff == 0.005 and tc.moe_router_load_balancing_type == "aux_loss"
    [rec] = caplog.records
    assert "aux loss ON: coefficient 0.005" in rec.getMessage() and "0.02 is not used" in rec.getMessage()
    assert "\n" not in rec.getMessage()


def test_negative_coefficient_is_refused():
    with pytest.raises(ValueError, match="train.moe_aux_loss_coeff must be >= 0, got -0.1"):
        load_config(RunConfig, None, ["train.moe_aux_loss_coeff=-0.1"])
