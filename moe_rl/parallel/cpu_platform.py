"""The CPU platform layer: lets Megatron-Core 0.16.1's own code paths run on CPU over gloo.

Megatron-Core assumes CUDA in a handful of places (device literals, CUDA RNG state, streams,
type strings). ``activate_cpu_mode()`` replaces exactly those with CPU equivalents, one named
:class:`Substitution` each, documented with the Megatron location it covers. Nothing else
changes: forward, backward, DDP, the distributed optimizer and the real pipeline schedules
are Megatron's. The substitutions are process-global and must be active in every rank before
the model is built; on a GPU they are never applied (``activate_cpu_mode`` refuses to run
where CUDA is available).

Each substitution also carries *anchors*: text that must still be present in the pinned
Megatron source for the substitution to be needed and correct. ``check_anchors()`` (run by
the tests) fails loudly when a Megatron upgrade moved or removed one.

What each entry replaces and why, what stays Megatron's own code, the numerical checks and
the timings: ``docs/cpu-mode.md`` ("What is substituted, and why").
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
from typing import Callable

import torch

_ACTIVE: list[str] = []


@dataclasses.dataclass(frozen=True)
class Substitution:
    name: str  # short name used in logs and docs
    covers: str  # the Megatron-Core 0.16.1 locations (file:line) whose CUDA assumption this replaces
    anchors: tuple[tuple[str, str], ...]  # (module, source text) pairs the pinned Megatron must contain
    apply: Callable[[], None]  # installs the substitution


# --------------------------------------------------------------------------- helpers


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    d = torch.device(device) if isinstance(device, str) else device
    return torch.device("cpu") if getattr(d, "type", None) == "cuda" else device


class _CpuTorchProxy:
    """Stands in for the ``torch`` module inside one Megatron module: tensor factories that
    ask for ``device="cuda"`` get the CPU, and ``pin_memory`` (page-locked staging for a GPU
    copy; refused without an accelerator) is dropped; everything else is torch itself."""

    _FACTORIES = ("zeros", "ones", "empty", "tensor", "full", "arange", "zeros_like",
                  "ones_like", "empty_like", "full_like", "randn", "rand")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in self._FACTORIES:
            def factory(*args, __f=attr, **kwargs):
                if "device" in kwargs:
                    kwargs["device"] = _cpu_device(kwargs["device"])
                kwargs.pop("pin_memory", None)
                return __f(*args, **kwargs)
            return factory
        return attr


_PROXY = _CpuTorchProxy()


class _CpuStream:
    """A CUDA stream on CPU: work is already ordered, so every sync is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *a, **k):
        pass

    def wait_event(self, *a, **k):
        pass

    def record_event(self, event=None):
        return event if event is not None else _CpuEvent()

    def synchronize(self):
        pass

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CpuEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *a, **k):
        pass

    def wait(self, *a, **k):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


_DEFAULT_STREAM = _CpuStream()


def _mod(name):
    return importlib.import_module(name)


# --------------------------------------------------------------------------- substitutions


def _apply_curdev():
    torch.cuda.current_device = lambda: torch.device("cpu")


def _apply_rng():
    from megatron.core.tensor_parallel import random as mrandom

    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all (a lazy no-op without CUDA):
    # seed the CPU generator directly to avoid the recursion.
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _apply_streams():
    torch.cuda.Stream = _CpuStream
    torch.cuda.Event = _CpuEvent
    torch.cuda.current_stream = lambda *a, **k: _DEFAULT_STREAM
    torch.cuda.default_stream = lambda *a, **k: _DEFAULT_STREAM
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()


def _apply_tegemm():
    moe_utils = _mod("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _apply_a2a_splits():
    td = _mod("megatron.core.transformer.moe.token_dispatcher")

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor):
            tensor = tensor.cpu()
            if as_numpy:
                return tensor.numpy()
        return tensor

    td.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _apply_uneven_ag():
    mappings = _mod("megatron.core.tensor_parallel.mappings")
    if getattr(mappings._gather_along_first_dim, "_moe_rl_uneven", False):
        return
    original = mappings._gather_along_first_dim

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or len(set(int(s) for s in output_split_sizes)) <= 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        # gloo has no uneven list all_gather: pad every shard to the largest, gather, slice.
        sizes = [int(s) for s in output_split_sizes]
        biggest = max(sizes)
        padded = input_.new_zeros((biggest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((biggest * len(sizes),) + tuple(input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        parts = [gathered[i * biggest : i * biggest + n] for i, n in enumerate(sizes)]
        return torch.cat(parts, dim=0)

    gather_along_first_dim._moe_rl_uneven = True
    mappings._gather_along_first_dim = gather_along_first_dim


def _apply_module_devices():
    for name in ("megatron.core.pipeline_parallel.schedules",
                 "megatron.core.optimizer.optimizer",
                 "megatron.core.optimizer.clip_grads",
                 "megatron.core.optimizer.distrib_optimizer",
                 "megatron.core.optimizer.grad_scaler",
                 "megatron.core.models.common.embeddings.rope_utils",
                 "megatron.core.utils"):
        _mod(name).torch = _PROXY


_ORIGINAL_TYPE = torch.Tensor.type


def _apply_type_str():
    if getattr(torch.Tensor.type, "_moe_rl", False):
        return

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = _ORIGINAL_TYPE(self)
            if not self.is_cuda and name.startswith("torch.") and name.endswith("Tensor"):
                return "torch.cuda." + name[len("torch."):]
            return name
        return _ORIGINAL_TYPE(self, dtype, non_blocking, **kwargs)

    type_._moe_rl = True
    torch.Tensor.type = type_


def _apply_tensor_cuda():
    torch.Tensor.cuda = lambda self, *a, **k: self


def _apply_mla_te():
    mla = _mod("megatron.core.transformer.multi_latent_attention")
    mla.HAVE_TE = False


SUBSTITUTIONS: tuple[Substitution, ...] = (
    Substitution(
        "curdev",
        "models/common/embeddings/rotary_pos_embedding.py:162, transformer/moe/router.py:88-92,"
        " utils.py:631, tensor_parallel/mappings.py:141,148,181,442, tensor_parallel/layers.py:552,"
        " pipeline_parallel/p2p_communication.py:313,321, distributed/param_and_grad_buffer.py:800,806,"
        " dist_checkpointing/strategies/state_dict_saver.py:252",
        (("megatron.core.tensor_parallel.mappings", "device=torch.cuda.current_device()"),
         ("megatron.core.transformer.moe.router", "torch.cuda.current_device()")),
        _apply_curdev,
    ),
    Substitution(
        "rng",
        "tensor_parallel/random.py:235-238 (CudaRNGStatesTracker.add), :423 "
        "(model_parallel_cuda_manual_seed), _get_cuda_rng_state/_set_cuda_rng_state",
        (("megatron.core.tensor_parallel.random", "orig_rng_state = torch.cuda.get_rng_state()"),
         ("megatron.core.tensor_parallel.random", "def _set_cuda_rng_state")),
        _apply_rng,
    ),
    Substitution(
        "streams",
        "transformer/moe/token_dispatcher.py:445,871,873 (alltoall dispatcher streams),"
        " pipeline_parallel/p2p_communication.py:398, dist_checkpointing/strategies/filesystem_async.py:230",
        (("megatron.core.transformer.moe.token_dispatcher", "torch.cuda.Stream()"),
         ("megatron.core.pipeline_parallel.p2p_communication", "torch.cuda.synchronize()")),
        _apply_streams,
    ),
    Substitution(
        "tegemm",
        "transformer/moe/moe_utils.py:1192,1222 (te_general_gemm never defined without TE, :38)",
        (("megatron.core.transformer.moe.moe_utils", "te_general_gemm"),),
        _apply_tegemm,
    ),
    Substitution(
        "a2a_splits",
        "transformer/moe/moe_utils.py:1093 maybe_move_tensor_to_cpu converts only CUDA tensors;"
        " all_to_all split sizes at token_dispatcher.py:879-886 stay tensors",
        (("megatron.core.transformer.moe.moe_utils", "if torch.is_tensor(tensor) and tensor.is_cuda:"),
         ("megatron.core.transformer.moe.token_dispatcher", "maybe_move_tensor_to_cpu(")),
        _apply_a2a_splits,
    ),
    Substitution(
        "uneven_ag",
        "tensor_parallel/mappings.py:150 uneven list all_gather (gloo refuses), reached from"
        " token_dispatcher.py:696 when ETP>1 and EP>1",
        (("megatron.core.tensor_parallel.mappings",
          "torch.distributed.all_gather(output_tensor_list, input_, group=group)"),),
        _apply_uneven_ag,
    ),
    Substitution(
        "module_devices",
        "pipeline_parallel/schedules.py:596,983,2138 (device=\"cuda\"), optimizer/optimizer.py:481,485,907,"
        " optimizer/clip_grads.py:103,174, utils.py:1207, optimizer/distrib_optimizer.py,"
        " models/common/embeddings/rope_utils.py:62 (pin_memory=True, context parallelism)",
        (("megatron.core.pipeline_parallel.schedules", 'device="cuda"'),
         ("megatron.core.optimizer.clip_grads", "device='cuda'"),
         ("megatron.core.models.common.embeddings.rope_utils", "pin_memory=True")),
        _apply_module_devices,
    ),
    Substitution(
        "type_str",
        "optimizer/clip_grads.py:167, optimizer/distrib_optimizer.py:361,420,431,582"
        " (checks tensor.type() == 'torch.cuda.FloatTensor')",
        (("megatron.core.optimizer.clip_grads", "torch.cuda.FloatTensor"),
         ("megatron.core.optimizer.distrib_optimizer", "torch.cuda.FloatTensor")),
        _apply_type_str,
    ),
    Substitution(
        "tensor_cuda",
        "models/common/language_module/language_module.py:244 (tied embeddings at PP>1),"
        " optimizer/distrib_optimizer.py:1089 (checkpoint gather)",
        (("megatron.core.models.common.language_module.language_module", ".cuda()"),),
        _apply_tensor_cuda,
    ),
    Substitution(
        "mla_te",
        "transformer/multi_latent_attention.py:185 isinstance(.., TELinear) with TE mocked by"
        " extensions/transformer_engine.py:74-77",
        (("megatron.core.transformer.multi_latent_attention", "HAVE_TE"),),
        _apply_mla_te,
    ),
)


def check_anchors() -> list[str]:
    """Anchors missing from the installed Megatron, as readable strings (empty when all hold)."""
    missing = []
    for sub in SUBSTITUTIONS:
        for module, text in sub.anchors:
            src = inspect.getsource(_mod(module))
            if text not in src:
                missing.append(f"{sub.name}: {module} no longer contains {text!r}")
    return missing


def activate_cpu_mode() -> list[str]:
    """Apply every substitution (idempotent). Returns the names applied.

    Import ``transformers`` before calling this in a process that uses both:
    it inspects ``torch.cuda.Stream`` at import time.
    """
    if torch.cuda.is_available():
        raise RuntimeError("activate_cpu_mode() called on a machine with CUDA: the CPU "
                           "substitutions must never replace real CUDA behaviour")
    if _ACTIVE:
        return list(_ACTIVE)
    import megatron.core  # noqa: F401  (the substitutions patch its modules)

    for sub in SUBSTITUTIONS:
        sub.apply()
        _ACTIVE.append(sub.name)
    return list(_ACTIVE)


def active_substitutions() -> list[str]:
    return list(_ACTIVE)
