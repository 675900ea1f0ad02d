"""Mixed precision and CPU threads as they really are: a precision the device cannot run is refused in one line
(not trained in fp32 under its name), the precision and thread count in effect are what the start-up line and
W&B report, and each process takes its share of the cores unless told otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import cli_env, free_port, run_cli, train_args
from test_tracking import read_wandb_log

from fmnist_dist.errors import UsageError
from fmnist_dist.runtime.devices import apply_threads, check_precision_runs, default_threads
from fmnist_dist.settings.train_config import MAX_THREADS

PREFIX = "fmnist-dist: error: "


def refused_line(result) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    return lines[0]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("flags", "env", "source"),
    [
        (["--mixed-precision", "fp16"], {}, "--mixed-precision fp16"),
        ([], {"ACCELERATE_MIXED_PRECISION": "fp16"}, "accelerate config"),
    ],
    ids=["flag", "accelerate-config"],
)
def test_fp16_on_the_cpu_is_refused_instead_of_training_in_fp32(
    flags: list[str], env: dict[str, str], source: str, data_dir: Path, tmp_path: Path
) -> None:
    result = run_cli(train_args(data_dir, tmp_path / "out", "--cpu", "--epochs", "1", *flags), tmp_path, **env)
    line = refused_line(result)
    assert source in line and "cannot run on cpu" in line and "--mixed-precision bf16" in line
    assert not (tmp_path / "out" / "model.pth").exists() and not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.integration
def test_fp8_from_accelerate_launch_is_refused_without_a_backend(data_dir: Path, tmp_path: Path) -> None:
    """`accelerate launch --mixed_precision fp8` sets ACCELERATE_MIXED_PRECISION=fp8; Accelerate then refuses
    with a ValueError when neither transformer_engine, MS-AMP nor torchao is installed."""
    result = run_cli(
        train_args(data_dir, tmp_path / "out", "--cpu", "--epochs", "1"), tmp_path, ACCELERATE_MIXED_PRECISION="fp8"
    )
    line = refused_line(result)
    assert "accelerate config" in line and "fp8 needs a GPU with transformer_engine, MS-AMP or torchao" in line
    assert "--mixed-precision bf16" in line
    assert not (tmp_path / "out" / "model.pth").exists()


def test_fp8_with_a_backend_installed_is_refused_on_the_cpu() -> None:
    """With a backend installed Accelerate builds an fp8 Accelerator on any device and calls it native."""
    accelerator = SimpleNamespace(mixed_precision="fp8", native_amp=True, device=torch.device("cpu"))
    with pytest.raises(UsageError, match="fp8 cannot run on cpu: fp8 needs a GPU"):
        check_precision_runs(accelerator, flag_given=False)


@pytest.mark.integration
def test_bf16_and_the_thread_count_are_reported_as_in_effect(data_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        train_args(
            data_dir,
            tmp_path / "out",
            "--cpu",
            "--epochs",
            "1",
            "--mixed-precision",
            "bf16",
            "--threads",
            "2",
            "--tracker",
            "wandb",
            "--no-progress",
        ),
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    start_up = result.stdout.splitlines()[0]
    assert "mixed precision: bf16" in start_up and "2 CPU thread(s) per process" in start_up
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    config = {
        item.key: json.loads(item.value_json)
        for record in read_wandb_log(log)
        if record.WhichOneof("record_type") == "config"
        for item in record.config.update
    }
    assert config["mixed_precision"] == "bf16" and config["cpu_threads"] == 2


@pytest.fixture
def restore_threads(monkeypatch: pytest.MonkeyPatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored by monkeypatch afterwards
    yield
    torch.set_num_threads(before)


def test_threads_flag_is_applied_and_exported(restore_threads) -> None:
    assert apply_threads(3) == 3 and torch.get_num_threads() == 3
    assert os.environ["OMP_NUM_THREADS"] == "3"


@pytest.mark.integration
def test_threads_flag_holds_in_processes_a_launcher_started_without_omp_num_threads(
    data_dir: Path, tmp_path: Path
) -> None:
    """Two ranks started as srun starts them (rank variables, no OMP_NUM_THREADS): Accelerate would set its own
    thread count when it joins them, over --threads."""
    port = str(free_port())
    env = {k: v for k, v in cli_env().items() if k != "OMP_NUM_THREADS"}
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fmnist_dist",
                *map(
                    str,
                    train_args(data_dir, tmp_path / "out", "--cpu", "--epochs", "1", "--threads", "2", "--no-progress"),
                ),
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **env,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for rank in range(2)
    ]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs[0][1][-3000:]
    start_up = outputs[0][0].splitlines()[0]
    assert start_up.startswith("fmnist-dist: 2 process(es)") and "2 CPU thread(s) per process" in start_up


@pytest.mark.parametrize(
    ("omp", "local_processes", "cores", "expected"),
    [
        (None, None, 8, 8),  # one process: every usable core
        (None, "2", 8, 4),  # two processes on the node: half each
        (None, "3", 8, 2),  # rounded down
        (None, "16", 8, 1),  # at least one
        ("3", "2", 8, 3),  # OMP_NUM_THREADS (the user's or the launcher's) wins
        ("", "2", 8, 4),  # an empty or invalid one is ignored, as torch ignores it
        ("x", None, 8, 8),
    ],
    ids=["alone", "share", "round-down", "at-least-one", "omp", "omp-empty", "omp-invalid"],
)
def test_default_threads_is_the_process_share_of_usable_cores(
    omp: str | None,
    local_processes: str | None,
    cores: int,
    expected: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in (("OMP_NUM_THREADS", omp), ("LOCAL_WORLD_SIZE", local_processes)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    assert default_threads() == expected


def test_an_omp_num_threads_above_the_threads_limit_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", str(MAX_THREADS + 1))
    with pytest.raises(UsageError, match=f"OMP_NUM_THREADS must be at most {MAX_THREADS}"):
        default_threads()
