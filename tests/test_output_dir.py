"""Output directories are owned, not overwritten: a new run refuses an earlier run's directory unless told to
resume or overwrite; --overwrite removes only what fmnist-dist wrote; one job at a time holds the directory.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import cli_env, run_cli, synthetic_data, train_args

from fmnist_dist.errors import UsageError
from fmnist_dist.storage import output_dir as output_dir_module
from fmnist_dist.storage.output_dir import OutputDirLock, read_holder, refuse_earlier_run
from fmnist_dist.storage.run_dir import LOCK_FILE, LOCK_GATE_FILE, PROGRESS_FILE, STATES_DIR

PREFIX = "fmnist-dist: error: "
QUIET = {"OMP_NUM_THREADS": "1"}


def hashes(directory: Path) -> dict[str, str]:
    """Every file under `directory` (hidden ones included), by relative path, with its SHA-256."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The refusal's only stderr line, after checking exit code 2 and no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    return lines[0]


def assert_released(output_dir: Path) -> None:
    """The lock file is in place (it is never deleted), free, and names no job."""
    with (output_dir / LOCK_FILE).open("rb") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError while a job holds it
    assert read_holder(output_dir / LOCK_FILE) is None


def states(output_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (output_dir / STATES_DIR).glob(f"*/{PROGRESS_FILE}"))


@pytest.fixture(scope="module")
def finished_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-epoch run: two states, metrics.jsonl with two epochs, model.pth and the plots."""
    work = tmp_path_factory.mktemp("finished")
    result = run_cli(train_args(data_dir, work / "out", "--no-progress"), cwd=work, **QUIET)
    assert result.returncode == 0, result.stderr
    return work / "out"


@pytest.fixture
def earlier_run(finished_run: Path, tmp_path: Path) -> Path:
    """A copy of the finished run's output directory, for one test to run into."""
    return Path(shutil.copytree(finished_run, tmp_path / "out"))


@pytest.mark.integration
def test_rerun_without_resume_is_refused_and_changes_nothing(data_dir: Path, earlier_run: Path) -> None:
    before = hashes(earlier_run)
    result = run_cli(train_args(data_dir, earlier_run, "--epochs", "1"), cwd=earlier_run.parent, **QUIET)
    line = one_error_line(result)
    for word in (
        str(earlier_run),
        "holds an earlier run",
        "saved state",
        "metrics.jsonl",
        "model.pth",
        "--resume",
        "--overwrite",
    ):
        assert word in line, (word, line)
    assert hashes(earlier_run) == before  # byte for byte, nothing added, and the lock file named no job again


@pytest.mark.integration
def test_overwrite_starts_afresh_and_removes_only_what_fmnist_dist_wrote(data_dir: Path, earlier_run: Path) -> None:
    assert states(earlier_run) == ["step-000000032", "step-000000064"]
    unrelated = {
        earlier_run / "notes.txt": b"mine",
        earlier_run / STATES_DIR / "README": b"mine too",
        earlier_run / STATES_DIR / "step-000000099" / "data.bin": b"not a state: no progress.json",
    }
    for path, content in unrelated.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    unfinished = earlier_run / STATES_DIR / ".tmp-step-000000077"  # left by a save that was killed
    unfinished.mkdir()
    (unfinished / "model.safetensors").write_bytes(b"partial")

    result = run_cli(
        train_args(data_dir, earlier_run, "--epochs", "1", "--overwrite", "--no-progress"),
        cwd=earlier_run.parent,
        **QUIET,
    )

    assert result.returncode == 0, result.stderr
    assert states(earlier_run) == ["step-000000032"]  # the earlier step-64 is gone: a fresh history
    assert len((earlier_run / "metrics.jsonl").read_text().splitlines()) == 1
    assert not unfinished.exists()
    assert {path: path.read_bytes() for path in unrelated} == unrelated
    assert_released(earlier_run)


@pytest.mark.integration
def test_an_unrelated_state_folder_survives_a_new_run(data_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    own = {output_dir / STATES_DIR / "plan.txt": b"my notes", output_dir / STATES_DIR / "old" / "x.bin": b"\0" * 10}
    for path, content in own.items():
        path.parent.mkdir(parents=True)
        path.write_bytes(content)

    result = run_cli(train_args(data_dir, output_dir, "--epochs", "1", "--no-progress"), cwd=tmp_path, **QUIET)

    assert result.returncode == 0, result.stderr  # a folder that holds no fmnist-dist state is no earlier run
    assert {path: path.read_bytes() for path in own} == own
    assert states(output_dir) == ["step-000000032"]


# ------------------------------------------------------------------------------------------- one job at a time

BUSY_TRAIN_SIZE = 6000


@pytest.fixture(scope="module")
def busy_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough small batches that a job still trains while another one, started with it, starts up."""
    return synthetic_data(tmp_path_factory, "busy", BUSY_TRAIN_SIZE, 100, seed=3)


@pytest.mark.integration
@pytest.mark.slow
def test_two_jobs_started_together_one_runs_the_other_refuses(busy_data_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    args = train_args(busy_data_dir, output_dir, "--batch-size", "8", "--no-progress", "--seed")
    jobs = [
        subprocess.Popen(
            [sys.executable, "-m", "fmnist_dist", *map(str, args), str(seed)],
            cwd=tmp_path,
            env=cli_env(**QUIET),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    results = [(job.pid, *job.communicate(timeout=300), job.returncode) for job in jobs]

    assert sorted(returncode for *_, returncode in results) == [0, 2], results
    (winner,) = [pid for pid, *_, returncode in results if returncode == 0]
    (refused,) = [
        subprocess.CompletedProcess([], returncode, out, err) for _, out, err, returncode in results if returncode == 2
    ]
    line = one_error_line(refused)
    assert f"{output_dir} is in use by another fmnist-dist job (pid {winner} on " in line, line
    assert states(output_dir)
    assert_released(output_dir)


RACERS = 8


def _race_for_the_lock(
    output_dir: Path, barrier: multiprocessing.synchronize.Barrier, results: multiprocessing.Queue
) -> None:
    """One job's start-up: take the lock at the barrier, report (pid, refusal or None), hold it until all tried."""
    with OutputDirLock(output_dir) as lock:
        barrier.wait()
        try:
            lock.acquire()
        except UsageError as error:
            results.put((os.getpid(), str(error)))
        else:
            results.put((os.getpid(), None))
        barrier.wait()


@pytest.mark.integration
@pytest.mark.parametrize("lock_file_left", [False, True], ids=["fresh", "left-by-a-killed-job"])
def test_of_jobs_racing_for_a_directory_one_holds_it_and_every_other_names_it(
    tmp_path: Path, lock_file_left: bool
) -> None:
    forked = multiprocessing.get_context("fork")
    for attempt in range(5):  # the race is short: run it several times
        output_dir = tmp_path / str(attempt)
        if lock_file_left:
            output_dir.mkdir()
            (output_dir / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 1, "host": "gone", "token": "0"}))
        barrier, results = forked.Barrier(RACERS), forked.Queue()
        racers = [forked.Process(target=_race_for_the_lock, args=(output_dir, barrier, results)) for _ in range(RACERS)]
        for racer in racers:
            racer.start()
        outcomes = [results.get(timeout=60) for _ in racers]
        for racer in racers:
            racer.join(timeout=60)

        (holder,) = [pid for pid, refusal in outcomes if refusal is None]
        refusals = [refusal for _, refusal in outcomes if refusal is not None]
        assert len(refusals) == RACERS - 1
        for refusal in refusals:
            assert f"is in use by another fmnist-dist job (pid {holder} on " in refusal, refusal
        assert sorted(p.name for p in output_dir.iterdir()) == [LOCK_FILE, LOCK_GATE_FILE]  # and nothing temporary
        assert_released(output_dir)


def test_a_lock_file_that_is_a_link_to_nowhere_is_refused(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).symlink_to(tmp_path / "nowhere")
    with OutputDirLock(tmp_path) as lock, pytest.raises(UsageError, match="is a symbolic link, not fmnist-dist's"):
        lock.acquire()
    assert not (tmp_path / "nowhere").exists()


def _hold_with_a_slow_record(
    output_dir: Path, locked: multiprocessing.synchronize.Event, done: multiprocessing.synchronize.Event
) -> None:
    """Take the lock, but wait between taking the flock and writing this job's record (as a descheduled job may)."""
    real_write = output_dir_module._write_record

    def slow_write(fd: int, record: dict) -> None:
        locked.set()
        time.sleep(0.5)
        real_write(fd, record)

    output_dir_module._write_record = slow_write
    with OutputDirLock(output_dir) as lock:
        lock.acquire()
        done.wait(timeout=60)


def test_a_job_refused_before_the_holder_wrote_its_record_still_names_the_holder(tmp_path: Path) -> None:
    # The record of a job killed while it held the lock is still in the file while the new holder writes its own.
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 1, "host": "gone", "token": "0"}))
    forked = multiprocessing.get_context("fork")
    locked, done = forked.Event(), forked.Event()
    holder = forked.Process(target=_hold_with_a_slow_record, args=(tmp_path, locked, done))
    holder.start()
    try:
        assert locked.wait(timeout=60)
        with OutputDirLock(tmp_path) as lock, pytest.raises(UsageError, match=f"pid {holder.pid} on "):
            lock.acquire()
    finally:
        done.set()
        holder.join(timeout=60)
    assert holder.exitcode == 0
    assert_released(tmp_path)


@pytest.fixture
def immutable(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """Make a directory immutable (chattr +i: not even root may add, delete or rename entries), undone after."""
    made: list[Path] = []

    def make(directory: Path) -> None:
        if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here")
        made.append(directory)

    yield make
    for directory in made:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


@pytest.mark.integration
def test_releasing_the_lock_of_a_directory_made_unwritable_never_hides_the_error_that_ended_the_job(
    tmp_path: Path, immutable: Callable[[Path], None]
) -> None:
    with pytest.raises(UsageError, match="the error that ended the job"), OutputDirLock(tmp_path) as lock:
        lock.acquire()
        immutable(tmp_path)
        raise UsageError("the error that ended the job")
    assert_released(tmp_path)


def test_releasing_the_lock_never_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with OutputDirLock(tmp_path) as lock:
        lock.acquire()
        (tmp_path / LOCK_GATE_FILE).unlink()
        for name in ("ftruncate", "close"):
            monkeypatch.setattr(output_dir_module.os, name, fail_with_eio)
        lock.release()
        monkeypatch.undo()
    assert lock.path.exists()


def fail_with_eio(*args: object) -> None:
    raise OSError(errno.EIO, "Input/output error")


def test_the_lock_file_gets_the_mode_the_umask_gives(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        with OutputDirLock(tmp_path / "out") as lock:
            lock.acquire()
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()} == {
        LOCK_FILE: oct(0o664),
        LOCK_GATE_FILE: oct(0o664),
    }


def test_results_without_a_state_are_not_offered_to_resume(tmp_path: Path) -> None:
    """A finished run whose state/ was deleted, or an --overwrite killed before its first save: --resume finds
    nothing, and --resume auto would start afresh over these results, so neither is advised."""
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "model.pth").write_bytes(b"weights")
    with pytest.raises(UsageError) as refused:
        refuse_earlier_run(tmp_path)
    message = str(refused.value)
    assert "no saved state to continue" in message and "--overwrite" in message, message
    assert "--resume" not in message, message
