"""Contracts of the reward stage: what a reward function receives and what a batch returns."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Dict, List

if TYPE_CHECKING:  # torch is imported lazily: process-pool workers never need it
    import torch


@dataclasses.dataclass
class RewardInput:
    """One response to score, with the ground truth of its prompt.

    ``label`` is task-specific: a math answer string, ``{"numbers": [...], "target": n}``
    for countdown, ``{"tests": [{"input": ..., "output": ...}]}`` for code. A reward
    function is ``fn(sample: RewardInput, **kwargs) -> float`` (or an ``async def``).
    """

    response: str  # decoded response text (no prompt)
    label: Any = None  # ground truth of the prompt (see above)
    prompt: str = ""  # decoded prompt text, for rewards that need it
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)  # dataset extras


@dataclasses.dataclass
class RewardBatch:
    """Named rewards of a batch: ``values[i][name]`` is reward ``name`` of response ``i``."""

    values: List[Dict[str, float]]  # [B] dicts name -> value
    weights: Dict[str, float]  # name -> weight of the scalar sum
    errors: List[Dict[str, str]] = dataclasses.field(default_factory=list)  # [B] name -> error text

    @property
    def names(self) -> List[str]:
        return list(self.weights)

    def by_name(self) -> Dict[str, "torch.Tensor"]:
        """{name: [B] float32 tensor}: the input of the multi-reward (GDPO) estimator."""
        import torch

        return {n: torch.tensor([v[n] for v in self.values], dtype=torch.float32) for n in self.weights}

    def total(self) -> "torch.Tensor":
        """[B] float32 weighted sum: the input of single-reward estimators."""
        import torch

        out = torch.zeros(len(self.values), dtype=torch.float32)
        for n, t in self.by_name().items():
            out += self.weights[n] * t
        return out
