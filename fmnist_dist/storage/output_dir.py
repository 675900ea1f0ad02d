"""The output directory belongs to one job at a time, and an earlier run in it is never replaced by accident.

The main process locks `<output-dir>/.fmnist-dist.lock` (flock) before anything there is read or written and
holds it for the whole run; the OS releases it when the process dies, even by SIGKILL. The file stays in place:
while a job holds it, it names that job. A new run refuses a directory that holds an earlier run unless it
continues it (`--resume`) or replaces it (`--overwrite`, which removes only what fmnist-dist wrote). On several
nodes every process checks that it sees the main process's lock file, that is, that `--output-dir` is one
directory shared by every node.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.runtime.collective_errors import fail_together
from fmnist_dist.storage.run_dir import STATES_DIR, RunDirectory
from fmnist_dist.storage.training_state import (
    complete_states,
    discard_state,
    finish_interrupted_saves,
    unfinished_states,
)

# The gate is held only while a job takes the lock and writes its record, or reads the record: microseconds,
# unless that job is stopped (SIGSTOP) just then. After this long the others go on without it.
GATE_WAIT_S = 10.0


class OutputDirLock:
    """An exclusive lock on an output directory; `acquire` takes it, leaving the `with` block releases it.

    It is an flock on the lock file, which is never deleted (so that every job locks the same file). The holder
    writes its record (pid, host, token) into it and clears it on release. Taking the lock with writing the
    record, clearing the record with releasing the lock, and a refused job's reading of the record all happen
    under a second flock, on the gate file: so a refused job reads the record of the job that holds the lock,
    never a half-written one, an empty one, or that of an earlier job killed while it held the lock.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        run_dir = RunDirectory(self.output_dir)
        self.path, self.gate = run_dir.lock, run_dir.lock_gate
        self.token: str | None = None  # written into the lock file, for other processes to recognise it
        self._fd: int | None = None

    def __enter__(self) -> OutputDirLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock without waiting, creating the directory; the lock file names this process.

        Raises:
            UsageError: another job holds the lock, the lock file is a symbolic link, or the directory cannot be
                created, written or locked.
        """
        with _refusing_unwritable(self.output_dir):
            self.output_dir.mkdir(parents=True, exist_ok=True)
            fd = _open_lock_file(self.path)
            try:
                with _held(self.gate):
                    if not _try_lock(fd):
                        raise UsageError(
                            f"--output-dir {self.output_dir} is in use by another fmnist-dist job "
                            f"({_describe(read_holder(self.path))}); wait for it to end, or choose another --output-dir"
                        )
                    self.token = secrets.token_hex(16)
                    _write_record(fd, {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token})
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd

    def release(self) -> None:
        """Clear this job's record from the lock file and release the lock (nothing happens when it is not held).

        Never raises: it runs while the error that ended the job is on its way out (an output directory made
        unwritable meanwhile, say), and the OS releases the lock with the descriptor in any case.
        """
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            with contextlib.suppress(OSError), _held(self.gate):
                os.ftruncate(fd, 0)  # under the gate: no refused job finds the lock held and its record empty
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


def _open_lock_file(path: Path) -> int:
    """A descriptor of the lock file, created if missing (with the mode the umask gives).

    Raises:
        UsageError: the lock file is a symbolic link (fmnist-dist never makes one; following it could lock or
            create a file elsewhere).
        OSError: it cannot be opened or created.
    """
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP and path.is_symlink():
            raise UsageError(
                f"{path} is a symbolic link, not fmnist-dist's lock file; remove it, or choose another --output-dir"
            ) from None
        raise


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _write_record(fd: int, record: dict[str, Any]) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)  # for the other nodes' processes, which read it over the shared file system


@contextmanager
def _held(gate: Path) -> Iterator[None]:
    """Hold the gate's flock for the block: waiting at most GATE_WAIT_S, then going on without it."""
    fd = _open_lock_file(gate)
    try:
        deadline = time.monotonic() + GATE_WAIT_S
        while not _try_lock(fd) and time.monotonic() < deadline:
            time.sleep(0.001)
        yield
    finally:
        os.close(fd)


def read_holder(lock_path: Path) -> dict[str, Any] | None:
    """The pid, host and token recorded in a lock file, or None if it is missing or not (yet) written."""
    try:
        holder = json.loads(Path(lock_path).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def claim_output_dir(processes: PartialState, lock: OutputDirLock, resume: str | None, overwrite: bool) -> None:
    """Lock the output directory for this job and check that it may train there (every process calls this).

    Args:
        processes: the job's processes (the main one takes the lock).
        lock: the output directory's lock, held until the caller's `with lock` block ends.
        resume: `--resume` (None for a new run).
        overwrite: `--overwrite` (a new run may replace an earlier one).

    Raises:
        UsageError: on every process, when another job holds the directory; it holds an earlier run and this
            run neither resumes nor overwrites it; it cannot be written; or some process, on another node, does
            not see the same directory.
    """
    with fail_together(processes):
        if processes.is_main_process:
            lock.acquire()
            if resume is None and not overwrite:
                refuse_earlier_run(lock.output_dir)
            if resume is not None:  # a save killed after its state was complete: the state takes its name now
                with _refusing_unwritable(lock.output_dir):
                    finish_interrupted_saves(RunDirectory(lock.output_dir).states)
    (token,) = broadcast_object_list([lock.token])
    with fail_together(processes):
        if not processes.is_main_process:
            check_shared(lock, token, processes.process_index)


def refuse_earlier_run(output_dir: Path) -> None:
    """Refuse a new run into a directory that holds an earlier run's results.

    Raises:
        UsageError: naming what is there and the ways on (continuing it only where it has a state to continue).
    """
    found = earlier_run(output_dir)
    if not found:
        return
    if not complete_states(RunDirectory(output_dir).states):
        # Nothing to continue: --resume would find no state, and --resume auto would start afresh and replace
        # these results without being told to.
        raise UsageError(
            f"--output-dir {output_dir} holds an earlier run ({', '.join(found)}) with no saved state to continue; "
            "replace it with --overwrite, or choose another --output-dir"
        )
    raise UsageError(
        f"--output-dir {output_dir} holds an earlier run ({', '.join(found)}); continue it with --resume "
        "(or --resume auto), replace it with --overwrite, or choose another --output-dir"
    )


def earlier_run(output_dir: Path) -> list[str]:
    """What of an earlier run `output_dir` holds: its complete states, metrics.jsonl, model.pth, model-best.pth."""
    found = []
    run_dir = RunDirectory(output_dir)
    if states := complete_states(run_dir.states):
        found.append(f"{len(states)} saved state(s) in {STATES_DIR}/")
    found += [path.name for path in run_dir.results() if path.exists()]
    return found


def check_shared(lock: OutputDirLock, token: str | None, process_index: int) -> None:
    """Refuse to go on where this process does not see the main process's lock file, or cannot write there.

    Raises:
        UsageError: `--output-dir` is another directory here than on the main process's node, or not writable.
    """
    holder = read_holder(lock.path)
    if holder is None or holder.get("token") != token:
        raise UsageError(
            f"--output-dir {lock.output_dir} is not the same directory on every node: process {process_index} on "
            f"{socket.gethostname()} does not see the lock file the main process wrote there; on several nodes "
            "pass an --output-dir on storage that every node shares"
        )
    with _refusing_unwritable(lock.output_dir), tempfile.TemporaryFile(dir=lock.output_dir):
        pass


def remove_earlier_run(processes: PartialState, output_dir: Path) -> None:
    """`--overwrite`: delete the earlier run's states in `output_dir` (so nothing resumes them), its best model and
    its profiles' traces, and nothing else.

    That is its complete states, and the unfinished `.tmp-step-*` and `.trash-step-*` ones, under `state/`, its
    model-best.pth, which a new run replaces only once it has one (with `--val-size`, after its first epoch),
    and the `rank*.pt.trace.json` files under `profile/` (the new run may profile other steps, or none): until
    then they would pass for the new run's. Its metrics.jsonl, model.pth and plots stay until the new run
    replaces them (atomically), so a new run that fails, or diverges, leaves the earlier results as they were.
    Every process calls this; the main process deletes.

    Raises:
        UsageError: on every process, when a file cannot be deleted.
    """
    with fail_together(processes), _refusing_unwritable(output_dir):
        if processes.is_main_process:
            run_dir = RunDirectory(output_dir)
            root = run_dir.states
            finish_interrupted_saves(root)  # a `.complete-step-N` and the older `step-N` become one state
            for state in complete_states(root):
                discard_state(state)
            for unfinished in unfinished_states(root):
                shutil.rmtree(unfinished)
            run_dir.best_model.unlink(missing_ok=True)
            _remove_profiles(run_dir)


def _remove_profiles(run_dir: RunDirectory) -> None:
    """Delete every profile's traces, then the folders they leave empty (a file of the user's keeps its own)."""
    for trace in run_dir.profile_traces():
        trace.unlink()
    for folder in [*sorted(run_dir.profiles.glob("*/")), run_dir.profiles]:
        with contextlib.suppress(OSError):  # not empty, or not there
            folder.rmdir()


def _describe(holder: dict[str, Any] | None) -> str:
    if holder is None:
        return "its lock file names no process"
    return f"pid {holder.get('pid')} on {holder.get('host')}"


@contextmanager
def _refusing_unwritable(output_dir: Path) -> Iterator[None]:
    """Turn an OSError on the output directory into the one-line refusal that names it."""
    try:
        yield
    except OSError as error:
        raise UsageError(
            f"cannot write to output directory {output_dir} ({first_line(error)}); choose another --output-dir"
        ) from error
