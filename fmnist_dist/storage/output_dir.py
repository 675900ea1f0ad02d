"""The output directory belongs to one job at a time, and an earlier run in it is never replaced by accident.

The main process locks `<output-dir>/.fmnist-dist.lock` (flock) before anything there is read or written and
holds it for the whole run; the OS releases it when the process dies, even by SIGKILL. A new run refuses a
directory that holds an earlier run unless it continues it (`--resume`) or replaces it (`--overwrite`, which
removes only what fmnist-dist wrote). On several nodes every process checks that it sees the main process's
lock file, that is, that `--output-dir` is one directory shared by every node.
"""

from __future__ import annotations

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
from fmnist_dist.storage.run_dir import LOCK_FILE, STATES_DIR, RunDirectory
from fmnist_dist.storage.training_state import complete_states, discard_state, unfinished_states

LOCK_ATTEMPTS = 100
TAKEOVER_WAIT_S = 1.0  # far longer than a takeover takes (a rename), short for a job that is refused


class OutputDirLock:
    """An exclusive lock on an output directory; `acquire` takes it, leaving the `with` block releases it."""

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = Path(output_dir)
        self.path = RunDirectory(self.output_dir).lock
        self.token: str | None = None  # written into the lock file, for other processes to recognise it
        self._fd: int | None = None

    def __enter__(self) -> OutputDirLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock without waiting, creating the directory; the lock file names this process.

        Raises:
            UsageError: another job holds the lock, or the directory cannot be created, written or locked.
        """
        with _refusing_unwritable(self.output_dir):
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.token = secrets.token_hex(16)
            for _ in range(LOCK_ATTEMPTS):  # each retry follows another job's change of the lock file
                self._fd = self._try_lock()
                if self._fd is not None:
                    return
        raise UsageError(
            f"--output-dir {self.output_dir}: its lock file {self.path} changed {LOCK_ATTEMPTS} times "
            "while this job tried to take it; stop the other jobs using it, or choose another --output-dir"
        )

    def release(self) -> None:
        """Remove the lock file and release the lock (nothing happens when it is not held)."""
        if self._fd is None:
            return
        # Removed while still locked: a job that opened the file meanwhile sees that it is gone once it gets the
        # lock, and retries (see _take_over), so that two jobs never hold two different files.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def _try_lock(self) -> int | None:
        """A locked descriptor of the lock file now at `self.path`, or None when it changed meanwhile (retry).

        The file is written and locked under a temporary name and only then linked into place, so that a job
        that finds it locked always reads a complete record of the job that holds it.
        """
        record = self.path.with_name(f"{LOCK_FILE}.{self.token}.tmp")
        fd = os.open(record, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": self.token}).encode())
            os.fsync(fd)
            taken = self._link_into_place(record) or self._take_over(record)
        except BaseException:
            os.close(fd)
            raise
        finally:
            record.unlink(missing_ok=True)
        if not taken:
            os.close(fd)
            return None
        return fd

    def _link_into_place(self, record: Path) -> bool:
        """Make `record` the lock file if there is none (a hard link never replaces an existing file)."""
        try:
            os.link(record, self.path)
        except FileExistsError:
            return False
        return True

    def _take_over(self, record: Path) -> bool:
        """Replace the lock file by `record` when no live job holds it (its job died); False when it changed.

        Raises:
            UsageError: a live job holds the lock file.
        """
        try:
            stale = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            if self.path.is_symlink():  # a link to nowhere: not a lock file that any job of ours made
                raise UsageError(
                    f"{self.path} is a symbolic link, not fmnist-dist's lock file; remove it, or "
                    "choose another --output-dir"
                ) from None
            return False  # released meanwhile
        try:
            fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _replaced_soon(stale, self.path):  # another job was taking over a dead job's lock file: retry
                return False
            holder = _describe(read_holder(self.path))
            raise UsageError(
                f"--output-dir {self.output_dir} is in use by another fmnist-dist job ({holder}); wait for it to "
                "end, or choose another --output-dir"
            ) from None
        else:
            # Still the file at self.path while its lock is held: no other job can be replacing it now.
            if not _same_file(stale, self.path):
                return False
            os.replace(record, self.path)
            return True
        finally:
            os.close(stale)


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
    (token,) = broadcast_object_list([lock.token])
    with fail_together(processes):
        if not processes.is_main_process:
            check_shared(lock, token, processes.process_index)


def refuse_earlier_run(output_dir: Path) -> None:
    """Refuse a new run into a directory that holds an earlier run's results.

    Raises:
        UsageError: naming what is there and the three ways on.
    """
    found = earlier_run(output_dir)
    if found:
        raise UsageError(
            f"--output-dir {output_dir} holds an earlier run ({', '.join(found)}); continue it with --resume "
            "(or --resume auto), replace it with --overwrite, or choose another --output-dir"
        )


def earlier_run(output_dir: Path) -> list[str]:
    """What of an earlier run `output_dir` holds: its complete states, metrics.jsonl, model.pth."""
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
    """`--overwrite`: delete the earlier run's states in `output_dir` (so nothing resumes them), and nothing else.

    That is its complete states, and the unfinished `.tmp-step-*` and `.trash-step-*` ones, under `state/`. Its metrics.jsonl, model.pth
    and plots stay until the new run replaces them (atomically), so a new run that fails, or diverges, leaves
    the earlier results as they were. Every process calls this; the main process deletes.

    Raises:
        UsageError: on every process, when a file cannot be deleted.
    """
    with fail_together(processes), _refusing_unwritable(output_dir):
        if processes.is_main_process:
            root = RunDirectory(output_dir).states
            for state in complete_states(root):
                discard_state(state)
            for unfinished in unfinished_states(root):
                shutil.rmtree(unfinished)


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _replaced_soon(fd: int, path: Path) -> bool:
    """Whether the file at `path` stops being `fd`'s file within TAKEOVER_WAIT_S seconds.

    A job taking over a dead job's lock file holds that file's lock only until it has put its own in place:
    a lock that is still on the file at `path` after the wait is a live job's.
    """
    deadline = time.monotonic() + TAKEOVER_WAIT_S
    while time.monotonic() < deadline:
        if not _same_file(fd, path):
            return True
        time.sleep(0.01)
    return False


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
