"""Shared fixtures: tiny HF checkpoints of every family, a 1-rank process group, the gpu marker.
Multi-process launch helpers live in ``tests/launcher.py``."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory):
    """{family: directory} of tiny random HF checkpoints (built once per session)."""
    from moe_rl.models.tiny import TINY_FAMILIES, save_tiny_hf

    base = tmp_path_factory.mktemp("tiny_hf")
    return {f: save_tiny_hf(f, base / f, seed=0) for f in TINY_FAMILIES}


@pytest.fixture
def one_rank_world(tmp_path):
    """A 1-rank gloo process group in this process (for code that calls collectives)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg_store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
