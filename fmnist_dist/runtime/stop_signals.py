"""Stopping on request: SIGTERM (SLURM, Kubernetes, torchrun), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's --signal).

The handler only records the signal; the training loop notices it at an optimizer-step boundary, agrees with
every other process on the step to stop at, saves a complete state there and exits with PREEMPTED_EXIT_CODE.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry". A requeued or restarted job
# running the same command with --resume auto continues where this one stopped.
PREEMPTED_EXIT_CODE = 75


class StopRequest:
    """Records a stop signal; a second Ctrl-C interrupts at once (as Python does by default)."""

    def __init__(self) -> None:
        self.signal_number = 0  # 0: none yet

    @property
    def requested(self) -> bool:
        return self.signal_number != 0

    def install(self) -> StopRequest:
        """Handle the stop signals from now on (main thread only, as Python's signal module requires)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = signum


class TrainingStopped(Exception):
    """Training stopped early on request, after saving a state; the message says how to continue."""
