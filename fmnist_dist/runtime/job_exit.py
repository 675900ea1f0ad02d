"""How a process leaves the job: its one line in the launcher's report, a clean process group teardown, and
clean-up steps that never hide the error that ended the job.

torch's elastic launcher (`accelerate launch`, torchrun) reports each failed process from the error file named
by TORCHELASTIC_ERROR_FILE, in the format of torch.distributed.elastic's `ErrorHandler.record_exception`;
without one it says `error_file: <N/A>`. `record_for_launcher` writes our one line there instead of a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from types import ModuleType
from typing import TypeVar

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.runtime.launcher_death import LAUNCHER_MARK

ERROR_FILE_VARIABLE = "TORCHELASTIC_ERROR_FILE"  # set by torch's elastic agent for each process it starts
T = TypeVar("T")


class ThisProcessStopped(UsageError):
    """An error of this process alone (its peers are gone, so it cannot share it with them): every process that
    hits it says so, not only each node's first."""


def another_process_failed(how: str) -> ThisProcessStopped:
    """The error of a process that stopped because another one of the job is gone; `how` says how it noticed."""
    return ThisProcessStopped(
        f"another process of this job failed, so this one stopped ({how}); the first error in the job's output, "
        "on the node where it happened (or in its launcher's log), says why"
    )


def record_for_launcher(message: str) -> None:
    """Give torch's launcher this process's error (one line) for its report of failed processes.

    Does nothing outside torch's launcher; never raises (the launcher then reports `<N/A>`, as before).
    """
    path = os.environ.get(ERROR_FILE_VARIABLE)
    if not path:
        return
    timestamp = str(int(time.time()))
    # The launcher shows py_callstack as the failure's "traceback": here the line itself.
    data = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": timestamp}}}
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        with open(partial, "w") as file:
            json.dump(data, file)
        os.replace(partial, path)  # the launcher never reads half a file
    except OSError:
        pass


def leave_job() -> None:
    """Leave the job cleanly, once this process's outcome is decided: its exit code is the one reported.

    torch's launcher sends SIGTERM to the other processes as soon as one has exited with an error, while they
    may be exiting with the same error themselves (which takes seconds with torch loaded); the default action
    that Python restores for it during its exit would replace their exit code with -15. So a launched process
    ignores SIGTERM from here on, and then destroys its process group: left to the interpreter's exit, gloo's
    threads are torn down in no particular order, and a process can die of SIGABRT ("terminate called without
    an active exception") after its own error was reported. A teardown that fails is one warning line.
    """
    if LAUNCHER_MARK in os.environ:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    distributed = formed_process_group()
    if distributed is not None:
        clean_up("closing the process group", distributed.destroy_process_group)


def formed_process_group() -> ModuleType | None:
    """torch.distributed once this process has formed its process group, else None; a process that never
    imported torch.distributed has none, and this does not import it."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed
    return None


def clean_up(step: str, action: Callable[[], object], during: BaseException | None = None) -> None:
    """Run one clean-up step; if it fails, the job's outcome stays as it was, with one warning line.

    Args:
        step: what the step does, for the warning ("releasing the lock of --output-dir ...").
        during: the error that is ending the job, if any: the warning is added to it as a note, which the
            command line prints after the error's own line; else it is printed at once.
    """
    try:
        action()
    except Exception as error:
        warning = f"{step} failed ({type(error).__name__}: {first_line(error)})"
        if during is None:
            print(f"fmnist-dist: warning: {warning}", file=sys.stderr, flush=True)
        else:  # BaseException.add_note, also on Python 3.10
            during.__notes__ = [*getattr(during, "__notes__", []), warning]  # type: ignore[attr-defined]


def clean_up_warnings(error: BaseException | None) -> list[str]:
    """The warnings of the clean-up steps that failed while `error` ended the job (none without an error)."""
    return list(getattr(error, "__notes__", []))


@contextmanager
def released_after(resource: AbstractContextManager[T], step: str) -> Iterator[T]:
    """`with resource:`, except that a failure of its exit (the clean-up) never replaces the block's error, nor
    fails a block that succeeded: it becomes one warning line (see `clean_up`)."""
    value = resource.__enter__()
    try:
        yield value
    except BaseException as error:
        clean_up(step, partial(resource.__exit__, type(error), error, error.__traceback__), during=error)
        raise
    clean_up(step, partial(resource.__exit__, None, None, None))
