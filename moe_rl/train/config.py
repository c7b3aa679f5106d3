"""Typed configuration of the Megatron training side."""

from __future__ import annotations

from dataclasses import dataclass

_DECAY = ("constant", "linear", "cosine", "inverse-square-root")


@dataclass
class OptimConfig:
    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Floor of the decay schedule."""
    lr_warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimizer steps."""
    lr_decay_steps: int = 0
    """Step at which the decay reaches min_lr, counted from step 0 including the warm-up
    (Megatron's convention; 0: constant after warm-up)."""
    lr_decay_style: str = "constant"
    """constant | linear | cosine | inverse-square-root."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW), not applied to norms and biases."""
    adam_beta1: float = 0.9
    """Adam first-moment decay."""
    adam_beta2: float = 0.98
    """Adam second-moment decay."""
    adam_eps: float = 1e-8
    """Adam denominator epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's DistributedOptimizer)."""
    overlap_grad_reduce: bool = False
    """Overlap the DP gradient reduce-scatter/all-reduce with backward."""

    def __post_init__(self):
        if self.lr_decay_style not in _DECAY:
            raise ValueError(f"optim.lr_decay_style {self.lr_decay_style!r} not in {_DECAY}")
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim: need 0 <= min_lr ({self.min_lr}) <= lr ({self.lr})")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0, got {self.clip_grad}")
        if self.lr_warmup_steps < 0 or self.lr_decay_steps < 0:
            raise ValueError("optim.lr_warmup_steps and optim.lr_decay_steps must be >= 0")
        if 0 < self.lr_decay_steps <= self.lr_warmup_steps:
            raise ValueError(f"optim.lr_decay_steps ({self.lr_decay_steps}) must be greater than "
                             f"optim.lr_warmup_steps ({self.lr_warmup_steps})")
