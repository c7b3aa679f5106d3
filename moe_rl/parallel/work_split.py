"""Work split over every rank of the job: each rank takes a contiguous share of a list of
items (prompts to generate, responses to score), and the results are gathered back in
item order on every rank. Used by the loop's in-process rollout and its reward scoring."""

from __future__ import annotations

from typing import Any, List

import numpy as np
import torch.distributed as dist


def my_share(n: int, rank: int, world: int) -> range:
    """Contiguous share ``rank`` of ``n`` items over ``world`` ranks (sizes differ by at most 1)."""
    bounds = np.linspace(0, n, world + 1).round().astype(int)
    return range(int(bounds[rank]), int(bounds[rank + 1]))


def gather_lists(local: list) -> list:
    """Every rank's list, concatenated in rank order (collective: every rank calls it and
    receives all)."""
    box: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, local)
    return [x for part in box for x in part]
