"""The policy's output head without full-vocabulary logits.

``with emit_hidden_states(model):`` makes a GPTModel return its final (normed) hidden
states instead of logits inside the block; :func:`sequence_logprobs` then computes per-token
log-probs of given tokens and the entropy with ``moe_rl.train.logprobs`` (chunked,
vocab-parallel, recomputed in backward) from those states and the output-layer weight shard.
The output weight is still a parameter of the model: its gradient flows through our function
into Megatron's DDP buffers.

Sequence parallelism: the final norm's output is sharded along the sequence over TP; it is
gathered here. Its backward only splits, because the log-prob function already all-reduces
the hidden-state gradient over TP (a reduce-scatter here would count it TP times).

Context parallelism: the hidden states are this CP rank's tokens; log-probs and entropies are
computed for them and gathered into whole sequences [B, S] (``gather_sequence``), so the
losses, counts and metrics downstream see whole sequences.
"""

from __future__ import annotations

import torch

from moe_rl.parallel.context_parallel import gather_sequence, slice_sequence
from moe_rl.parallel.groups import Groups
from moe_rl.train.logprobs import token_logprobs_and_entropy


class _HiddenStatesHead:
    """What :func:`emit_hidden_states` returns: restores the output layer on ``restore()`` or
    at the end of a ``with`` block (also when it raises)."""

    def __init__(self, head) -> None:
        self._head = head

    def restore(self) -> None:
        head, self._head = self._head, None
        if head is not None:
            del head.forward  # the instance attribute: the class's forward shows through again
            del head._moe_rl_emits_hidden

    def __enter__(self) -> "_HiddenStatesHead":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def emit_hidden_states(model) -> _HiddenStatesHead:
    """Make ``model`` (a GPTModel of the last pipeline stage: ``BuiltModel.head``; None on
    other stages) return hidden states [B, S', H]
    in place of logits (S' = S/TP under sequence parallelism) until the returned handle
    restores it: ``with emit_hidden_states(model): ...`` restores the output layer when the
    block ends, exceptions included (a bare call stays in force until ``.restore()``). Inside
    an active scope, or on a stage without an output layer, it changes nothing and its handle
    restores nothing."""
    head = getattr(model, "output_layer", None)
    if head is None or getattr(head, "_moe_rl_emits_hidden", False):
        return _HiddenStatesHead(None)

    def forward(hidden_states, weight=None, runtime_gather_output=None):
        return hidden_states, None

    head.forward = forward
    head._moe_rl_emits_hidden = True
    return _HiddenStatesHead(head)


def output_weight(model) -> torch.Tensor:
    """This TP rank's [V/TP, H] output weight (the embedding when tied)."""
    if getattr(model, "share_embeddings_and_output_weights", False):
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def sequence_logprobs(hidden_BSH: torch.Tensor, model, tokens_BS: torch.Tensor, groups: Groups, *,
                      vocab_size: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(tokens), entropy), both [B, S] float32, identical on every TP rank.

    ``hidden_BSH`` is what a model under :func:`emit_hidden_states` returned for one
    micro-batch; ``tokens_BS`` the ids to score at each position (the next tokens)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    h_SBH = hidden_BSH.transpose(0, 1)
    if groups.dims.sp:
        h_SBH = gather_from_sequence_parallel_region(h_SBH.contiguous(), tensor_parallel_output_grad=False,
                                                     group=groups.tp_group)
    S, B, H = h_SBH.shape
    cp = groups.dims.cp
    if cp > 1:
        tokens_BS = slice_sequence(tokens_BS, cp, groups.cp_rank)
    h_TH = h_SBH.transpose(0, 1).reshape(B * S, H)
    logp_T, ent_T = token_logprobs_and_entropy(
        h_TH, output_weight(model), tokens_BS.reshape(-1), temperature=temperature,
        tp_group=groups.tp_group if groups.dims.tp > 1 else None, vocab_size=vocab_size)
    if cp > 1:
        return gather_sequence(logp_T.view(B, S), groups.cp_group), gather_sequence(ent_T.view(B, S), groups.cp_group)
    return logp_T.view(B, S), ent_T.view(B, S)
