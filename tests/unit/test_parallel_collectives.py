"""Host-side collectives (``moe_rl.parallel.collectives``): the device a reduction crosses
follows the group's backend, and no module reduces a host tensor behind its back.

NCCL refuses CPU tensors, and CPU CI runs gloo only, which takes anything: a count built with
``torch.tensor([...])`` and handed to ``dist.all_reduce`` passes every CPU test and fails the
first GPU run. The source check below is the CPU-side guard for that class of bug."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
import torch.distributed as dist

from moe_rl.parallel import collectives

ROOT = Path(__file__).resolve().parents[2]

# The only places that call torch.distributed's tensor collectives directly, with why every
# tensor they pass lives on the model's device (activations, logits, gradients, weight shards,
# buffers allocated with device=), never on the host. Anything else goes through
# moe_rl.parallel.collectives. Keyed by file and enclosing function, so a host-tensor reduction
# added beside a listed one is still caught.
DEVICE_TENSOR_SITES = {
    "moe_rl/parallel/collectives.py::all_reduce": "the helpers themselves",
    "moe_rl/parallel/collectives.py::broadcast": "the helpers themselves",
    "moe_rl/parallel/collectives.py::all_gather_values": "the helpers themselves",
    "moe_rl/train/logprobs.py::forward": "vocab-parallel logits (max, sums) on the model's device",
    "moe_rl/train/logprobs.py::backward": "the hidden-state gradient",
    "moe_rl/models/cp_attention.py::forward": "attention activations",
    "moe_rl/models/cp_attention.py::backward": "attention gradients",
    "moe_rl/parallel/context_parallel.py::forward": "activations of the sequence",
    "moe_rl/routing/layout.py::_all_gather_rows": "routes captured by router hooks, on the router's device",
    "moe_rl/weights/export.py::_gather": "weight shards, on the parameters' device",
    "moe_rl/weights/transport/distributed.py::ship": "exported weight tensors (parameters' device)",
    "moe_rl/weights/transport/distributed.py::_receive": "receive buffers allocated on comm_device()",
    "moe_rl/weights/probe.py::trainer_logprobs": "log-probs allocated on the trainer's device",
    "moe_rl/rollout/in_process.py::sync_weights": "weight buckets moved to comm_device()",
}
TENSOR_COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "gather", "scatter", "reduce", "reduce_scatter",
                      "all_to_all", "send", "recv", "all_gather_into_tensor", "reduce_scatter_tensor"}


def _collective_sites(path: Path, rel: str):
    """``(rel::enclosing function, collective, line)`` of every ``dist.<collective>(...)`` call."""

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else where
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == "dist"
                    and child.func.attr in TENSOR_COLLECTIVES):
                yield f"{rel}::{where}", child.func.attr, child.lineno
            yield from visit(child, inner)

    yield from visit(ast.parse(path.read_text()), "<module>")


def test_host_tensors_are_reduced_only_through_the_helpers():
    found: dict[str, list] = {}
    for path in sorted((ROOT / "moe_rl").rglob("*.py")):
        for site, op, line in _collective_sites(path, path.relative_to(ROOT).as_posix()):
            found.setdefault(site, []).append((op, line))
    stray = {site: calls for site, calls in found.items() if site not in DEVICE_TENSOR_SITES}
    assert not stray, ("torch.distributed collectives outside the known device-tensor sites (a host tensor "
                       "there fails on NCCL): use moe_rl.parallel.collectives.all_reduce, or list the site with "
                       f"why its tensors are on the device: {stray}")
    gone = set(DEVICE_TENSOR_SITES) - set(found)
    assert not gone, f"listed sites without collectives any more (drop them from the list): {gone}"


def test_comm_device_is_the_current_gpu_on_nccl_and_the_host_otherwise(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives.comm_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collectives.comm_device() == torch.device("cpu")


def test_all_reduce_broadcast_and_max_over_world_on_gloo(one_rank_world):
    t = torch.tensor([2, 5], dtype=torch.int64)
    out = collectives.all_reduce(t, op=dist.ReduceOp.MAX)
    assert out.device == t.device and out.tolist() == [2, 5]
    assert collectives.broadcast(torch.tensor([3.5]), src=0).tolist() == [3.5]
    assert collectives.max_over_world(1.5) == 1.5
    assert collectives.comm_device() == torch.device("cpu")

