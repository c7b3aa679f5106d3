"""Run checkpoints: everything the loop needs to continue exactly where it stopped.

Layout under ``<output_dir>/checkpoints``::

    step_00000012/               the state after 12 loop steps (the next step to run is 12)
      model_optim/               Megatron-Core distributed checkpoint (torch_dist): model and
                                 optimizer, loadable at another TP/PP/EP layout
      rng/rank_00000.pt ...      torch / numpy / python / Megatron model-parallel RNG of every rank
      run_state.json             step, optimizer step, weight version, data position, LR
                                 schedule, skipped-step counters, layout, model identity
      config.yaml                the resolved run config
      hf/                        the policy's config, generation config and tokenizer files,
                                 so the checkpoint converts to HF on its own
      COMPLETE                   written last: only a directory with it is a checkpoint

Writes are atomic. Megatron's own save writes in place and, over an existing directory,
leaves old metadata beside new tensor files, a mix that loads without complaint. So every
save goes to a fresh temporary sibling (``.tmp-step_...``); after every rank has written its
part, rank 0 fsyncs the tree, renames it into place, fsyncs the parent and writes ``COMPLETE``.
A crash at any point leaves either a ``.tmp-`` directory or a directory without ``COMPLETE``;
:func:`scan` reports both as partial and they are never loaded. Old complete checkpoints
beyond ``keep`` are removed marker first, so a half-deleted one never looks complete either.

Two Megatron-Core 0.16.1 behaviours of the distributed optimizer are handled on load
(:func:`_load_optimizer`): loading into an optimizer that never stepped needs its states
initialised first, and its ``load_state_dict`` gives every parameter the SAME ``step``
tensor (torch's Adam would then add one per parameter per step and get the bias correction
wrong after a resume), and the fully-reshardable loader has no ``step`` in what it reads.
The step is restored once from the checkpoint and then cloned per parameter.

Parallel semantics: :func:`save` and :func:`load` are collective (every rank of the job);
:func:`scan`, :func:`read_run_state` and :func:`check_identity` are pure file reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist

from moe_rl.checkpoint.atomic import fsync_dir, fsync_tree, write_file

FORMAT_VERSION = 1
MARKER = "COMPLETE"
RUN_STATE = "run_state.json"
# The optimizer format that reshards over TP/PP/EP/DP (the default one of 0.16.1,
# fully_sharded_model_space, raises "ShardedTensor.flattened_range is not supported").
OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
_STEP_RE = re.compile(r"^step_(\d{8})$")


@dataclass
class Found:
    """What :func:`scan` sees under a checkpoint root."""

    complete: List[Tuple[int, str]] = field(default_factory=list)  # (step, path), oldest first
    partial: List[str] = field(default_factory=list)  # interrupted writes, never loaded

    @property
    def newest(self) -> Tuple[int, str] | None:
        return self.complete[-1] if self.complete else None


def checkpoint_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def scan(root: str) -> Found:
    """Complete checkpoints (with ``COMPLETE`` and a readable run state) and partial ones."""
    found = Found()
    if not os.path.isdir(root):
        return found
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name.startswith(".tmp-step_"):
            found.partial.append(path)
            continue
        m = _STEP_RE.match(name)
        if not m or not os.path.isdir(path):
            continue
        try:
            ok = os.path.isfile(os.path.join(path, MARKER)) and read_run_state(path)["step"] == int(m[1])
        except (OSError, ValueError, KeyError):
            ok = False
        if ok:
            found.complete.append((int(m[1]), path))
        else:
            found.partial.append(path)
    found.complete.sort()
    return found


def read_run_state(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, RUN_STATE)) as f:
        return json.load(f)


def model_identity(hf_config) -> Dict[str, Any]:
    """The numbers that make two checkpoints the same model (what a resume checks)."""
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "moe_intermediate_size", "num_experts",
            "num_local_experts", "n_routed_experts", "num_experts_per_tok")
    return {k: getattr(hf_config, k) for k in keys if getattr(hf_config, k, None) is not None}


def check_identity(path: str, current: Dict[str, Any]) -> None:
    """Raise ValueError when the checkpoint at ``path`` is of another model than ``current``."""
    saved = read_run_state(path).get("model", {})
    diff = [f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        raise ValueError(f"checkpoint {path} is of another model than the configured one ("
                         + "; ".join(diff) + "); use another output_dir or the same model")


# Config fields (dotted, or a section ending in ".") that set what a run trains or the data it
# sees: changed on resume, the run would silently mix two experiments, so a resume that changes
# one is refused unless ``checkpoint.resume_changes`` lists it.
RESUME_FIXED = ("model.", "optim.", "algorithm.", "data.", "rewards.rewards", "train.global_batch", "train.ppo_epochs",
                "train.seq_len", "train.seed", "train.moe_aux_loss_coeff", "rollout.n_samples_per_prompt",
                "rollout.max_new_tokens", "rollout.temperature", "rollout.top_p", "rollout.top_k", "rollout.stop",
                "rollout.stop_token_ids", "loop.rollout_batch_size", "loop.mode", "loop.max_staleness", "routing.replay")
# ... but not these (where the model is read from, performance switches)
RESUME_FREE = ("model.hf_dir", "optim.use_distributed_optimizer", "optim.overlap_grad_reduce", "data.cache_dir")
# restored from the optimizer's own state: never changeable on resume
RESUME_FROM_STATE = ("optim.adam_beta1", "optim.adam_beta2", "optim.adam_eps")


def _flat(d: Any, prefix: str = ""):
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _under(key: str, names) -> bool:
    return any(key == n.rstrip(".") or key.startswith(n.rstrip(".") + ".") for n in names)


def resume_config_changes(path: str, config_text: str, accepted=()) -> List[str]:
    """The changes (``"field: old -> new"``) of the run config ``config_text`` (YAML, as the run
    writes it) against the config saved in checkpoint ``path``, among the fields that set what
    the run trains (:data:`RESUME_FIXED`); ValueError naming them when any is not ``accepted``
    (dotted names or sections), or is one the optimizer state restores regardless. A checkpoint
    without its config (written by an older version) compares nothing."""
    import yaml

    saved_file = os.path.join(path, "config.yaml")
    if not os.path.isfile(saved_file):
        return []
    with open(saved_file) as f:
        saved = dict(_flat(yaml.safe_load(f)))
    now = dict(_flat(yaml.safe_load(config_text)))
    changed = [k for k in sorted(set(saved) & set(now))
               if saved[k] != now[k] and _under(k, RESUME_FIXED) and not _under(k, RESUME_FREE)]
    said = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed]
    stuck = [s for k, s in zip(changed, said) if _under(k, RESUME_FROM_STATE)]
    if stuck:
        raise ValueError(f"resuming {path}: {'; '.join(stuck)} cannot change on resume (the optimizer state restores "
                         "it); use another output_dir for a run with new values")
    refused = [s for k, s in zip(changed, said) if not _under(k, accepted)]
    if refused:
        names = ", ".join(k for k in changed if not _under(k, accepted))
        raise ValueError(f"resuming {path} with a config that changes what the run trains: {'; '.join(refused)}. "
                         f"To go on with the new values from this step, set checkpoint.resume_changes=[{names}]; "
                         "for a new run, use another output_dir")
    return said


# --------------------------------------------------------------------------- RNG
def capture_rng() -> Dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    out = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
           "megatron": {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        # this rank's own device only: a resume may see another number of GPUs per process
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    get_cuda_rng_tracker().set_states(state["megatron"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # saved by get_rng_state_all (every visible device)
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


# --------------------------------------------------------------------------- save
def _model_keys(built) -> list:
    """The state-dict entry of each model chunk: ``model`` for one, ``model0``, ``model1``, ...
    under virtual pipeline stages (as Megatron-LM names them). Only the nesting differs: the
    tensors are stored under their global sharded keys (global layer numbers), so a checkpoint
    loads at any layout, with or without virtual pipeline stages."""
    n = len(built.chunks)
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _sharded_state(train_state, built, *, is_loading: bool) -> Dict[str, Any]:
    model_sd = {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(built), built.chunks)}
    return {**model_sd,
            "optimizer": train_state.optimizer.sharded_state_dict(model_sd, is_loading, metadata=OPTIM_METADATA)}


def save(root: str, step: int, *, train_state, built, groups, run_state: Dict[str, Any], config_text: str,
         keep: int = 0, hf_files: str | None = None, hf_plan=None) -> str:
    """Write checkpoint ``step`` atomically (collective); returns its path.

    ``hf_files``: the policy's HF directory, whose config and tokenizer files (not its
    weights) are copied into the checkpoint's ``hf/``. ``hf_plan``: an export plan
    (``moe_rl.weights.plan``) of this layout; with it the policy's weights are written there
    too, by the export stream the weight sync uses (each sender rank its buckets), so ``hf/``
    is a model directory ``transformers`` and SGLang load as it is.

    ``run_state`` is the loop's own state (JSON-serialisable; rank 0's is written); the
    optimizer step and LR schedule are added here."""
    from megatron.core import dist_checkpointing

    rank = dist.get_rank()
    final = step_dir(root, step)
    tmp = os.path.join(root, f".tmp-{os.path.basename(final)}")
    rng = capture_rng()  # before anything below could draw from it
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a write of this step that was interrupted
        os.makedirs(os.path.join(tmp, "rng"))
        os.makedirs(os.path.join(tmp, "model_optim"))
        if hf_files or hf_plan is not None:
            os.makedirs(os.path.join(tmp, "hf"))
    dist.barrier()
    dist_checkpointing.save(_sharded_state(train_state, built, is_loading=False), os.path.join(tmp, "model_optim"))
    write_file(os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"), lambda f: torch.save(rng, f))
    if hf_plan is not None:
        from moe_rl.weights.export import export_buckets
        from moe_rl.weights.transport.disk import write_hf_weights

        write_hf_weights(hf_plan, export_buckets(hf_plan, built, groups), Path(tmp) / "hf")
    dist.barrier()
    if rank == 0:
        state = dict(run_state, format=FORMAT_VERSION, step=step, optimizer_step=train_state.step,
                     scheduler=train_state.scheduler.state_dict(), world_size=dist.get_world_size())
        write_file(os.path.join(tmp, RUN_STATE), lambda f: f.write(json.dumps(state, indent=1).encode()))
        write_file(os.path.join(tmp, "config.yaml"), lambda f: f.write(config_text.encode()))
        if hf_files:
            from moe_rl.checkpoint.hf_format import copy_side_files

            copy_side_files(Path(hf_files), Path(tmp) / "hf")
        fsync_tree(tmp)
        if os.path.exists(final):  # an earlier write of this step that never got its marker
            _remove(final)
        os.rename(tmp, final)
        fsync_dir(root)
        write_file(os.path.join(final, MARKER), lambda f: f.write(b"ok\n"))
        fsync_dir(final)
        if keep:
            for _, old in scan(root).complete[:-keep]:
                _remove(old)
    dist.barrier()
    return final


def _remove(path: str) -> None:
    """Delete a checkpoint directory, its marker first (a partial delete is never complete)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(path, MARKER))
    fsync_dir(path)
    shutil.rmtree(path)


# --------------------------------------------------------------------------- load
def load(path: str, *, train_state, built, groups) -> Dict[str, Any]:
    """Restore model, optimizer, LR schedule, optimizer step and this rank's RNG from ``path``
    (collective); returns the run state the loop saved. Call after everything that draws
    from the RNG at start-up (model build), so the restored streams are the ones in force."""
    from megatron.core import dist_checkpointing

    state = read_run_state(path)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path} has format {state.get('format')}, this code reads {FORMAT_VERSION}")
    _prepare_optimizer_for_load(train_state.optimizer)
    loaded = dist_checkpointing.load(_sharded_state(train_state, built, is_loading=True),
                                     os.path.join(path, "model_optim"))
    for key, chunk in zip(_model_keys(built), built.chunks):
        chunk.load_state_dict(loaded[key])
    _load_optimizer(train_state.optimizer, loaded["optimizer"])
    train_state.scheduler.load_state_dict(state["scheduler"])
    train_state.step = int(state["optimizer_step"])
    rng_file = os.path.join(path, "rng", f"rank_{dist.get_rank():05d}.pt")
    if os.path.exists(rng_file):
        restore_rng(torch.load(rng_file, weights_only=False))
    elif dist.get_rank() < state["world_size"]:
        raise FileNotFoundError(f"{rng_file} is missing from a complete checkpoint")
    dist.barrier()
    return state


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inner if isinstance(o, DistributedOptimizer)]


def _prepare_optimizer_for_load(optimizer) -> None:
    """A never-stepped distributed optimizer has no Adam state to load into (Megatron asserts
    ``len(steps) == 1``): give it placeholder states first (overwritten by the load)."""
    for opt in _distributed_optimizers(optimizer):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _load_optimizer(optimizer, state_dict) -> None:
    dist_opts = _distributed_optimizers(optimizer)
    with contextlib.ExitStack() as stack:
        for opt in dist_opts:
            stack.enter_context(_tolerate_missing_step(opt))
        optimizer.load_state_dict(state_dict)
    for opt in dist_opts:  # one step tensor per parameter again
        for st in opt.optimizer.state.values():
            if "step" in st and torch.is_tensor(st["step"]):
                st["step"] = st["step"].detach().clone()


@contextlib.contextmanager
def _tolerate_missing_step(opt):
    """Scoped to one optimizer instance: the fully-reshardable loader copies every state key of
    a parameter from the checkpoint, but ``step`` is not among them (it was set once from the
    param groups just before); skip the keys the checkpoint does not carry."""
    original = opt._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        missing = [k for k in ("step",) if k not in tensors]
        if not missing:
            return original(model_param, tensors)
        group_index, group_order = opt.model_param_group_index_map[model_param]
        main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
        st = opt.optimizer.state[main_param]
        kept = {k: st.pop(k) for k in missing if k in st}
        try:
            return original(model_param, tensors)
        finally:
            st.update(kept)

    opt._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        del opt._set_main_param_and_optimizer_states
