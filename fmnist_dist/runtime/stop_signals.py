"""Stopping on request: SIGTERM (SLURM, Kubernetes, torchrun), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's --signal).

The handler only records the signal; the training loop notices it at an optimizer-step boundary, agrees with
every other process on the step to stop at, saves a complete state there and exits with PREEMPTED_EXIT_CODE.

A Python signal handler runs only between two Python instructions of the main thread, so a process blocked in a
collective or in forming the process group (C++ that waits for a process that is gone) would never notice the
signal: torch's launcher sends SIGTERM and kills it 30 s later, silently. A watch thread, woken by every stop
signal through Python's wakeup descriptor, ends such a process: when the main thread has not moved for
STUCK_AFTER_S seconds after a stop signal, it prints one line naming where it waited and exits 128 + signal.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from types import FrameType

from fmnist_dist.runtime.job_exit import formed_process_group, record_for_launcher

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry". A requeued or restarted job
# running the same command with --resume auto continues where this one stopped.
PREEMPTED_EXIT_CODE = 75
# Well over the time a process waits for its peers' state save at a stop (a second or two), and well under the
# 30 s after which torch's launcher and SLURM (KillWait) kill a process that ignored their SIGTERM.
STUCK_AFTER_S = 15.0
_LOOK_EVERY_S = 0.5
# The wait alone cannot tell a lost peer from a busy one (a slow download or W&B start on the main process):
# the line says both, and the other processes' output tells which.
_PEER_FAILED_OR_BUSY = (
    "another process of this job failed or is still busy (the first error in the job's output, on the node where "
    "it happened, says which, if any)"
)
_NOTHING_KEPT = "nothing since the newest saved state is kept"


class StopRequest:
    """Records a stop signal; a second Ctrl-C interrupts at once (as Python does by default)."""

    def __init__(self) -> None:
        self.signal_number = 0  # 0: none yet

    @property
    def requested(self) -> bool:
        return self.signal_number != 0

    def install(self) -> StopRequest:
        """Handle the stop signals from now on (main thread only, as Python's signal module requires), and end
        the process if one arrives while it is blocked (see the module's docstring)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._record)
        _watch_for_stuck_stops()
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = signum


class TrainingStopped(Exception):
    """Training stopped early on request, after saving a state; the message says how to continue."""


@functools.cache  # one watch thread per process, however often a StopRequest is installed
def _watch_for_stuck_stops() -> None:
    """Start the watch thread, fed each signal's number by Python's C-level handler (which runs at once, even
    while the main thread is blocked)."""
    readable, writable = os.pipe()
    os.set_blocking(writable, False)  # as signal.set_wakeup_fd requires
    signal.set_wakeup_fd(writable, warn_on_full_buffer=False)
    # A forked child (a DataLoader worker) keeps neither this thread nor a use for the pipe.
    os.register_at_fork(after_in_child=_forget_wakeup_descriptor)
    threading.Thread(target=_watch, args=(readable,), name="fmnist-dist stop watch", daemon=True).start()


def _forget_wakeup_descriptor() -> None:
    with contextlib.suppress(ValueError):  # forked from a thread other than the main one: nothing was set there
        signal.set_wakeup_fd(-1)


def _watch(readable: int) -> None:
    while True:
        for signum in os.read(readable, 64):
            if signum in STOP_SIGNALS:
                _end_if_stuck(signal.Signals(signum))


def _end_if_stuck(signum: signal.Signals) -> None:
    """Return once the main thread moves; if it stays at one instruction for STUCK_AFTER_S, end the process."""
    main = threading.main_thread().ident or 0  # set: the main thread has started
    still_since, last = time.monotonic(), None
    while True:
        frame = sys._current_frames().get(main)
        if frame is None:  # the interpreter is shutting down
            return
        here = (frame, frame.f_lasti)
        if here != last:
            if last is not None:
                return
            still_since, last = time.monotonic(), here
        elif time.monotonic() - still_since >= STUCK_AFTER_S:
            _give_up(signum, frame)
        time.sleep(_LOOK_EVERY_S)


def _give_up(signum: signal.Signals, frame: FrameType) -> None:
    try:
        line = stuck_message(signum, frame)
    except Exception:  # naming the place is a courtesy: the process must end, with a line, whatever happens there
        line = f"stopped by {signum.name} without saving, after waiting {STUCK_AFTER_S:.0f} s; {_NOTHING_KEPT}"
    record_for_launcher(line)
    with contextlib.suppress(OSError):  # stderr is gone too: the launcher's report still has the line
        os.write(2, f"fmnist-dist: error: {line}\n".encode())
    os._exit(128 + signum)


def stuck_message(signum: signal.Signals, frame: FrameType) -> str:
    """The line for a process that stopped waiting: where it waited, and what that means."""
    where = f"{frame.f_code.co_name}, {frame.f_code.co_filename}:{frame.f_lineno}"
    collective = _distributed_call(frame)
    if collective:
        return (
            f"stopped by {signum.name} after waiting {STUCK_AFTER_S:.0f} s for the job's other processes in "
            f"torch.distributed's {collective}: {_PEER_FAILED_OR_BUSY}; {_NOTHING_KEPT}"
        )
    step = _ddp_step_talking_to_peers(frame)
    if step:
        return (
            f"stopped by {signum.name} after {STUCK_AFTER_S:.0f} s in DistributedDataParallel's {step} ({where}), "
            f"where it may wait for the job's other processes: {_PEER_FAILED_OR_BUSY}, or this process's {step} "
            f"itself takes this long; {_NOTHING_KEPT}"
        )
    return (
        f"stopped by {signum.name} without saving ({signum.name} arrived while it waited {STUCK_AFTER_S:.0f} s in "
        f"{where}); {_NOTHING_KEPT}"
    )


def _ddp_step_talking_to_peers(frame: FrameType) -> str | None:
    """The step of DistributedDataParallel ("backward" or "forward") that may wait for the other processes in C++
    called from this, the innermost, frame; None elsewhere, and in a process that is alone.

    There is no torch.distributed frame on the stack there: backward's gradient all-reduce runs from the
    autograd engine's hooks, and forward's bucket rebuild and buffer broadcast from DDP's `_pre_forward`. The
    innermost frame, not the whole stack, tells these from the model's own code running under DDP.
    """
    if _job_processes() == 1:
        return None
    module, name = _module_of(frame), frame.f_code.co_name
    if module.startswith("torch.autograd") and "backward" in name:
        return "backward"
    if module.startswith("torch.nn.parallel.distributed"):
        return "forward"
    return None


def _distributed_call(frame: FrameType | None) -> str | None:
    """The outermost torch.distributed function on the stack (not the logging decorators' `wrapper` around it)."""
    found = None
    while frame is not None:
        name = frame.f_code.co_name
        if _module_of(frame).startswith("torch.distributed") and name != "wrapper":
            found = name
        frame = frame.f_back
    return found


def _module_of(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", ""))


def _job_processes() -> int:
    """The world size of the job's process group; 1 before it forms, without one, or after it is destroyed."""
    distributed = formed_process_group()
    if distributed is None:
        return 1
    # A group destroyed since raises here (ValueError, or AttributeError inside torch 2.14's _get_default_group).
    with contextlib.suppress(Exception):
        return int(distributed.get_world_size())
    return 1
