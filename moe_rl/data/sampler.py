"""Deterministic, resumable order over a dataset: a fresh permutation per epoch.

Epoch ``e``'s order is a pure function of ``(seed, e)`` (NumPy's PCG64 seeded with both),
so the state is just ``(epoch, position)``: a run resumed from ``state_dict()`` yields
exactly the indices it had not yet consumed, in the same order, none lost or repeated.
"""

from __future__ import annotations

from typing import Any, Dict, List

import numpy as np


class ResumableSampler:
    """Endless index stream over ``num_items`` items, epoch after epoch."""

    def __init__(self, num_items: int, *, seed: int = 0, shuffle: bool = True):
        if num_items < 1:
            raise ValueError(f"sampler needs at least one item, got num_items={num_items}")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> List[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        return rng.permutation(self.num_items).tolist()

    def epoch_order(self, epoch: int) -> List[int]:
        """The full index order of ``epoch`` (for inspection and tests)."""
        return list(self._epoch_order(epoch))

    def peek(self) -> int:
        """The next index, without consuming it."""
        return self._order[self.position]

    def advance(self) -> None:
        self.position += 1
        if self.position == self.num_items:
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)

    def take(self, k: int) -> List[int]:
        """The next ``k`` indices (crossing into the next epoch as needed)."""
        out = []
        for _ in range(k):
            out.append(self.peek())
            self.advance()
        return out

    def __iter__(self):
        while True:
            idx = self.peek()
            self.advance()
            yield idx

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "shuffle": self.shuffle, "num_items": self.num_items}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key in ("seed", "shuffle", "num_items"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{key}={getattr(self, key)!r}; the dataset or seed changed since the checkpoint")
        if not 0 <= state["position"] < self.num_items or state["epoch"] < 0:
            raise ValueError(f"sampler state epoch={state['epoch']} position={state['position']} "
                             f"is out of range for {self.num_items} items")
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)
