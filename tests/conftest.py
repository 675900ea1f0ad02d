"""Shared fixtures: a small synthetic FashionMNIST on disk, and the CLI run as a user runs it (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from fmnist_dist.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parent.parent
CPU_LAUNCH_CONFIG = REPO / "launch" / "cpu.yaml"
# Sizes that do not divide evenly by 2 processes x any batch size the tests use, so padding is exercised.
TRAIN_SIZE = 1003
TEST_SIZE = 301


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic FashionMNIST root (TRAIN_SIZE / TEST_SIZE images), read by torchvision's real loader."""
    root = tmp_path_factory.mktemp("fmnist")
    write_synthetic_dataset(root, TRAIN_SIZE, TEST_SIZE, seed=0)
    return root


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for CLI subprocesses: W&B offline, no GPU, quiet Accelerate."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "ACCELERATE_", "RANK", "LOCAL_RANK"))}
    # One thread per process: two processes on two cores would otherwise fight over them.
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", CUDA_VISIBLE_DEVICES="", ACCELERATE_DISABLE_RICH="1",
               OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_cli(args: Sequence[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m fmnist_dist ARGS` in `cwd`, as one process."""
    return subprocess.run(
        [sys.executable, "-m", "fmnist_dist", *map(str, args)],
        cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=timeout,
    )


def launch_cli(args: Sequence[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/cpu.yaml -m fmnist_dist ARGS` in `cwd`: two real gloo processes."""
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_LAUNCH_CONFIG),
         "--main_process_port", str(free_port()), "-m", "fmnist_dist", *map(str, args)],
        cwd=cwd, env=cli_env(**env), capture_output=True, text=True, timeout=timeout,
    )


def free_port() -> int:
    """A TCP port nothing listens on now, so that concurrent launches do not collide."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """`train` on the synthetic data, quick and offline (override any flag by repeating it in `extra`)."""
    return ["train", "--data-dir", data_dir, "--no-download", "--output-dir", output_dir,
            "--epochs", "2", "--batch-size", "32", "--eval-batch-size", "64", "--tracker", "none", *extra]
