"""Training invariance for ``layouts_worker.py``: a few optimizer steps at a layout, and the
same steps in plain ``transformers`` + ``torch.optim.AdamW`` as the independent single-process
reference.

Both sides see the same global batch (G sequences of S tokens with a loss mask), the token-
mean cross-entropy over the GLOBAL number of unmasked tokens, global-norm clipping and AdamW
with the same hyper-parameters. Parallel semantics: every rank calls
:func:`megatron_train_steps` with the same arguments; every rank returns the same numbers.

Test code, not library code: the batches are random tokens, the hyper-parameters and the
actor's algorithm config are chosen to exercise every path being compared. The parts that
users run (``tools/check_parity.py``) live in ``moe_rl.train.parity``.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from moe_rl.parallel.groups import Groups
from moe_rl.train.config import OptimConfig
from moe_rl.train.cross_entropy import step_loss, token_cross_entropy
from moe_rl.train.model import build_model, load_hf_weights
from moe_rl.train.optimizer import optimizer_step, wrap_for_training
from moe_rl.train.parity import random_tokens
from moe_rl.train.policy_head import emit_hidden_states, sequence_logprobs
from moe_rl.train.schedule import forward_backward


def make_global_batch(vocab: int, num_seqs: int, seq: int, seed: int = 0):
    tokens = random_tokens(vocab, num_seqs, seq + 1, seed)
    g = torch.Generator().manual_seed(seed + 1)
    # Ragged valid lengths: every sequence keeps a different number of loss tokens.
    lengths = torch.randint(seq // 2, seq + 1, (num_seqs,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).float()
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask


def _optim_cfg(lr: float, distributed: bool = True) -> OptimConfig:
    return OptimConfig(lr=lr, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.98, adam_eps=1e-8,
                       clip_grad=1.0, use_distributed_optimizer=distributed)


def megatron_train_steps(hf_config, hf_dir: str, groups: Groups, *, steps: int = 3, num_seqs: int = 4,
                         seq: int = 32, micro_batch: int = 1, lr: float = 1e-3, seed: int = 0,
                         head: str = "logits", distributed_optimizer: bool = True,
                         params_dtype: torch.dtype = torch.float32) -> dict:
    """``head``: "logits" trains on Megatron's vocab-parallel cross-entropy over full logits;
    "logprobs" on -log pi from our chunked head (``policy_head``), the RL trainer's path.
    ``params_dtype`` bfloat16: bf16 model with Megatron's fp32 main parameters and fp32
    gradient buffers, the GPU training setup."""
    built = build_model(hf_config, groups, params_dtype=params_dtype)
    load_hf_weights(built, hf_dir, groups)
    state = wrap_for_training(built.chunks, _optim_cfg(lr, distributed_optimizer), groups)
    state.train()
    tokens, labels, mask = make_global_batch(hf_config.vocab_size, num_seqs, seq, seed)
    dp, dp_rank = groups.dims.dp, groups.dp_rank
    if num_seqs % (dp * micro_batch):
        raise ValueError(f"num_seqs ({num_seqs}) must be divisible by dp ({dp}) x micro_batch ({micro_batch})")
    global_tokens = float(mask.sum())
    per_rank = num_seqs // dp
    lo = dp_rank * per_rank
    mbs = [{"tokens": tokens[i:i + micro_batch], "labels": labels[i:i + micro_batch],
            "mask": mask[i:i + micro_batch]} for i in range(lo, lo + per_rank, micro_batch)]

    scope = contextlib.nullcontext()
    if head == "logits":
        loss_fn = token_cross_entropy(global_tokens, cp_group=groups.cp_group)
    elif head == "logprobs":
        scope = emit_hidden_states(built.head)

        def loss_fn(hidden, mb):
            logp, _ = sequence_logprobs(hidden, built.head, mb["labels"], groups,
                                        vocab_size=hf_config.vocab_size)
            loss = -(logp * mb["mask"]).sum() / global_tokens
            return loss, {"loss": loss.detach().clone()}
    else:
        raise ValueError(f"head {head!r} not in ('logits', 'logprobs')")

    losses, norms = [], []
    with scope:
        for _ in range(steps):
            out = forward_backward(state.chunks, mbs, loss_fn, groups)
            losses.append(step_loss(out, groups))
            norms.append(optimizer_step(state)["train/grad_norm"])
    return {"losses": losses, "grad_norms": norms}


def hf_train_steps(hf_model, *, steps: int = 3, num_seqs: int = 4, seq: int = 32, lr: float = 1e-3,
                   seed: int = 0) -> dict:
    """The same steps in plain transformers + torch AdamW (one process, no parallelism)."""
    model = copy.deepcopy(hf_model).train()
    tokens, labels, mask = make_global_batch(model.config.vocab_size, num_seqs, seq, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    losses, norms = [], []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        logits = model(tokens).logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        loss = (ce * mask.reshape(-1)).sum() / mask.sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
        norms.append(float(norm))
    return {"losses": losses, "grad_norms": norms}


# ------------------------------------------------------------------ weight export at the layout

def export_check(hf_config, hf_dir, groups):
    """Export the HF tensors from the live model at this layout (the weight-sync stream) and
    compare each with the checkpoint, bitwise; counts over all ranks."""
    import torch
    import torch.distributed as dist

    from moe_rl.models.hf_checkpoint import HFCheckpoint
    from moe_rl.train.model import build_model, load_hf_weights
    from moe_rl.weights.export import export_buckets
    from moe_rl.weights.plan import checkpoint_shapes, plan_export

    built = build_model(hf_config, groups)
    load_hf_weights(built, hf_dir, groups)
    shapes = checkpoint_shapes(hf_dir)
    plan = plan_export(hf_config, shapes, groups.dims, bucket_bytes=64 << 10)
    sent = torch.zeros(2, dtype=torch.int64)
    with HFCheckpoint(hf_dir) as ckpt:
        for bucket in export_buckets(plan, built, groups):
            for name, t in bucket.named():
                sent[0] += 1
                sent[1] += int(not torch.equal(t, ckpt.get(name).to(t.dtype)))
    dist.all_reduce(sent)
    return {"exported": int(sent[0]), "mismatched": int(sent[1]), "hf_tensors": len(shapes)}


# ------------------------------------------------------------------ the actor (RL) step

def actor_test_config():
    """GRPO with KL (k3) in the loss, dual clip and TIS: most metric paths of the actor loss."""
    from moe_rl.algorithms.config import AlgorithmConfig

    return AlgorithmConfig(preset="grpo", dual_clip_c=3.0, mismatch="tis")


@torch.no_grad()
def make_rl_batch(hf_model, *, num_seqs: int = 4, seq: int = 32, temperature: float = 0.8, seed: int = 0) -> dict:
    """A GRPO-shaped batch scored by ``hf_model``: ragged prompts and responses, a stale
    ``old_logp`` (noise of 0.3 nats, so that clipping happens), engine log-probs, reference
    log-probs, and per-response advantages."""
    g = torch.Generator().manual_seed(seed + 7)
    V = hf_model.config.vocab_size
    full = random_tokens(V, num_seqs, seq + 1, seed)
    tokens, targets = full[:, :-1].contiguous(), full[:, 1:].contiguous()
    prompt = torch.randint(4, 12, (num_seqs, 1), generator=g)
    end = torch.randint(seq // 2, seq + 1, (num_seqs, 1), generator=g)
    pos = torch.arange(seq)[None]
    mask = ((pos >= prompt) & (pos < end)).float()
    logits = hf_model(tokens).logits.float() / temperature
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    noise = lambda s: s * torch.randn(logp.shape, generator=g)  # noqa: E731
    adv = torch.randn(num_seqs, 1, generator=g).expand(num_seqs, seq).contiguous()
    return {"tokens": tokens, "targets": targets, "mask": mask, "adv": adv,
            "old_logp": logp + noise(0.3), "rollout_logp": logp + noise(0.3), "ref_logp": logp + noise(0.1),
            "temperature": temperature}


# The actor compares 2 steps of a loss with exp(log-ratio) in it: a small step keeps the
# second step's comparison about the layout, not about amplified HF-vs-Megatron rounding.
ACTOR_LR = 1e-4


def megatron_actor_steps(hf_config, hf_dir: str, groups: Groups, batch: dict, *, steps: int = 2,
                         micro_batch: int = 1, lr: float = ACTOR_LR) -> list[dict]:
    from moe_rl.train.actor_step import actor_step

    built = build_model(hf_config, groups)
    load_hf_weights(built, hf_dir, groups)
    state = wrap_for_training(built.chunks, _optim_cfg(lr), groups)
    state.train()
    n, dp = batch["tokens"].shape[0], groups.dims.dp
    per_rank = n // dp
    lo = groups.dp_rank * per_rank
    keys = [k for k in batch if k != "temperature"]
    mbs = [{k: batch[k][i:i + micro_batch] for k in keys} for i in range(lo, lo + per_rank, micro_batch)]
    return [actor_step(state, built, mbs, actor_test_config(), groups, temperature=batch["temperature"])
            for _ in range(steps)]


def hf_actor_steps(hf_model, batch: dict, *, steps: int = 2, lr: float = ACTOR_LR) -> list[dict]:
    """The same steps in one process: transformers forward, the whole batch at once."""
    from moe_rl.algorithms.actor_loss import actor_loss

    cfg = actor_test_config()
    model = copy.deepcopy(hf_model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    m = batch["mask"]
    out = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        logq = torch.log_softmax(model(batch["tokens"]).logits.float() / batch["temperature"], -1)
        logp = logq.gather(-1, batch["targets"][..., None])[..., 0]
        ent = -(logq.exp() * logq).sum(-1)
        loss, metrics = actor_loss(cfg, logp, batch["old_logp"], batch["adv"], m,
                                   num_global_tokens=float(m.sum()), num_global_seqs=float(m.shape[0]),
                                   ref_logp_BT=batch["ref_logp"], rollout_logp_BT=batch["rollout_logp"],
                                   entropy_BT=ent.detach())
        loss.backward()
        vals = metrics.compute()
        vals["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        out.append(vals)
    return out
