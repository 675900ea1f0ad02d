"""A mistake on the command line is refused cleanly: exit code 2, one line naming the culprit, no traceback,
and the results of an earlier run left exactly as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli, train_args

from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.storage.run_dir import LOCK_FILE, LOCK_GATE_FILE

pytestmark = pytest.mark.integration  # real processes: see tests/conftest.py

USAGE_ERROR = 2
PREFIX = "fmnist-dist: error:"


@pytest.fixture
def previous_results(tmp_path: Path) -> Path:
    """An output directory holding an earlier run's model.pth and metrics.jsonl."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    torch.save(NeuralNetwork().state_dict(), output_dir / "model.pth")
    (output_dir / "metrics.jsonl").write_text('{"epoch": 1, "test_accuracy": 0.5}\n')
    return output_dir


def file_contents(directory: Path) -> dict[str, bytes]:
    """Every file's bytes, but the lock's two files: any job that opens the directory leaves them in place."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in (LOCK_FILE, LOCK_GATE_FILE)
    }


def assert_refused(args: list, cwd: Path, culprit: str, output_dir: Path) -> None:
    """Run the CLI and check the refusal: exit 2, one error line naming `culprit`, `output_dir` untouched."""
    before = file_contents(output_dir)
    result = run_cli(args, cwd=cwd, timeout=120)

    assert result.returncode == USAGE_ERROR, result.stdout + result.stderr
    stderr_lines = result.stderr.strip().splitlines()
    assert len(stderr_lines) == 1, result.stderr
    assert stderr_lines[0].startswith(PREFIX) and culprit in stderr_lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert file_contents(output_dir) == before


@pytest.mark.parametrize(
    ("flags", "culprit"),
    [
        (["--lr", "0"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "abc"], "--epochs"),
        (["--num-workers", "100000"], "--num-workers"),
        (["--eval-batch-size", "99999999999999999999"], "--eval-batch-size"),
        (["--threads", "99999999999999999999"], "--threads"),
    ],
    ids=[
        "lr-zero",
        "lr-negative",
        "batch-size-zero",
        "epochs-zero",
        "epochs-not-a-number",
        "workers-huge",
        "eval-batch-huge",
        "threads-huge",
    ],
)
def test_bad_train_flag_is_refused_with_one_line(flags, culprit, data_dir: Path, previous_results: Path) -> None:
    assert_refused(train_args(data_dir, previous_results, *flags), previous_results.parent, culprit, previous_results)


def test_missing_dataset_with_no_download_is_refused_with_one_line(tmp_path: Path, previous_results: Path) -> None:
    missing = tmp_path / "no-data"

    # --overwrite: even a run allowed to replace the earlier results leaves them alone when its data is missing.
    assert_refused(train_args(missing, previous_results, "--overwrite"), tmp_path, str(missing), previous_results)


def test_missing_checkpoint_is_refused_with_one_line(data_dir: Path, previous_results: Path) -> None:
    missing = previous_results / "missing.pth"

    assert_refused(
        ["evaluate", "--checkpoint", missing, "--data-dir", data_dir, "--no-download"],
        previous_results.parent,
        str(missing),
        previous_results,
    )


def test_failed_download_is_refused_with_one_line(tmp_path: Path, previous_results: Path) -> None:
    # No network here (and none needed): the download of a fresh, empty data directory fails.
    empty = tmp_path / "empty-data"
    args = [arg for arg in train_args(empty, previous_results, "--overwrite") if arg != "--no-download"]

    assert_refused(args, tmp_path, str(empty), previous_results)
