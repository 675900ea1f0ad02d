"""Errors across the processes of a job: a failure on one process ends every process, and reaches the user.

A process that fails alone while the others wait in a collective leaves them waiting until a timeout, and its
message is lost when it is not the main process. `fail_together` runs a stretch of work that holds no
collective and ends it with one exchange of errors, so every process leaves it together; each node's local
main process then reports its own node's errors, once per node. `lost_peers_reported` turns the error of a
collective whose peer died (gloo's "Connection closed by peer") into one line that says where to look.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeAlias, TypeVar, cast

import torch.distributed as dist
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.runtime.job_exit import another_process_failed

T = TypeVar("T")
Processes: TypeAlias = PartialState | Accelerator  # both know the job's processes and this one's place among them
# gloo raises a plain RuntimeError when a peer's connection drops; NCCL and the stores raise DistError.
_LOST_PEER = re.compile(r"gloo/transport|Connection (closed|reset) by peer|Broken pipe")


@dataclass(frozen=True)
class Failure:
    """One process's error, as the other processes learn of it."""

    process: int
    node: int  # the global index of the node's first process: unique per node, also for nodes on one host
    host: str
    message: str

    def where(self) -> str:
        return f"process {self.process} on {self.host}"


@contextmanager
def fail_together(processes: Processes) -> Iterator[None]:
    """Run a block in which no collective happens; if it fails on any process, every process raises at its end.

    Every process must enter the block (its end is one all-gather, which also serves as a barrier).

    Raises:
        UsageError: on every process when any failed; the message holds the distinct errors of this node's
            processes (one per line), or, on a node where none failed, one line naming a failed process.
        Exception: a process's own error that is not a UsageError (a bug) is re-raised there unchanged.
    """
    own: Exception | None = None
    try:
        yield
    except Exception as error:
        own = error
    failures = _exchange(processes, own)
    if own is not None and not isinstance(own, UsageError):
        raise own
    if failures:
        raise UsageError(_report_for_node(failures, _node(processes))) from own


def on_main_process_first(processes: Processes, work: Callable[[], T]) -> T:
    """`work()` on the main process, then on the others (downloads before readers); all fail if any fails.

    Unlike Accelerate's `main_process_first` (a barrier after the main process's turn), an error on the main
    process reaches the others instead of leaving them waiting at the barrier.
    """
    result: T | None = None
    for main_turn in (True, False):
        with fail_together(processes):
            if processes.is_main_process == main_turn:
                result = work()
    return cast(T, result)  # every process ran `work` in one of the two turns


@contextmanager
def lost_peers_reported() -> Iterator[None]:
    """Turn a collective's failure because another process of the job died into one line, which this process
    prints whatever its place on its node (the process that would print its node's errors may be the one lost).

    Raises:
        ThisProcessStopped: a collective failed because a peer is gone (or did not answer within the timeout).
    """
    try:
        yield
    except Exception as error:
        if not _is_lost_peer(error):
            raise
        raise another_process_failed(_collective_error(error)) from error


def _exchange(processes: Processes, own: Exception | None) -> list[Failure]:
    """Every process's failure in the block, gathered on every process (an empty list when all succeeded)."""
    failure = None
    if own is not None:
        message = str(own) if isinstance(own, UsageError) else f"{type(own).__name__}: {first_line(own)}"
        failure = Failure(processes.process_index, _node(processes), socket.gethostname(), message)
    if processes.num_processes == 1:
        return [failure] if failure else []
    return [f for f in gather_object([failure]) if f is not None]


def _node(processes: Processes) -> int:
    return processes.process_index - processes.local_process_index


def _report_for_node(failures: list[Failure], node: int) -> str:
    here = list(dict.fromkeys(f.message for f in failures if f.node == node))  # distinct, in process order
    if here:
        return "\n".join(here)
    first = failures[0]
    return f"{first.where()} failed, so the job stopped: {first.message} (that node's output has the details)"


def _collective_error(error: BaseException) -> str:
    """The gist of a collective's error: gloo's first sentence, without its source location."""
    return re.sub(r"^\[[^\]]*\]\s*", "", first_line(error)).split(". ")[0]


def _is_lost_peer(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and _LOST_PEER.search(str(error)) is not None
