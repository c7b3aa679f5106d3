"""The weight sync's knobs, owned by ``moe_rl.weights``."""

from __future__ import annotations

import dataclasses

from moe_rl.weights.plan import DEFAULT_BUCKET_BYTES

TRANSPORTS = ("disk", "tensor", "distributed")
TENSOR_FORMATS = ("auto", "safetensors", "sglang")


@dataclasses.dataclass
class WeightSyncConfig:
    transport: str = "distributed"  # disk | tensor | distributed: the SGLang update call that carries the weights
    bucket_bytes: int = DEFAULT_BUCKET_BYTES  # most bytes per bucket; each sender rank holds at most two
    tensor_format: str = "auto"  # tensor transport payload: safetensors | sglang (SGLang's serializer, same GPUs) | auto
    disk_dir: str = ""  # disk transport: where weight_v<version>/ directories go (seen by trainer and engines)
    keep_disk_versions: int = 1  # disk transport: older weight_v* directories beyond this many are removed
    group_address: str = ""  # distributed transport: rank 0's address the engines can reach ("" = the job's MASTER_ADDR)
    group_port: int = 0  # distributed transport: rendezvous port (0 = a free port)
    group_name: str = "moe_rl_weights"  # distributed transport: the weight-update group's name
    engine_ranks: int = 1  # distributed transport: ranks each engine joins with (its TP size)
    timeout_s: float = 300.0  # rendezvous and broadcast deadline of the distributed transport
    flatten_buckets: bool = True  # distributed transport: one broadcast per bucket (SGLang's flattened_bucket), not per tensor
    verify_checksums: bool = True  # per-tensor CRC-32 checked by the engine (where it can; the embedded engine does)
    probe: bool = True  # after every sync, compare the engines' log-probs on a fixed batch with the trainer's
    probe_interval: int = 1  # probe after every N-th sync only (the first one always); 1 = every sync
    probe_prompts: int = 2  # probe batch: prompts of random token ids
    probe_prompt_len: int = 8  # tokens per probe prompt
    probe_new_tokens: int = 8  # greedy tokens each engine generates per probe prompt
    probe_seed: int = 1234  # seed of the probe prompts (the same batch every sync)
    probe_max_logprob_diff: float = 0.1  # stop the run when weights/probe_logprob_diff (mean |diff|) exceeds it

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"weights.transport ({self.transport!r}) must be one of {list(TRANSPORTS)}")
        if self.tensor_format not in TENSOR_FORMATS:
            raise ValueError(f"weights.tensor_format ({self.tensor_format!r}) must be one of {list(TENSOR_FORMATS)}")
        if self.bucket_bytes < 1024:
            raise ValueError(f"weights.bucket_bytes ({self.bucket_bytes}) must be at least 1024")
        if self.transport == "disk" and not self.disk_dir:
            raise ValueError("weights.transport 'disk' needs weights.disk_dir (a directory the engines can read)")
        for name in ("probe_prompts", "probe_prompt_len", "probe_new_tokens", "probe_interval", "engine_ranks",
                     "keep_disk_versions"):
            if getattr(self, name) < 1:
                raise ValueError(f"weights.{name} ({getattr(self, name)}) must be >= 1")
        if not self.probe_max_logprob_diff > 0:
            raise ValueError(f"weights.probe_max_logprob_diff ({self.probe_max_logprob_diff}) must be > 0")

    def probe_due(self, version: int | str) -> bool:
        """Whether the sync to policy ``version`` (an int or the engines' version string) ends
        with the probe: every ``probe_interval``-th version, and the first sync of a run
        (version 0 or 1) whatever the interval; a version that is no step count, always."""
        if not self.probe:
            return False
        try:
            v = int(version)
        except (TypeError, ValueError):
            return True
        return v <= 1 or v % self.probe_interval == 0
