"""No orphans: when the launcher dies, even by SIGKILL, every rank it started stops within seconds, and what they
leave behind is never mistaken for a complete state."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli_env, launch_command, synthetic_data, train_args, training_until_killed
from processes import alive, children, wait_until

from fmnist_dist.runtime.launcher_death import LAUNCHER_MARK, stop_with_launcher
from fmnist_dist.storage.run_dir import PROGRESS_FILE, STATE_PREFIX, STATES_DIR
from fmnist_dist.storage.training_state import complete_states

QUIET = {"OMP_NUM_THREADS": "1"}
GONE_WITHIN_S = 15


@pytest.fixture(scope="module")
def long_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Far more batches than the test waits for: the ranks are still training when the launcher is killed."""
    return synthetic_data(tmp_path_factory, "long", 20000, 100, seed=4)


@pytest.mark.integration
@pytest.mark.slow
def test_killing_the_launcher_stops_every_rank(long_data_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    command = launch_command(training_until_killed(long_data_dir, output_dir))
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


@pytest.mark.integration
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


def start_training(args: list, cwd: Path, stdout, stderr) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fmnist_dist", *map(str, args)],
        cwd=cwd,
        env=cli_env(**QUIET),
        stdout=stdout,
        stderr=stderr,
        text=True,
    )


@pytest.mark.integration
@pytest.mark.slow
def test_a_closed_stdout_neither_stops_training_nor_skips_a_save(data_dir: Path, tmp_path: Path) -> None:
    """`fmnist-dist train ... | head -2`: once head has its lines, the epoch lines go nowhere and training goes on."""
    output_dir = tmp_path / "out"
    with (tmp_path / "stderr").open("w+") as stderr:
        run = start_training(
            train_args(data_dir, output_dir, "--epochs", "3", "--no-progress"), tmp_path, subprocess.PIPE, stderr
        )
        head = [run.stdout.readline() for _ in range(2)]
        run.stdout.close()
        code = run.wait(timeout=300)
        stderr.seek(0)
        errors = stderr.read()

    assert all(head), head
    assert code == 0, errors
    assert "Traceback" not in errors and "standard output is gone (BrokenPipeError)" in errors, errors
    assert [json.loads(line)["epoch"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (output_dir / "model.pth").stat().st_size > 0
    progress = json.loads(complete_states(output_dir / STATES_DIR)[-1].joinpath(PROGRESS_FILE).read_text())
    assert progress["position"]["epoch"] == 3, progress


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("chattr"), reason="chattr +i needs root")
def test_an_output_dir_made_immutable_mid_run_ends_in_the_real_error_and_at_most_one_warning(
    data_dir: Path, tmp_path: Path
) -> None:
    """Its lock cannot be removed either: that clean-up failure must not replace the error that ended the run."""
    output_dir = tmp_path / "out"
    args = train_args(data_dir, output_dir, "--epochs", "50", "--checkpoint-every", "5", "--no-progress")
    frozen = [output_dir, output_dir / STATES_DIR]
    with (tmp_path / "output").open("w+") as output:
        run = start_training(args, tmp_path, subprocess.DEVNULL, output)
        try:
            wait_until(lambda: complete_states(output_dir / STATES_DIR), 120, "no state saved in time")
            subprocess.run(["chattr", "+i", *map(str, frozen)], check=True)
            code = run.wait(timeout=120)
        finally:
            subprocess.run(["chattr", "-i", *map(str, frozen)], check=False)
            if run.poll() is None:
                run.kill()
        output.seek(0)
        lines = output.read().splitlines()

    assert code == 2, lines
    assert "Traceback" not in "\n".join(lines), lines
    assert lines[0].startswith("fmnist-dist: error: ") and str(output_dir) in lines[0], lines
    assert len(lines) <= 2 and all(line.startswith("fmnist-dist: warning: ") for line in lines[1:]), lines
