"""No orphans: when the launcher dies, even by SIGKILL, every rank it started stops within seconds, and what they
leave behind is never mistaken for a complete state."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CPU_LAUNCH_CONFIG, cli_env, free_port, synthetic_data, train_args
from processes import alive, children

from fmnist_dist.runtime.launcher_death import LAUNCHER_MARK, stop_with_launcher
from fmnist_dist.storage.run_dir import PROGRESS_FILE, STATE_PREFIX, STATES_DIR

QUIET = {"OMP_NUM_THREADS": "1"}
GONE_WITHIN_S = 15


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture(scope="module")
def long_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Far more batches than the test waits for: the ranks are still training when the launcher is killed."""
    return synthetic_data(tmp_path_factory, "long", 20000, 100, seed=4)


@pytest.mark.slow
def test_killing_the_launcher_stops_every_rank(long_data_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_LAUNCH_CONFIG),
        "--main_process_port",
        str(free_port()),
        "-m",
        "fmnist_dist",
        *map(
            str,
            train_args(
                long_data_dir,
                output_dir,
                "--cpu",
                "--epochs",
                "20",
                "--batch-size",
                "8",
                "--checkpoint-every",
                "50",
                "--no-progress",
            ),
        ),
    ]
    with (tmp_path / "launch.log").open("wb") as log:
        launcher = subprocess.Popen(
            command, cwd=tmp_path, env=cli_env(**QUIET), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    ranks: list[int] = []
    try:
        # Once a state is saved, both ranks are training.
        wait_until(lambda: list(output_dir.glob(f"{STATES_DIR}/*/{PROGRESS_FILE}")), 120, "no state saved in time")
        ranks = children(launcher.pid)
        assert len(ranks) == 2, ranks
        launcher.kill()
        launcher.wait(timeout=10)
        wait_until(
            lambda: not any(map(alive, ranks)),
            GONE_WITHIN_S,
            f"ranks {[r for r in ranks if alive(r)]} still run {GONE_WITHIN_S} s after the launcher died",
        )
    finally:
        for pid in [launcher.pid, *ranks]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    # Whatever a rank was writing when it stopped never bears a complete state's name without being one.
    named_as_states = sorted(p.name for p in (output_dir / STATES_DIR).glob(f"{STATE_PREFIX}*"))
    complete = sorted(p.parent.name for p in (output_dir / STATES_DIR).glob(f"{STATE_PREFIX}*/{PROGRESS_FILE}"))
    assert named_as_states == complete and complete


def test_a_process_started_by_a_launcher_ends_with_it(tmp_path: Path) -> None:
    """A stand-in launcher (a plain parent) starts a rank, then dies by SIGKILL: the rank gets SIGTERM."""
    rank = (
        "import sys, time\n"
        "from fmnist_dist.runtime.launcher_death import stop_with_launcher\n"
        "assert stop_with_launcher()\n"
        "print('armed', flush=True)\n"
        "time.sleep(60)\n"
    )
    launcher = (
        "import os, subprocess, sys\n"
        f"rank = subprocess.Popen([sys.executable, '-c', {rank!r}], stdout=subprocess.PIPE, "
        "stderr=subprocess.DEVNULL, text=True)\n"
        "assert rank.stdout.readline() == 'armed\\n'\n"
        "print(rank.pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", launcher],
        env=cli_env(**{LAUNCHER_MARK: "test"}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr
    rank_pid = int(result.stdout)
    try:
        wait_until(lambda: not alive(rank_pid), 5, "the rank outlived its launcher")
    finally:
        if alive(rank_pid):
            os.kill(rank_pid, signal.SIGKILL)


def test_a_plain_run_is_not_tied_to_its_parent(monkeypatch: pytest.MonkeyPatch) -> None:
    # Run from a shell, a job may outlive it (nohup): only processes a launcher started are armed.
    monkeypatch.delenv(LAUNCHER_MARK, raising=False)
    assert stop_with_launcher() is False
