"""Preemption-safe training with real signals: SIGTERM, SIGUSR1 and SIGINT to a run, to one rank or to the
launcher make every process stop at one optimizer step, save a complete state there, say how to continue and
exit 75; continuing ends bit-identical to an uninterrupted run. A diverged run saves nothing of itself."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import preloaded
import pytest
import torch
from conftest import (
    LONG_TRAIN_SIZE,
    FinishedRun,
    cli_command,
    cli_env,
    long_run_args,
    run_cli,
    run_long_to_end,
    train_args,
)
from processes import children

from fmnist_dist.runtime.stop_signals import PREEMPTED_EXIT_CODE
from fmnist_dist.storage.run_dir import PROGRESS_FILE, STATES_DIR
from fmnist_dist.storage.training_state import complete_states

pytestmark = pytest.mark.integration  # real processes: see tests/conftest.py

FIRST_EPOCH_LINE = "epoch 1/2:"
USAGE_ERROR = 2


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(output_dir / "model.pth", map_location="cpu", weights_only=True)


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def run_and_signal(
    data_dir: Path,
    output_dir: Path,
    processes: int,
    signum: int,
    target: str,
    after: str = FIRST_EPOCH_LINE,
    extra: tuple[str, ...] = (),
) -> tuple[int, str]:
    """Start the run; once a line starts with `after`, send `signum` to `target`: "run" (one preloaded process),
    "python" (one real `python -m fmnist_dist`, whose exit goes through the interpreter's own finalisation),
    "rank" 1 or "launcher" (`accelerate launch`). The exit code, then stdout and stderr together."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    if target == "run":
        run = preloaded.CliProcess(long_run_args(data_dir, output_dir, 1, *extra), output_dir.parent, cli_env())
        try:
            run.wait_for_line(after, timeout=120)
            run.send_signal(signum)
            return run.wait(timeout=120), "".join(run.communicate())
        finally:
            run.kill()
    process = subprocess.Popen(
        [*cli_command(processes), *long_run_args(data_dir, output_dir, processes, *extra)],
        cwd=output_dir.parent,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith(after):
                os.kill(sorted(children(process.pid))[-1] if target == "rank" else process.pid, signum)
                break
        lines += process.stdout.readlines()
        return process.wait(timeout=120), "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("processes", "signum", "target"),
    [
        (1, signal.SIGTERM, "run"),
        (1, signal.SIGUSR1, "run"),
        (1, signal.SIGINT, "run"),
        (1, signal.SIGTERM, "python"),
        (2, signal.SIGTERM, "rank"),
        (2, signal.SIGUSR1, "rank"),
        (2, signal.SIGTERM, "launcher"),
        (2, signal.SIGUSR1, "launcher"),
    ],
    ids=[
        "SIGTERM",
        "SIGUSR1",
        "SIGINT",
        "SIGTERM-real-interpreter",
        "SIGTERM-one-rank",
        "SIGUSR1-one-rank",
        "SIGTERM-launcher",
        "SIGUSR1-launcher",
    ],
)
def test_a_signal_stops_every_process_at_one_step_with_a_state_and_resume_is_bit_identical(
    processes: int,
    signum: int,
    target: str,
    long_run_data_dir: Path,
    uninterrupted_long_runs: dict[int, Path],
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    code, output = run_and_signal(long_run_data_dir, out, processes, signum, target)

    named = signum
    if processes == 1:
        assert code == PREEMPTED_EXIT_CODE, output
    elif target == "launcher" and signum == signal.SIGUSR1:
        # torch's launcher does not handle SIGUSR1: it dies of it at once, without a report (a shell shows exit
        # 138), and each process gets SIGTERM from the kernel (its parent-death signal) and stops as on SIGTERM.
        assert code == -signal.SIGUSR1, output
        named = signal.SIGTERM
    elif target == "launcher":  # torch's launcher forwards the signal to the ranks and reports it as its own
        assert code != 0, output
    else:  # torch's launcher exits 1 and reports each rank's own exit code
        assert code != 0 and f"exitcode  : {PREEMPTED_EXIT_CODE}" in output, output
    stop_lines = [line for line in output.splitlines() if "fmnist-dist: stopped by" in line]
    assert len(stop_lines) == 1 and "--resume auto" in stop_lines[0], output
    assert f"stopped by {signal.Signals(named).name} at" in stop_lines[0]  # named even when another rank got it
    assert "Traceback" not in output.split("fmnist-dist: stopped by")[0]
    state = complete_states(out / STATES_DIR)[-1]
    position = json.loads((state / PROGRESS_FILE).read_text())["position"]
    assert position["epoch"] == 1 and 0 < position["samples_done"] < LONG_TRAIN_SIZE, position
    assert not (out / "model.pth").exists()

    run_long_to_end(long_run_data_dir, out, processes)
    assert_bit_identical(weights(uninterrupted_long_runs[processes]), weights(out))


@pytest.mark.slow
def test_a_runs_lines_reach_a_file_or_pipe_as_they_are_printed(long_run_data_dir: Path, tmp_path: Path) -> None:
    """Without PYTHONUNBUFFERED, as in a SLURM job's output file or behind `| tee`, the first epoch's line is read
    while the run still trains: Python's block buffer would hold it until the run ends, after model.pth."""
    out = tmp_path / "out"
    process = subprocess.Popen(
        [*cli_command(1), *long_run_args(long_run_data_dir, out, 1)],
        cwd=tmp_path,
        env=cli_env(),  # without PYTHONUNBUFFERED
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        first_epoch = next((line for line in process.stdout if line.startswith(FIRST_EPOCH_LINE)), None)
        assert first_epoch is not None, "no first epoch line"
        assert not (out / "model.pth").exists(), "the first epoch's line came only once the run had ended"
    finally:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_the_same_command_after_two_preemptions_ends_with_the_uninterrupted_model(
    long_run_data_dir: Path, uninterrupted_long_runs: dict[int, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    for after in (FIRST_EPOCH_LINE, "fmnist-dist: resuming from"):
        code, output = run_and_signal(long_run_data_dir, out, 1, signal.SIGTERM, "run", after)
        assert code == PREEMPTED_EXIT_CODE, output
    run_long_to_end(long_run_data_dir, out, 1)

    assert_bit_identical(weights(uninterrupted_long_runs[1]), weights(out))
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]


@pytest.mark.slow
def test_a_signal_agreed_on_after_the_last_optimizer_step_lets_the_run_finish(
    long_run_data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    # 10 optimizer steps of 1,200 images an epoch: sent during epoch 2, the stop is agreed on at step 20, its last.
    code, output = run_and_signal(
        long_run_data_dir,
        out,
        1,
        signal.SIGTERM,
        "run",
        extra=("--batch-size", "100", "--gradient-accumulation-steps", "12"),
    )

    assert code == 0, output
    assert "fmnist-dist: SIGTERM arrived after the last optimizer step; finishing the run" in output
    assert "stopped by" not in output
    assert all((out / name).stat().st_size > 0 for name in ("model.pth", "curves.png", "confusion.png"))
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]


def digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != ".fmnist-dist.lock"
    }


@pytest.mark.slow
def test_a_diverged_run_keeps_the_good_model_and_valid_json(
    data_dir: Path, one_epoch_run: FinishedRun, tmp_path: Path
) -> None:
    out = Path(shutil.copytree(one_epoch_run.output_dir, tmp_path / "out"))  # a good run
    model_before = (out / "model.pth").read_bytes()

    diverged = run_cli(train_args(data_dir, out, "--epochs", "1", "--lr", "1000", "--overwrite"), cwd=tmp_path)

    assert diverged.returncode == USAGE_ERROR
    errors = diverged.stderr.strip().splitlines()
    assert len(errors) == 1 and "diverged" in errors[0] and "optimizer step" in errors[0] and "--lr" in errors[0]
    assert (out / "model.pth").read_bytes() == model_before
    for path in [*out.rglob("*.json"), *out.rglob("*.jsonl")]:
        for line in path.read_text().splitlines():
            json.loads(line, parse_constant=lambda name: pytest.fail(f"{path} holds {name}"))  # noqa: B023 - called at once
