"""``CheckpointConfig``: when the run saves itself and how many saves it keeps."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CheckpointConfig:
    """Run checkpoints under ``<output_dir>/checkpoints`` (see ``run_state.py``). A resume whose
    config changes what the run trains (optimizer, algorithm, data, batch, sampling, rewards,
    seed: ``run_state.RESUME_FIXED``) is refused, naming the changes, unless ``resume_changes``
    lists them; the new values then apply from the resumed step."""

    interval: int = 0  # save every this many steps (0 = only at the end of the run)
    save_at_end: bool = True  # save after the last step
    keep: int = 2  # newest complete checkpoints kept on disk (0 = keep all)
    save_hf: bool = False  # also write the policy's HF weights into each checkpoint's hf/ (transformers / SGLang load it)
    resume: bool = True  # re-running with the same output_dir resumes from its newest complete checkpoint
    resume_changes: list = field(default_factory=list)  # fields a resume may change, e.g. [optim.lr, data]
    save_on_signal: str = "SIGUSR1"  # on this signal: finish the step, save, exit 5 ('' = off; see slurm/)

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ValueError(f"checkpoint.interval ({self.interval}) must be >= 0")
        if self.keep < 0:
            raise ValueError(f"checkpoint.keep ({self.keep}) must be >= 0")
        from moe_rl.parallel.stop_signal import parse_signal

        parse_signal(self.save_on_signal)
        bad = [x for x in self.resume_changes if not isinstance(x, str) or not x]
        if bad:
            raise ValueError(f"checkpoint.resume_changes must list dotted field names, got {bad!r}")
