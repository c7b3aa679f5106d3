"""``RewardConfig``: which named rewards score each response, and how they are evaluated.

Every reward is a ``RewardSpec``: a name (the key in the per-sample reward dict and in
``algorithm.reward_names`` for GDPO), a function (a built-in name from ``registry.BUILTIN``
or a ``module:function`` string) and keyword arguments passed to it. The loop's scalar
reward is ``sum(weight * value)``; GDPO instead receives the dict and its own weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List

EXECUTORS = ("process", "thread", "serial")
ON_ERROR = ("raise", "zero")


@dataclass
class SandboxConfig:
    """Limits of the child process that runs model-written code (``sandbox.py``)."""

    wall_timeout_s: float = 10.0  # wall-clock limit; the whole process group is killed after it
    cpu_time_s: int = 5  # RLIMIT_CPU seconds per process (SIGXCPU, then SIGKILL)
    memory_mb: int = 1024  # RLIMIT_AS address-space limit per process, in MiB
    max_processes: int = 64  # RLIMIT_NPROC (enforced only for a non-root uid, see sandbox.py)
    max_output_bytes: int = 1_000_000  # stdout/stderr kept per stream; RLIMIT_FSIZE for files
    allow_subprocess: bool = False  # False: fork/exec/spawn raise PermissionError in the child
    isolate_network: bool = True  # new net namespace (unshare) when possible; sockets blocked always
    python: str = ""  # interpreter for the child; "" = the current sys.executable

    def __post_init__(self) -> None:
        if self.wall_timeout_s <= 0:
            raise ValueError(f"sandbox.wall_timeout_s ({self.wall_timeout_s}) must be > 0")
        if self.cpu_time_s < 1:
            raise ValueError(f"sandbox.cpu_time_s ({self.cpu_time_s}) must be >= 1")
        if self.memory_mb < 64:
            raise ValueError(f"sandbox.memory_mb ({self.memory_mb}) must be >= 64 (the interpreter needs it)")
        if self.max_processes < 1:
            raise ValueError(f"sandbox.max_processes ({self.max_processes}) must be >= 1")
        if self.max_output_bytes < 1:
            raise ValueError(f"sandbox.max_output_bytes ({self.max_output_bytes}) must be >= 1")


@dataclass
class RewardSpec:
    """One named reward."""

    name: str = "math"  # key of this reward in the per-sample dict (and GDPO's reward_names)
    fn: str = "math"  # built-in name (registry.BUILTIN) or "package.module:function"
    weight: float = 1.0  # weight in the scalar reward sum(weight * value)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # extra keyword arguments for fn

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("reward name must be non-empty")
        if not self.fn:
            raise ValueError(f"reward {self.name!r}: fn must be a built-in name or 'module:function'")


@dataclass
class RewardConfig:
    """All rewards of a run and how they are evaluated."""

    rewards: List[RewardSpec] = field(default_factory=lambda: [RewardSpec()])  # named rewards per sample
    executor: str = "process"  # process | thread | serial; only process stops a runaway reward (evaluator.py)
    num_workers: int = 4  # worker processes or threads evaluating samples concurrently
    timeout_s: float = 60.0  # limit for one reward call; process: worker killed; thread: reported, its thread runs on
    on_error: str = "raise"  # raise | zero: on a reward that raises, is non-finite or times out; raise stops at once
    progress: bool = True  # show a tqdm progress bar over the batch
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # code reward limits

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ValueError(f"rewards.executor={self.executor!r} is not one of {', '.join(EXECUTORS)}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"rewards.on_error={self.on_error!r} is not one of {', '.join(ON_ERROR)}")
        if self.num_workers < 1:
            raise ValueError(f"rewards.num_workers ({self.num_workers}) must be >= 1")
        if self.timeout_s <= 0:
            raise ValueError(f"rewards.timeout_s ({self.timeout_s}) must be > 0")
        if not self.rewards:
            raise ValueError("rewards.rewards is empty: give at least one named reward")
        # OmegaConf hands nested dataclasses back as dataclasses; plain dicts come from Python.
        self.rewards = [r if isinstance(r, RewardSpec) else RewardSpec(**r) for r in self.rewards]
        if isinstance(self.sandbox, dict):
            self.sandbox = SandboxConfig(**self.sandbox)
        names = [r.name for r in self.rewards]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"rewards.rewards names must be unique; repeated: {', '.join(dup)}")

    @property
    def weights(self) -> Dict[str, float]:
        """{name: weight}, e.g. for GDPO's reward_weights."""
        return {r.name: r.weight for r in self.rewards}

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)
