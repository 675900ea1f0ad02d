"""A full disk is one line: on a small real file system (tmpfs, mounted when the tests run as root) a failed state
save or plot ends with one line naming the file and "no space left on device", exit 2, no temporary files or
folders left, and the previous files intact. Every JSON output stays strictly valid JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FinishedRun, cli_command, cli_env, epoch_record, train_args

from fmnist_dist.errors import UsageError
from fmnist_dist.storage import strict_json
from fmnist_dist.storage.metrics_log import MetricsLog
from fmnist_dist.storage.plots import plot_run
from fmnist_dist.storage.run_dir import STATES_DIR, TMP_PREFIX

TMPFS_SIZE = "16m"  # one run's files (a state, model.pth, plots: about 8 MB) and room to fill
QUIET = {"OMP_NUM_THREADS": "1"}


def files_in(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def debris(directory: Path) -> list[str]:
    """Unfinished states (`.tmp-*`) and atomic writes' temporary files (`.*.tmp`) under `directory`."""
    return sorted(str(p) for p in [*directory.rglob(f"{TMP_PREFIX}*"), *directory.rglob(".*.tmp")])


def fill(file_system: Path, leave: int) -> None:
    """Fill `file_system` with one file so that only about `leave` bytes stay free."""
    stats = os.statvfs(file_system)
    (file_system / "filler").write_bytes(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MB file system (tmpfs), mounted for this test only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


@pytest.fixture(scope="module")
def finished_run(one_epoch_run: FinishedRun) -> Path:
    """The session's finished 1-epoch run's output directory, copied onto each small disk."""
    return one_epoch_run.output_dir


def resume_command(processes: int, args: list) -> list[str]:
    return [*cli_command(processes), *map(str, args), *(["--cpu"] if processes > 1 else [])]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-processes"])
def test_state_save_on_a_full_disk_is_one_line_and_leaves_no_debris(
    processes: int, finished_run: Path, data_dir: Path, small_disk: Path
) -> None:
    output_dir = Path(shutil.copytree(finished_run, small_disk / "out"))
    fill(small_disk, leave=1_000_000)  # room for small files, not for a state's 2.7 MB model
    before = files_in(output_dir)
    args = train_args(data_dir, output_dir, "--epochs", "2", "--resume", "--checkpoint-every", "5", "--no-progress")

    result = subprocess.run(
        resume_command(processes, args),
        cwd=small_disk.parent,
        env=cli_env(**QUIET),
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("fmnist-dist: error:")]
    assert len(lines) == 1, result.stderr
    assert f"could not write {output_dir / STATES_DIR}/step-" in lines[0], lines[0]
    assert "no space left on device" in lines[0] and "--resume" in lines[0], lines[0]
    if processes == 1:  # with two, the launcher adds its own report of the failed processes
        assert result.returncode == 2 and result.stderr.strip() == lines[0], result.stderr
    assert debris(small_disk) == []
    assert files_in(output_dir) == before


@pytest.mark.integration
def test_a_plot_that_cannot_be_written_leaves_the_previous_one(finished_run: Path, small_disk: Path) -> None:
    output_dir = Path(shutil.copytree(finished_run, small_disk / "out"))
    before = files_in(output_dir)
    records = MetricsLog.read(output_dir / "metrics.jsonl")
    fill(small_disk, leave=0)

    with pytest.raises(UsageError, match=f"could not write {output_dir / 'curves.png'}: no space left on device"):
        plot_run(records, output_dir / "curves.png", output_dir / "confusion.png")

    assert debris(small_disk) == []
    assert files_in(output_dir) == before


def reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def test_metrics_with_non_finite_values_are_strict_json(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path).append(epoch_record(train_loss=float("nan"), lr=float("inf"), test_loss=-float("inf")))

    (record,) = [json.loads(line, parse_constant=reject_constant) for line in path.read_text().splitlines()]
    assert record == {**epoch_record().as_json(), "train_loss": None, "lr": None, "test_loss": None}
    # Nested values too (progress.json's): a record's confusion matrix holds only counts.
    assert strict_json.dumps({"matrix": [[1.0, -float("inf")]]}) == '{"matrix": [[1.0, null]]}'
