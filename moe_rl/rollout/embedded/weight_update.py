"""Validate a whole weight update against the model, then apply it (all or nothing).

Every tensor is checked (known name, same shape, compatible dtype) before the first one is
copied, so a bad update leaves the serving weights untouched. Floating tensors are cast to
the parameter's dtype (a bf16 trainer may feed an fp32 engine); a floating tensor for an
integer buffer, or the reverse, is rejected.

An update that comes in several requests (buckets) can be staged: each bucket is checked
and held (:class:`StagedUpdate`), and one commit applies them all at once, so an engine
never serves, or is left with, half of an update.
"""

from __future__ import annotations

import json
import os

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
    """Every tensor of a safetensors checkpoint directory, under its checkpoint name (read
    directly, so checksums sent with the update can be checked on exactly these tensors).
    The directory must hold the whole model (:func:`check_complete` on the planned update)."""
    from safetensors import safe_open

    if not os.path.isdir(model_path):
        raise WeightUpdateError(f"model_path {model_path!r} is not a directory")
    index = os.path.join(model_path, "model.safetensors.index.json")
    try:
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(model_path) if f.endswith(".safetensors"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightUpdateError(f"{model_path!r}: unreadable model.safetensors.index.json: {e}") from e
    if not files:
        raise WeightUpdateError(f"{model_path!r} holds no *.safetensors files")
    params = model_tensors(like)
    out: list[tuple[str, torch.Tensor]] = []
    for fname in files:
        path = os.path.join(model_path, fname)
        if os.path.dirname(os.path.realpath(path)) != os.path.realpath(model_path):
            raise WeightUpdateError(f"{model_path!r}: index names a file outside the directory: {fname!r}")
        try:
            with safe_open(path, "pt") as h:
                for name in h.keys():
                    tgt = resolve(name, params)
                    if tgt is None:
                        raise WeightUpdateError(f"{name} (in {fname}): no such weight in the model")
                    dst = params[tgt[0]][tgt[1]] if tgt[1] else params[tgt[0]]
                    shape = list(h.get_slice(name).get_shape())
                    if shape != list(dst.shape):  # before reading: a wrong checkpoint is not loaded whole
                        raise WeightUpdateError(f"{name} (in {fname}): shape {shape} does not match the "
                                                f"model's {list(dst.shape)}")
                    out.append((name, h.get_tensor(name)))
        except WeightUpdateError:
            raise
        except Exception as e:  # noqa: BLE001 - missing, truncated or garbled file
            raise WeightUpdateError(f"cannot read {path!r}: {type(e).__name__}: {e}") from e
    return out


def check_complete(model: torch.nn.Module, plan: list[tuple[Target, torch.Tensor]]) -> None:
    """An update that claims to be the whole model must write every element of every
    parameter exactly once (buffers that checkpoints omit, e.g. rotary tables, are not required)."""
    written: dict[str, int] = {}
    seen: set = set()
    for (pname, idx), t in plan:
        key = (pname, repr(idx))
        if key in seen:
            raise WeightUpdateError(f"{pname}{list(idx) if idx else ''}: written twice")
        seen.add(key)
        written[pname] = written.get(pname, 0) + t.numel()
    for pname, p in model.named_parameters():
        if written.get(pname, 0) != p.numel():
            raise WeightUpdateError(f"the update lacks {pname}: {written.get(pname, 0)} of its {p.numel()} "
                                    f"elements written (it must carry the whole model)")


class StagedUpdate:
    """Buckets of one update, checked and held until :meth:`commit` applies them together.

    Each tensor may be staged once; the total is bounded by the model's own size (every
    staged tensor has the shape of a distinct part of a model weight)."""

    def __init__(self, stage_id: str) -> None:
        self.stage_id = stage_id
        self.plan: list[tuple[Target, torch.Tensor]] = []
        self._keys: set = set()

    def add(self, plan: list[tuple[Target, torch.Tensor]]) -> None:
        keys = [(pname, repr(idx)) for (pname, idx), _ in plan]
        for k in keys:
            if k in self._keys or keys.count(k) > 1:
                raise WeightUpdateError(f"{k[0]}{k[1] if k[1] != '()' else ''}: staged twice in {self.stage_id!r}")
        self._keys.update(keys)
        self.plan += plan

    def __len__(self) -> int:
        return len(self.plan)


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
