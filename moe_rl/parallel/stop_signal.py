"""Save and stop on a signal, before the scheduler's kill (``checkpoint.save_on_signal``).

A cluster ends a job at its time limit or on preemption with SIGTERM, then SIGKILL a few
seconds later (Slurm's ``KillWait``, 30 s by default): far less than a checkpoint of a large
model takes, so everything since the last periodic checkpoint is lost. Slurm can warn the job
earlier: ``#SBATCH --signal=B:USR1@300`` sends SIGUSR1 to the batch script 300 s before the
limit, and the templates in ``slurm/`` forward it to the training ranks. On one node send it
to the ranks themselves (``pkill -USR1 -f moe_rl.launch``; not to ``torchrun``, whom SIGUSR1
would end).

A rank that receives the signal only records it (the handler runs no collective and touches
no state). At the end of each loop step every rank asks :meth:`StopSignal.agreed` (one
all-reduce of one integer): when any rank was signalled, all of them save a checkpoint after
that step (unless the step's periodic one was just saved) and the launcher exits with
:data:`EXIT_SAVED_ON_SIGNAL`. Re-running the same command resumes from that checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

import torch
import torch.distributed as dist

from moe_rl.parallel.collectives import all_reduce

EXIT_SAVED_ON_SIGNAL = 5  # moe_rl.launch's exit code after a checkpoint saved on the signal

UNCATCHABLE = ("SIGKILL", "SIGSTOP")


def parse_signal(name: str) -> Optional[signal.Signals]:
    """``signal.Signals`` for a name such as ``"SIGUSR1"`` or ``"USR1"``; None for ``""`` (off).
    ValueError naming the value for anything else, or for a signal no handler can catch."""
    if name == "":
        return None
    full = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
    if full in UNCATCHABLE or full not in signal.Signals.__members__:
        raise ValueError(f"checkpoint.save_on_signal ({name!r}) must name a signal a process can catch, such as "
                         "SIGUSR1, SIGUSR2 or SIGTERM, or be '' (off)")
    return signal.Signals[full]


class StopSignal:
    """The signal that asks the run to save and stop, and whether it came (see the module)."""

    def __init__(self, name: str) -> None:
        self.signum = parse_signal(name)
        self.received: Optional[signal.Signals] = None
        self._previous = None
        if self.signum is not None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received = signal.Signals(signum)

    def agreed(self) -> bool:
        """Whether any rank received the signal (collective over the world: every rank calls
        it at the same point of the loop)."""
        if self.signum is None:
            return False
        t = torch.tensor([1 if self.received is not None else 0], dtype=torch.int64)
        if dist.is_available() and dist.is_initialized():
            t = all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def close(self) -> None:
        """Put the previous handler back."""
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None


class SavedOnSignal(Exception):
    """The loop saved a checkpoint because of the stop signal and ended the run early."""

    def __init__(self, signame: str, next_step: int, path: str) -> None:
        super().__init__(f"{signame}: saved checkpoint {path} (next step {next_step}); run the same command "
                         "again to resume")
        self.next_step, self.path = next_step, path
