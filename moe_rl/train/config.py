"""Typed configuration of the Megatron training side: the optimizer and the training steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

_DECAY = ("constant", "linear", "cosine", "inverse-square-root")


@dataclass
class OptimConfig:
    """Megatron's Adam (plain or distributed), gradient clipping and LR schedule."""

    lr: float = 1e-6  # peak learning rate (>= 0)
    min_lr: float = 0.0  # floor of the decay schedule, in [0, lr]
    lr_warmup_steps: int = 0  # linear warm-up from 0 over this many successful optimizer steps
    # Megatron's convention: counted from step 0, warm-up included; 0 = constant after warm-up.
    lr_decay_steps: int = 0  # step at which the decay reaches min_lr
    lr_decay_style: str = "constant"  # constant | linear | cosine | inverse-square-root
    weight_decay: float = 0.01  # decoupled weight decay (AdamW, >= 0), not applied to norms and biases
    adam_beta1: float = 0.9  # Adam first-moment decay, in [0, 1)
    adam_beta2: float = 0.98  # Adam second-moment decay, in [0, 1)
    adam_eps: float = 1e-8  # Adam denominator epsilon (> 0)
    clip_grad: float = 1.0  # global gradient-norm clip (0 disables)
    use_distributed_optimizer: bool = True  # shard optimizer state over data-parallel ranks
    overlap_grad_reduce: bool = False  # overlap the DP gradient reduce-scatter/all-reduce with backward

    def __post_init__(self):
        if self.lr_decay_style not in _DECAY:
            raise ValueError(f"optim.lr_decay_style {self.lr_decay_style!r} not in {_DECAY}")
        for name in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"optim.{name} must be a finite number, got {getattr(self, name)}")
        if self.lr < 0:  # 0 is allowed: a run that scores and syncs without moving the weights
            raise ValueError(f"optim.lr must be >= 0, got {self.lr}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim: need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr})")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_eps <= 0:
            raise ValueError(f"optim.adam_eps must be > 0, got {self.adam_eps}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")
        if self.lr_warmup_steps < 0 or self.lr_decay_steps < 0:
            raise ValueError("optim.lr_warmup_steps and optim.lr_decay_steps must be >= 0")
        if 0 < self.lr_decay_steps <= self.lr_warmup_steps:
            raise ValueError(f"optim.lr_decay_steps ({self.lr_decay_steps}) must be greater than "
                             f"optim.lr_warmup_steps ({self.lr_warmup_steps})")


@dataclass
class TrainConfig:
    """Step counts, batch shapes and the loss terms the trainer adds beside the objective."""

    steps: int = 4  # loop steps: each one rollout batch, rollout_batch_size / global_batch optimizer steps, a sync (0: evaluate only)
    global_batch: int = 8  # sequences per optimizer step (over all data-parallel ranks)
    ppo_epochs: int = 1  # passes over each rollout batch (verl ppo_epochs, TRL num_iterations); later passes are off-policy
    micro_batch: int = 2  # sequences per micro-batch on one rank
    seq_len: int = 64  # tokens per sequence (padded)
    seed: int = 1234  # seed of data sampling and model-parallel RNG
    # Off by default: the gradient is then the RL objective's alone, as the transformers
    # references compute it. A checkpoint's HF router_aux_loss_coef (0.001 Qwen3-MoE, 0.02
    # Mixtral) is its pre-training value and is never picked up silently; set this to opt in.
    moe_aux_loss_coeff: float = 0.0  # weight of Megatron's MoE load-balancing aux loss (0 = off)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"train.steps must be >= 0, got {self.steps}")
        for k in ("global_batch", "ppo_epochs", "micro_batch", "seq_len"):
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        if self.moe_aux_loss_coeff < 0:
            raise ValueError(f"train.moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}")
