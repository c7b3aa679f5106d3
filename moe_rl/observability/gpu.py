"""GPU memory and utilisation of this process's device; nothing where there is no GPU.

``gpu/mem_used_gb`` and ``gpu/mem_total_gb`` (the driver's view, all processes),
``gpu/torch_max_allocated_gb`` (this process's allocator peak since the previous call, then
reset) and ``gpu/util_pct`` through nvidia-ml-py (``torch.cuda.utilization``), left out when
that package is not installed (``pip install -e '.[gpu]'`` brings it).
"""

from __future__ import annotations

from typing import Dict

import torch


def gpu_stats() -> Dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    dev = torch.cuda.current_device()
    free, total = torch.cuda.mem_get_info(dev)
    out = {"gpu/mem_used_gb": (total - free) / 2**30, "gpu/mem_total_gb": total / 2**30,
           "gpu/torch_max_allocated_gb": torch.cuda.max_memory_allocated(dev) / 2**30}
    torch.cuda.reset_peak_memory_stats(dev)
    try:
        out["gpu/util_pct"] = float(torch.cuda.utilization(dev))  # maps CUDA_VISIBLE_DEVICES to NVML
    except Exception:  # noqa: BLE001 - no nvidia-ml-py or no NVML driver: the key is absent
        pass
    return out
