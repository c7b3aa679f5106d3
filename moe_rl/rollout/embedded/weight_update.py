"""Validate a whole weight update against the model, then apply it (all or nothing).

Every tensor is checked (known name, same shape, compatible dtype) before the first one is
copied, so a bad update leaves the serving weights untouched. Floating tensors are cast to
the parameter's dtype (a bf16 trainer may feed an fp32 engine); a floating tensor for an
integer buffer, or the reverse, is rejected.
"""

from __future__ import annotations

import torch

from moe_rl.rollout.embedded.weight_names import Target, resolve


class WeightUpdateError(ValueError):
    """An update that does not fit the model; the message names the tensor and the numbers."""


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(model.named_parameters())
    out.update(dict(model.named_buffers()))
    return out


def parse_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise WeightUpdateError(f"unknown dtype {name!r}")
    return dt


def plan_update(model: torch.nn.Module, named: list[tuple[str, torch.Tensor]]) -> list[tuple[Target, torch.Tensor]]:
    """Check every tensor; return ``[(target, tensor)]`` or raise :class:`WeightUpdateError`."""
    params = model_tensors(model)
    plan = []
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise WeightUpdateError(f"{name}: expected a tensor, got {type(t).__name__}")
        tgt = resolve(name, params)
        if tgt is None:
            raise WeightUpdateError(f"{name}: no such weight in the model")
        pname, idx = tgt
        dst = params[pname][idx] if idx else params[pname]
        if tuple(t.shape) != tuple(dst.shape):
            raise WeightUpdateError(
                f"{name}: shape {list(t.shape)} does not match the model's {list(dst.shape)}")
        if t.dtype.is_floating_point != dst.dtype.is_floating_point or (
                not dst.dtype.is_floating_point and t.dtype != dst.dtype):
            raise WeightUpdateError(f"{name}: dtype {t.dtype} incompatible with the model's {dst.dtype}")
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise WeightUpdateError(f"{name}: contains NaN or inf")
        plan.append((tgt, t))
    return plan


@torch.no_grad()
def apply_update(model: torch.nn.Module, plan: list[tuple[Target, torch.Tensor]]) -> None:
    params = model_tensors(model)
    for (pname, idx), t in plan:
        dst = params[pname][idx] if idx else params[pname]
        dst.copy_(t)


def load_checkpoint_state(model_path: str, like: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint directory's weights in the in-memory naming, via ``from_pretrained``
    (which owns the checkpoint -> fused-expert conversion)."""
    import os

    import transformers as tf

    if not os.path.isdir(model_path):
        raise WeightUpdateError(f"model_path {model_path!r} is not a directory")
    try:
        fresh, info = tf.AutoModelForCausalLM.from_pretrained(
            model_path, dtype=next(like.parameters()).dtype, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - any load failure is the caller's bad input
        raise WeightUpdateError(f"cannot load {model_path!r}: {type(e).__name__}: {e}") from e
    missing = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
    if missing:
        raise WeightUpdateError(f"{model_path!r} lacks or mismatches {len(missing)} weights, e.g. {missing[0]}")
    return list(model_tensors(fresh).items())


def check_announced(model: torch.nn.Module, names: list, dtypes: list, shapes: list) -> list[tuple[list[int], torch.dtype]]:
    """Validate a ``/update_weights_from_distributed`` announcement *before* any buffer is
    allocated: every name a distinct weight of the model, every shape exactly the model's,
    every dtype a known one. So what a client can make the server allocate is bounded by the
    model's own size (at most 8 bytes per element). Returns ``[(shape, dtype)]`` to receive."""
    if not len(names) == len(dtypes) == len(shapes):
        raise WeightUpdateError(f"names ({len(names)}), dtypes ({len(dtypes)}) and shapes ({len(shapes)}) "
                                "must have the same length")
    params = model_tensors(model)
    seen: set = set()
    out = []
    for name, dt, shape in zip(names, dtypes, shapes):
        if not isinstance(name, str):
            raise WeightUpdateError(f"names must be strings, got {name!r:.80}")
        tgt = resolve(name, params)
        if tgt is None:
            raise WeightUpdateError(f"{name}: no such weight in the model")
        key = (tgt[0], repr(tgt[1]))
        if key in seen:
            raise WeightUpdateError(f"{name}: announced twice")
        seen.add(key)
        dst = params[tgt[0]][tgt[1]] if tgt[1] else params[tgt[0]]
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise WeightUpdateError(f"{name}: shape must be a list of integers, got {shape!r:.80}")
        if list(shape) != list(dst.shape):
            raise WeightUpdateError(f"{name}: shape {shape} does not match the model's {list(dst.shape)}")
        out.append((list(shape), parse_dtype(dt)))
    return out
