"""Faults: a training process killed with SIGKILL mid-epoch resumes to the uninterrupted result, a crash in the
middle of a save leaves the previous file intact, and a 2-process job where one rank fails ends instead of hanging.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import preloaded
import pytest
import torch
from conftest import (
    LONG_TRAIN_SIZE,
    TRAIN_SIZE,
    accelerate_launch,
    cli_command,
    cli_env,
    epoch_record,
    long_run_args,
    run_cli,
    run_long_to_end,
    train_args,
)
from processes import alive, children, wait_until

from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.storage.atomic_files import atomic_write
from fmnist_dist.storage.metrics_log import MetricsLog
from fmnist_dist.storage.run_dir import PROGRESS_FILE, STATES_DIR
from fmnist_dist.storage.training_state import find_state
from fmnist_dist.storage.weights import load_model, save_state_dict

HELPERS = Path(__file__).resolve().parent / "helpers"
HANG_LIMIT_S = 60
QUIET = {"OMP_NUM_THREADS": "1"}  # one thread per process: faster on a small shared CPU


def files_in(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------- SIGKILL, then resume

# The killed run saves a state every 40 optimizer steps (the first ones mid-epoch); saving does not change the
# weights, so it ends equal to the session's uninterrupted long run.
KILL_CHECKPOINT_EVERY = "40"


def run_quietly(command: list[str], args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command, *map(str, args)], cwd=cwd, env=cli_env(**QUIET), capture_output=True, text=True, timeout=300
    )


def start_in_own_session(processes: int, args: list, cwd: Path) -> subprocess.Popen | preloaded.CliProcess:
    """The CLI in a process group of its own, so that one killpg reaches the launcher and every rank."""
    if processes == 1:
        return preloaded.CliProcess(args, cwd, cli_env(**QUIET), new_session=True)
    with (cwd / "killed.log").open("wb") as log:
        return subprocess.Popen(
            [*cli_command(processes), *map(str, args)],
            cwd=cwd,
            env=cli_env(**QUIET),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_for_saved_state(
    process: subprocess.Popen | preloaded.CliProcess, output_dir: Path, timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    while not list((output_dir / STATES_DIR).glob(f"step-*/{PROGRESS_FILE}")):
        assert process.poll() is None, "training ended before saving a state"
        assert time.monotonic() < deadline, "no state saved in time"
        time.sleep(0.02)


def read_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(output_dir / "model.pth", map_location="cpu", weights_only=True)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-processes"])
def test_sigkill_mid_epoch_then_resume_is_bit_identical(
    processes: int, long_run_data_dir: Path, uninterrupted_long_runs: dict[int, Path], tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    args = long_run_args(long_run_data_dir, out, processes, "--checkpoint-every", KILL_CHECKPOINT_EVERY)
    process = start_in_own_session(processes, args, tmp_path)
    try:
        wait_for_saved_state(process, out)
        ranks = children(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)  # the wait, and a preloaded process's output files removed
    assert process.returncode == -signal.SIGKILL
    # The launcher can be reaped before its ranks have ended; until they have, rank 0 holds the output directory's
    # lock and the resume below would be refused as a second job.
    wait_until(lambda: not any(map(alive, ranks)), 30, "the ranks outlived their SIGKILL")
    assert not (out / "model.pth").exists()
    progress = json.loads((find_state(out, "latest") / PROGRESS_FILE).read_text())
    position = progress["position"]
    assert position["epoch"] == 0 and 0 < position["samples_done"] < LONG_TRAIN_SIZE, progress

    run_long_to_end(long_run_data_dir, out, processes, "--checkpoint-every", KILL_CHECKPOINT_EVERY, "--resume")
    reference = uninterrupted_long_runs[processes]
    expected, actual = read_weights(reference), read_weights(out)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    reference_metrics = MetricsLog.read(reference / "metrics.jsonl")
    resumed_metrics = MetricsLog.read(out / "metrics.jsonl")
    assert [(r.train_loss, r.test_accuracy) for r in resumed_metrics] == [
        (r.train_loss, r.test_accuracy) for r in reference_metrics
    ]


# ------------------------------------------------------------------------------------ a crash during a save


class DiskFullHalfway:
    """A file object that writes half of what it is given, then fails as a full disk does."""

    def __init__(self, file) -> None:
        self.file = file

    def write(self, data) -> int:
        data = bytes(data)
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.file.close()


@pytest.fixture
def disk_full_halfway(monkeypatch: pytest.MonkeyPatch) -> None:
    real_fdopen = os.fdopen
    monkeypatch.setattr(
        "fmnist_dist.storage.atomic_files.os.fdopen", lambda *a, **k: DiskFullHalfway(real_fdopen(*a, **k))
    )


def test_failed_model_save_leaves_previous_model_intact(tmp_path: Path, disk_full_halfway: None) -> None:
    path = tmp_path / "model.pth"
    torch.save(NeuralNetwork().state_dict(), path)
    before = files_in(tmp_path)
    with pytest.raises(UsageError, match=f"could not write {path}: no space left on device"):
        save_state_dict(NeuralNetwork().state_dict(), path)
    assert files_in(tmp_path) == before  # byte-identical, and no temporary file left behind
    load_model(path)


def test_failed_metrics_append_leaves_previous_metrics_intact(tmp_path: Path, disk_full_halfway: None) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(epoch_record().as_json()) + "\n")
    before = files_in(tmp_path)
    with pytest.raises(UsageError, match=f"could not write {path}: no space left on device"):
        MetricsLog(path, [epoch_record()]).append(epoch_record(epoch=2))
    assert files_in(tmp_path) == before
    assert MetricsLog.read(path) == [epoch_record()]


@pytest.mark.integration
def test_process_dying_mid_write_leaves_previous_model_loadable(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(NeuralNetwork().state_dict(), path)
    before = path.read_bytes()
    dies_halfway = (
        "import os, sys, torch\n"
        "from fmnist_dist.storage.atomic_files import atomic_write\n"
        "from fmnist_dist.recipe.model import NeuralNetwork\n"
        "def write(f):\n"
        "    f.write(b'PK' + os.urandom(100000))\n"
        "    f.flush()\n"
        "    os._exit(9)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    result = subprocess.run([sys.executable, "-c", dies_halfway, str(path)], env=cli_env(), timeout=120)
    assert result.returncode == 9
    assert path.read_bytes() == before
    load_model(path)
    # The dead writer's partial file is hidden and never bears the name that readers open.
    leftovers = [p.name for p in tmp_path.iterdir() if p != path]
    assert leftovers and all(name.startswith(".model.pth.") and name.endswith(".tmp") for name in leftovers)


def test_atomic_write_gives_new_files_the_usual_permissions(tmp_path: Path) -> None:
    atomic_write(tmp_path / "metrics.jsonl", lambda f: f.write(b"{}\n"))
    (tmp_path / "plain").write_bytes(b"{}\n")
    assert (tmp_path / "metrics.jsonl").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_atomic_write_keeps_an_existing_files_permissions(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    path.write_bytes(b"old")
    path.chmod(0o640)
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o640


# ------------------------------------------------------------------------------------------------ no hangs


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("failing_rank", [1, 0])
def test_two_process_job_ends_when_one_rank_fails(failing_rank: int, data_dir: Path, tmp_path: Path) -> None:
    """One rank raises at step 3 (injected by tests/helpers/fail_on_rank.py); the other must not wait forever."""
    command = [
        *accelerate_launch(2),
        str(HELPERS / "fail_on_rank.py"),
        *map(str, train_args(data_dir, tmp_path / "out", "--cpu", "--no-progress")),
    ]
    start = time.monotonic()
    env = cli_env(FAIL_RANK=str(failing_rank), FAIL_AT_STEP="3", **QUIET)
    process = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=HANG_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"the job still ran {HANG_LIMIT_S} s after rank {failing_rank} failed")
    assert process.returncode != 0
    assert f"injected failure on rank {failing_rank} at step 3" in output
    assert time.monotonic() - start < HANG_LIMIT_S
    assert not (tmp_path / "out" / "model.pth").exists()


# ------------------------------------------------------------------------------------------------- file modes


@pytest.mark.integration
@pytest.mark.parametrize("umask", [0o002, 0o077], ids=["umask-002", "umask-077"])
def test_every_file_a_run_writes_gets_the_mode_the_umask_gives(umask: int, data_dir: Path, tmp_path: Path) -> None:
    old = os.umask(umask)  # the CLI's process inherits it
    try:
        result = run_cli(train_args(data_dir, tmp_path / "out", "--epochs", "1", "--no-progress"), tmp_path, **QUIET)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    written = sorted((tmp_path / "out").rglob("*"))
    assert any(p.name == "model.safetensors" for p in written) and any(p.name == "model.pth" for p in written)
    wrong = {
        str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
        for p in written
        if p.stat().st_mode & 0o777 != (0o777 if p.is_dir() else 0o666) & ~umask
    }
    assert wrong == {}


# ---------------------------------------------------------------------------- a kill mid-replacement of a state


@pytest.mark.integration
def test_a_kill_while_a_state_of_the_same_step_is_replaced_resumes_from_that_step(
    data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    steps = -(-TRAIN_SIZE // 32)  # an epoch's optimizer steps at train_args' batch of 32
    args = train_args(
        data_dir, out, "--epochs", "1", "--checkpoint-every", steps, "--keep-states", "1", "--no-progress"
    )
    killed = run_quietly([sys.executable, str(HELPERS / "killed_mid_state_replacement.py")], args, tmp_path)
    assert killed.returncode == 9, killed.stderr[-3000:]
    final = out / STATES_DIR / f"step-{steps:09d}"
    assert not final.exists()  # the older state of the step is gone, the new one not yet in its place

    resumed = run_cli(
        train_args(data_dir, out, "--epochs", "2", "--resume", "auto", "--no-progress"), tmp_path, **QUIET
    )

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {final} at epoch 2" in resumed.stdout, resumed.stdout
    assert len(MetricsLog.read(out / "metrics.jsonl")) == 2
