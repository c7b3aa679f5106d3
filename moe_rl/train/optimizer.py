"""Megatron's DDP, optimizer (plain or distributed), gradient clipping and LR schedule.

Parallel semantics: every rank calls :func:`wrap_for_training` with its own model chunks (one
per virtual pipeline stage, each wrapped in its own DDP, one optimizer over all);
gradients of dense parameters are averaged over the dense DP group, expert parameters over
the expert DP group, both scaled by 1/DP (Megatron's convention, which
``moe_rl.train.schedule`` compensates so that losses normalised by *global* counts give the
exact gradient of the global loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe_rl.parallel.groups import Groups, backend_for_device
from moe_rl.train.config import OptimConfig


@dataclass
class TrainState:
    chunks: list  # the DDP-wrapped model chunks, one per virtual pipeline stage
    optimizer: Any  # Megatron's optimizer (get_megatron_optimizer)
    scheduler: Any  # Megatron's OptimizerParamScheduler, advanced by applied updates only
    step: int = 0  # optimizer_step calls so far, skipped steps included

    def __post_init__(self):
        if not isinstance(self.chunks, (list, tuple)):
            self.chunks = [self.chunks]  # one chunk given bare

    @property
    def model(self):
        """The DDP-wrapped model when this rank holds one chunk (no virtual pipeline)."""
        if len(self.chunks) != 1:
            raise ValueError(f"this rank trains {len(self.chunks)} model chunks (virtual_pipeline); "
                             "use TrainState.chunks")
        return self.chunks[0]

    def train(self, mode: bool = True) -> None:
        for c in self.chunks:
            c.train(mode)


def wrap_for_training(module, cfg: OptimConfig, groups: Groups) -> TrainState:
    """``module``: this rank's model, or its list of chunks (``BuiltModel.chunks``)."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    modules = list(module) if isinstance(module, (list, tuple)) else [module]
    tc = modules[0].config
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.overlap_grad_reduce,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    ddps = []
    for i, m in enumerate(modules):
        # As Megatron-LM's own training does: chunks after the first are one bucket each.
        ddps.append(_collectable_ddp_class()(config=tc, ddp_config=ddp_cfg, module=m,
                                             disable_bucketing=i > 0))
    tc.finalize_model_grads_func = finalize_model_grads
    if cfg.overlap_grad_reduce:
        tc.no_sync_func = [d.no_sync for d in ddps] if len(ddps) > 1 else ddps[0].no_sync
        tc.grad_sync_func = [d.start_grad_sync for d in ddps] if len(ddps) > 1 else ddps[0].start_grad_sync
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        bf16=tc.bf16,
        fp16=tc.fp16,
        params_dtype=tc.params_dtype,
    )
    optimizer = get_megatron_optimizer(opt_cfg, ddps,
                                       use_gloo_process_groups=backend_for_device() != "gloo")
    scheduler = build_lr_scheduler(optimizer, cfg)
    return TrainState(ddps, optimizer, scheduler)


_DDP_CLASS = None


def _collectable_ddp_class():
    """Megatron's DDP whose gradient hooks hold it by weak reference.

    Megatron registers one hook per parameter on the parameter's gradient accumulator (an
    autograd node, i.e. C++), and each hook's closure holds the DDP wrapper. The wrapper holds
    the accumulators, so wrapper -> node -> hook -> wrapper is a cycle through C++ that
    Python's garbage collector cannot see: a finished model, its gradient buffers and its
    communicators (on gloo ~50 threads per layout, measured) were never freed. With the weak
    reference the cycle is plain Python and the wrapper goes with its last user. The hook
    itself is Megatron's, unchanged.
    """
    global _DDP_CLASS
    if _DDP_CLASS is None:
        import weakref

        from megatron.core.distributed import DistributedDataParallel

        class CollectableDDP(DistributedDataParallel):
            def _make_backward_post_hook(self, param: torch.nn.Parameter):
                owner = weakref.ref(self)

                def hook(*args):
                    ddp = owner()
                    if ddp is None:
                        raise RuntimeError("backward through a model whose DDP wrapper was freed")
                    return DistributedDataParallel._make_backward_post_hook(ddp, param)(*args)

                return hook

        _DDP_CLASS = CollectableDDP
    return _DDP_CLASS


def build_lr_scheduler(optimizer, cfg: OptimConfig):
    """Megatron's ``OptimizerParamScheduler``: linear warm-up from 0 over ``lr_warmup_steps``,
    then ``lr_decay_style`` from ``lr`` to ``min_lr`` over ``lr_decay_steps`` (constant when 0)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_steps = cfg.lr_decay_steps if cfg.lr_decay_steps > 0 else max(cfg.lr_warmup_steps, 1) + 1
    style = cfg.lr_decay_style if cfg.lr_decay_steps > 0 else "constant"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=max(decay_steps, cfg.lr_warmup_steps + 1),
        lr_decay_style=style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
        # on resume the schedule takes this config's values (a change the resume accepted,
        # checkpoint.resume_changes), not the checkpoint's; its step count comes from the checkpoint
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )


def optimizer_step(state: TrainState) -> dict[str, float]:
    """Apply the accumulated gradients: clip, step, advance the LR schedule, zero grads.

    A step Megatron skips (non-finite gradients: ``update_successful`` False) changes no
    weight and does not advance the LR schedule either (Megatron's own training loop does the
    same): warm-up and decay count applied updates. ``state.step`` counts calls, skipped
    ones included. Returns ``train/grad_norm``, ``train/lr`` (the rate this step used) and
    ``train/skipped`` (1.0 when skipped).
    """
    ok, grad_norm, _ = state.optimizer.step()
    lr = state.optimizer.param_groups[0]["lr"]
    if ok:
        state.scheduler.step(increment=1)
    for chunk in state.chunks:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    state.step += 1
    return {"train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "train/lr": float(lr), "train/skipped": 0.0 if ok else 1.0}
