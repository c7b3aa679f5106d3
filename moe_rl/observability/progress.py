"""Progress bars (tqdm) on rank 0: rollout samples of a step, and the run's steps."""

from __future__ import annotations


def progress_bar(total: int, desc: str, *, enabled: bool, leave: bool = False):
    """A tqdm bar, or a disabled one (same interface) when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=leave, dynamic_ncols=True)
