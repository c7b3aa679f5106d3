"""The LR schedule we configure on Megatron's scheduler, against the formulas written out."""

import math

import pytest

from moe_rl.train.config import OptimConfig
from moe_rl.train.optimizer import build_lr_scheduler


class _Opt:  # what the scheduler touches: param_groups
    def __init__(self):
        self.param_groups = [{"lr": None}, {"lr": None}]


def _lrs(cfg, n):
    opt = _Opt()
    sched = build_lr_scheduler(opt, cfg)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[1]["lr"] == opt.param_groups[0]["lr"]
        sched.step(increment=1)
    return out


def test_warmup_then_cosine_to_min():
    cfg = OptimConfig(lr=1.0, min_lr=0.1, lr_warmup_steps=2, lr_decay_steps=10, lr_decay_style="cosine")

    def ref(k):
        if k <= 2:
            return k / 2
        if k > 10:
            return 0.1
        return 0.1 + 0.9 * 0.5 * (math.cos(math.pi * (k - 2) / 8) + 1)

    assert _lrs(cfg, 13) == pytest.approx([ref(k) for k in range(13)])


def test_linear_decay_and_constant():
    cfg = OptimConfig(lr=2.0, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=4, lr_decay_style="linear")
    assert _lrs(cfg, 6) == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0, 0.0])
    assert _lrs(OptimConfig(lr=3e-6), 3) == pytest.approx([3e-6] * 3)


def test_decay_must_end_after_warmup():
    with pytest.raises(ValueError, match=r"lr_decay_steps \(2\) must be greater than optim.lr_warmup_steps \(2\)"):
        OptimConfig(lr_warmup_steps=2, lr_decay_steps=2, lr_decay_style="cosine")


class _StepOpt(_Opt):  # Megatron's optimizer contract: step() -> (update_successful, grad_norm, zeros)
    def __init__(self, outcomes):
        super().__init__()
        self.outcomes = list(outcomes)

    def step(self):
        ok = self.outcomes.pop(0)
        return ok, 1.0 if ok else float("inf"), None

    def zero_grad(self):
        pass


class _Model:
    def zero_grad_buffer(self):
        pass


def test_skipped_step_does_not_advance_the_schedule():
    """Megatron skips the update on inf/nan gradients; the warm-up must count applied
    updates only, as Megatron's own training loop does."""
    from moe_rl.train.optimizer import TrainState, optimizer_step

    cfg = OptimConfig(lr=1.0, lr_warmup_steps=4)
    outcomes = [True, False, False, True, True]
    opt = _StepOpt(outcomes)
    state = TrainState(_Model(), opt, build_lr_scheduler(opt, cfg))
    got = [optimizer_step(state) for _ in outcomes]
    # lr used by each call: warm-up k/4 over the k applied updates before it
    assert [m["train/lr"] for m in got] == pytest.approx([0.0, 0.25, 0.25, 0.25, 0.5])
    assert [m["train/skipped"] for m in got] == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.75) and state.step == 5


def test_a_resumed_schedule_takes_the_configs_values_and_the_checkpoints_step():
    """On resume the schedule state comes from the checkpoint; the values come from the config
    (a change checkpoint.resume_changes accepted applies; Megatron's default keeps the
    checkpoint's, silently). Reference: the new config's cosine written out at step 5."""
    old = OptimConfig(lr=1.0, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=10, lr_decay_style="cosine")
    opt = _Opt()
    sched = build_lr_scheduler(opt, old)
    sched.step(increment=5)
    state = sched.state_dict()
    new = OptimConfig(lr=0.5, min_lr=0.1, lr_warmup_steps=0, lr_decay_steps=10, lr_decay_style="cosine")
    opt2 = _Opt()
    resumed = build_lr_scheduler(opt2, new)
    resumed.load_state_dict(state)
    assert resumed.num_steps == 5
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 + 0.4 * 0.5 * (math.cos(math.pi * 5 / 10) + 1))
