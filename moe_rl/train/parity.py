"""Parity of our Megatron build against HuggingFace ``transformers``: logits and training.

Used by ``tools/check_parity.py`` and the distributed tests. Parallel semantics: every rank
calls these with identical inputs; results are reduced so every rank returns the same value.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from moe_rl.parallel.collectives import max_over_world
from moe_rl.parallel.context_parallel import gather_sequence
from moe_rl.parallel.groups import Groups
from moe_rl.train.model import BuiltModel, build_model, load_hf_weights
from moe_rl.train.schedule import forward_backward, gather_vocab

# fp32 parity between two different implementations of the same model, logits of |x| ~ 5:
# measured 2e-6 .. 1.2e-5 (docs/cpu-mode.md, "Numerical equivalence" and the MLA + DeepSeek-V3
# section, and our own table in README).
LOGIT_TOLERANCE = 1e-4


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def random_tokens(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Uniform random token ids [batch, seq] in [3, vocab) (0-2 are pad/bos/eos in the tiny
    checkpoints), the same for a given seed on every rank. Test input, not sampling from a
    model (that is ``moe_rl.rollout.embedded.sampler.sample_tokens``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


@torch.no_grad()
def megatron_logits(built: BuiltModel, microbatches: Sequence[torch.Tensor], groups: Groups) -> list[torch.Tensor]:
    """Full-vocab logits [B, S, V] per micro-batch on the last pipeline stage (else [])."""
    out: list[torch.Tensor] = []

    def keep(logits_BSV, mb):
        full = gather_sequence(gather_vocab(logits_BSV.float(), groups), groups.cp_group if groups.dims.cp > 1 else None)
        out.append(full[..., : built.hf_config.vocab_size].clone())
        return logits_BSV.sum() * 0.0, {}

    for chunk in built.chunks:
        chunk.eval()
    dev = _device()
    forward_backward(built.chunks, [{"tokens": t.to(dev)} for t in microbatches], keep, groups,
                     forward_only=True)
    return out


def logit_parity(hf_model, hf_dir: str, groups: Groups, *, batch: int = 2, seq: int = 32,
                 num_microbatches: int = 2, seed: int = 0) -> dict:
    """Build at ``groups``' layout, load ``hf_dir``, compare logits with ``hf_model``."""
    t0 = time.perf_counter()
    from moe_rl.models.hf_checkpoint import HFCheckpoint

    built = build_model(hf_model.config, groups)
    with HFCheckpoint(hf_dir) as ckpt:
        load_hf_weights(built, ckpt, groups)
        read_fraction = ckpt.bytes_read / ckpt.total_bytes()
    t_build = time.perf_counter() - t0
    mbs = [random_tokens(hf_model.config.vocab_size, batch, seq, seed + i) for i in range(num_microbatches)]
    ours = megatron_logits(built, mbs, groups)
    diff, ref_max = 0.0, 0.0
    with torch.no_grad():
        for t, o in zip(mbs, ours):
            ref = hf_model(t.to(hf_model.device)).logits.float().cpu()
            diff = max(diff, (o.cpu() - ref).abs().max().item())
            ref_max = max(ref_max, ref.abs().max().item())
    return {"max_abs_diff": max_over_world(diff), "max_abs_logit": max_over_world(ref_max),
            "build_load_s": t_build, "max_read_fraction": max_over_world(read_fraction)}


def logprob_parity(hf_model, hf_dir: str, groups: Groups, *, temperature: float = 0.7, batch: int = 2,
                   seq: int = 32, seed: int = 0) -> dict:
    """Per-token log-probs and entropies from our chunked vocab-parallel head vs HF's
    ``log_softmax(logits / temperature)`` (max abs diff of each, over all ranks). One
    sequence per micro-batch (the interleaved schedule needs at least PP micro-batches)."""
    from moe_rl.train.policy_head import emit_hidden_states, sequence_logprobs

    from moe_rl.train.model import build_reference

    # The frozen reference computes reference log-probs in RL: check it through the same path.
    built = build_reference(hf_model.config, hf_dir, groups)
    frozen = not any(p.requires_grad for c in built.chunks for p in c.parameters())
    V = hf_model.config.vocab_size
    tokens = random_tokens(V, batch, seq, seed)
    targets = random_tokens(V, batch, seq, seed + 100)
    got: list = []

    def score(hidden, mb):
        logp, ent = sequence_logprobs(hidden, built.head, mb["targets"], groups, vocab_size=V,
                                      temperature=temperature)
        got.append((logp.detach().cpu(), ent.detach().cpu()))
        return logp.sum() * 0.0, {}

    dev = _device()
    with torch.no_grad(), emit_hidden_states(built.head):
        forward_backward(built.chunks, [{"tokens": tokens[i:i + 1].to(dev), "targets": targets[i:i + 1].to(dev)}
                                         for i in range(batch)],
                         score, groups, forward_only=True)
        ref = torch.log_softmax(hf_model(tokens.to(hf_model.device)).logits.float().cpu() / temperature, -1)
    d_logp = d_ent = 0.0
    if got:
        logp, ent = torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])
        d_logp = (logp - ref.gather(-1, targets[..., None])[..., 0]).abs().max().item()
        d_ent = (ent - (-(ref.exp() * ref).sum(-1))).abs().max().item()
    return {"logp_max_abs_diff": max_over_world(d_logp), "entropy_max_abs_diff": max_over_world(d_ent),
            "reference_frozen": frozen}
