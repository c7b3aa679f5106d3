"""Exactly reducible metrics: sums, counts, true min and max.

A step's metric is computed over the whole global batch, but the loss runs one
micro-batch at a time on each data-parallel rank. Averaging per-micro-batch means gives
the wrong answer whenever micro-batches hold different numbers of tokens, so every metric
here is kept as the parts that merge exactly:

- ``mean``: a numerator and a denominator, both summed (token or sequence weighted);
- ``sum``: a value summed (a micro-batch's share of a globally normalized loss);
- ``min`` / ``max``: the true extremum (identity +inf / -inf when there is nothing).

``merge`` combines micro-batches; ``pack`` / ``unpack`` turn the state into three flat
tensors (to all-reduce with SUM, MIN and MAX respectively, by the caller, which owns the
process group; this package has no torch.distributed). Values stay detached tensors until
``compute`` so that no micro-batch forces a device sync.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor


class Metrics:
    """Mergeable metric state; ``compute()`` gives ``{name: float}``."""

    def __init__(self) -> None:
        self.num: Dict[str, Tensor] = {}  # mean numerators and plain sums
        self.den: Dict[str, Tensor] = {}  # mean denominators (absent for plain sums)
        self.min: Dict[str, Tensor] = {}
        self.max: Dict[str, Tensor] = {}

    @staticmethod
    def _t(x) -> Tensor:
        if isinstance(x, Tensor):
            return x.detach().to(torch.float64).reshape(())
        return torch.tensor(float(x), dtype=torch.float64)

    def add_mean(self, name: str, numerator, denominator) -> "Metrics":
        """Accumulate a weighted mean as numerator / denominator."""
        n, d = self._t(numerator), self._t(denominator)
        if name in self.num:
            self.num[name] = self.num[name] + n.to(self.num[name].device)
            self.den[name] = self.den[name] + d.to(self.den[name].device)
        else:
            self.num[name], self.den[name] = n, d
        return self

    def add_sum(self, name: str, value) -> "Metrics":
        """Accumulate a plain sum (e.g. this micro-batch's share of the step loss)."""
        v = self._t(value)
        assert name not in self.den, f"{name} is a mean, not a sum"
        self.num[name] = self.num[name] + v.to(self.num[name].device) if name in self.num else v
        return self

    def add_min(self, name: str, value) -> "Metrics":
        v = self._t(value)
        self.min[name] = torch.minimum(self.min[name], v.to(self.min[name].device)) if name in self.min else v
        return self

    def add_max(self, name: str, value) -> "Metrics":
        v = self._t(value)
        self.max[name] = torch.maximum(self.max[name], v.to(self.max[name].device)) if name in self.max else v
        return self

    def add_masked(
        self, name: str, values: Tensor, mask: Tensor, *, min_name: str = "", max_name: str = ""
    ) -> "Metrics":
        """Mean of ``values`` where ``mask``; also the true min / max under the given names."""
        mask = mask.bool()
        v = values.detach().to(torch.float64)
        self.add_mean(name, torch.where(mask, v, 0.0).sum(), mask.sum())
        inf = torch.tensor(math.inf, dtype=torch.float64, device=v.device)
        if min_name:
            self.add_min(min_name, torch.where(mask, v, inf).min() if v.numel() else inf)
        if max_name:
            self.add_max(max_name, torch.where(mask, v, -inf).max() if v.numel() else -inf)
        return self

    def merge(self, other: "Metrics") -> "Metrics":
        """Fold ``other`` into self (micro-batches of one step); returns self."""
        for k, v in other.num.items():
            if k in other.den:
                self.add_mean(k, v, other.den[k])
            else:
                self.add_sum(k, v)
        for k, v in other.min.items():
            self.add_min(k, v)
        for k, v in other.max.items():
            self.add_max(k, v)
        return self

    def names(self) -> Dict[str, List[str]]:
        """The sorted key order used by ``pack`` (identical on every rank that logged the same names)."""
        sums = sorted(self.num)
        return {"sum": sums, "den": [k for k in sums if k in self.den], "min": sorted(self.min), "max": sorted(self.max)}

    def pack(self) -> Dict[str, Tensor]:
        """Flat float64 tensors: ``sum`` (numerators then denominators) to all-reduce SUM,
        ``min`` with MIN, ``max`` with MAX."""
        n = self.names()
        # one device for the stack: a value computed on the host may sit beside GPU ones
        cat = lambda xs: torch.stack([x.to(xs[0].device) for x in xs]) if xs else torch.zeros(0, dtype=torch.float64)  # noqa: E731
        return {
            "sum": cat([self.num[k] for k in n["sum"]] + [self.den[k] for k in n["den"]]),
            "min": cat([self.min[k] for k in n["min"]]),
            "max": cat([self.max[k] for k in n["max"]]),
        }

    def unpack(self, packed: Dict[str, Tensor]) -> "Metrics":
        """A new ``Metrics`` with self's names and the (reduced) values in ``packed``."""
        n = self.names()
        out = Metrics()
        s = packed["sum"]
        k_sum = len(n["sum"])
        for i, k in enumerate(n["sum"]):
            out.num[k] = s[i]
        for j, k in enumerate(n["den"]):
            out.den[k] = s[k_sum + j]
        for i, k in enumerate(n["min"]):
            out.min[k] = packed["min"][i]
        for i, k in enumerate(n["max"]):
            out.max[k] = packed["max"][i]
        return out

    def compute(self) -> Dict[str, float]:
        """Final values; a mean with zero denominator or an empty min/max is left out."""
        out: Dict[str, float] = {}
        for k, v in self.num.items():
            if k in self.den:
                d = float(self.den[k])
                if d > 0:
                    out[k] = float(v) / d
            else:
                out[k] = float(v)
        for k, v in list(self.min.items()) + list(self.max.items()):
            if math.isfinite(float(v)):
                out[k] = float(v)
        return out

    def get(self, name: str) -> Optional[float]:
        return self.compute().get(name)
