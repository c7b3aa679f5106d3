"""``emit_hidden_states`` is scoped: the output layer computes logits again after the block,
also when the block raised. The model stands in for a GPTModel: it calls its output layer
the way Megatron does, ``output_layer(hidden, weight=..., runtime_gather_output=...)``."""

import pytest
import torch

from moe_rl.train.policy_head import emit_hidden_states


class _OutputLayer(torch.nn.Module):  # ColumnParallelLinear's contract: (output, bias)
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(11, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, weight=None, runtime_gather_output=None):
        return x @ self.weight.t(), None


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.output_layer = _OutputLayer()

    def forward(self, h):
        out, _ = self.output_layer(h, weight=None, runtime_gather_output=None)
        return out


def test_output_layer_computes_logits_again_after_the_block():
    model, h = _Model(), torch.randn(2, 3, 4)
    logits = h @ model.output_layer.weight.t()  # the reference: the layer's own matmul
    with emit_hidden_states(model):
        assert torch.equal(model(h), h)
    assert model(h).shape == (2, 3, 11) and torch.equal(model(h), logits)
    assert "forward" not in vars(model.output_layer)


def test_restored_when_the_block_raises_and_scopes_nest():
    model, h = _Model(), torch.randn(2, 3, 4)
    with pytest.raises(RuntimeError, match="boom"):
        with emit_hidden_states(model):
            raise RuntimeError("boom")
    assert model(h).shape == (2, 3, 11)
    with emit_hidden_states(model):
        with emit_hidden_states(model):  # inner scope: already emitting, restores nothing
            pass
        assert torch.equal(model(h), h)
    assert model(h).shape == (2, 3, 11)


def test_stage_without_output_layer_is_a_no_op():
    stage = torch.nn.Linear(2, 2)  # a first/middle pipeline stage has no output_layer
    with emit_hidden_states(stage):
        pass
    assert not hasattr(stage, "output_layer")
