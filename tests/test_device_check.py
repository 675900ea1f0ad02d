"""benchmarks/device_check.py: the one command a lent GPU runs. Smoke-run here on the CPU (`--quick`), so that it
is never broken when a device is lent, and without wandb, which the GPU machines lack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, cli_env

pytestmark = pytest.mark.integration  # real processes: see tests/conftest.py

DEVICE_CHECK = REPO / "benchmarks" / "device_check.py"
# The rows of every run, by the start of their first column (the quick run on the CPU has each of them once).
EXPECTED_ROWS = (
    "machine",
    "synthetic data (6,400 train / 1,000 test images)",
    "train fp32 on cpu (the defaults, 2 epochs)",
    "time for 2 epochs with the defaults (6,400 synthetic images)",
    "throughput metrics on cpu (the defaults' last epoch)",
    "profile 5 steps on cpu (--profile-steps)",
    "train bf16 on cpu (1 epoch)",
    "train fp16 on cpu (1 epoch), with its gradient scaler",
    "train with --data-on-device on (1 epoch)",
    "train with --data-on-device off (1 epoch)",
    "weights, --data-on-device on vs off",
    "evaluate on cpu",
    "predict on cpu (--index 0 1 2)",
    "state saved on cpu, resumed on cpu (last epoch)",
    "weights of a state saved on cpu, restored on cpu",
    "host reads in training steps that log nothing (",
    "epoch benchmark a. quickstart on cpu",
    "epoch benchmark b. fmnist-dist on cpu",
    "epoch benchmark c. floor on cpu",
    "epoch benchmark d. end to end on cpu",
    "epoch benchmark c'. floor in its own process on cpu",
    "epoch benchmark, 1 round(s) (all rows)",
    "all rows",
)


def without_wandb(tmp_path: Path) -> str:
    """A PYTHONPATH entry under which `import wandb` fails as it does where wandb is not installed."""
    shadow = tmp_path / "no-wandb" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'wandb' (hidden by the test)\")\n")
    return str(shadow.parent)


def device_check(args: list[str], tmp_path: Path, timeout: float) -> subprocess.CompletedProcess:
    env = cli_env(PYTHONPATH=f"{REPO}:{without_wandb(tmp_path)}")
    return subprocess.run(
        [sys.executable, str(DEVICE_CHECK), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The table's rows by their first column: [result, seconds]."""
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    assert lines[:2] == ["| what | result | seconds |", "| --- | --- | --- |"], stdout
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {row[0]: row[1:] for row in rows}


@pytest.mark.slow
def test_quick_cpu_run_passes_every_row_without_wandb(tmp_path: Path) -> None:
    done = device_check(["--device", "cpu", "--quick", "--workdir", str(tmp_path / "work")], tmp_path, timeout=1800)

    assert done.returncode == 0, done.stdout + done.stderr
    assert all(line.startswith("|") for line in done.stdout.splitlines()), "stdout is one Markdown table"
    rows = table_rows(done.stdout)
    for expected in EXPECTED_ROWS:
        assert any(what.startswith(expected) for what in rows), f"no row {expected!r} in\n{done.stdout}"
    assert not [what for what, (result, _) in rows.items() if result.startswith("fail")], done.stdout
    assert rows["train fp16 on cpu (1 epoch), with its gradient scaler"][0].startswith("refused as documented")
    resumed = rows["state saved on cpu, resumed on cpu (last epoch)"][0]
    assert resumed == "pass: vs the uninterrupted cpu run: bit-identical"
    host_reads = next(result for what, (result, _) in rows.items() if what.startswith("host reads"))
    assert host_reads.startswith("pass: 0 ")


def test_a_device_that_is_not_there_is_refused_in_one_line(tmp_path: Path) -> None:
    done = device_check(["--device", "cuda"], tmp_path, timeout=120)  # cli_env hides every GPU

    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("device_check: error: --device cuda: no cuda device is available here")
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_an_unknown_device_is_refused_in_one_line(tmp_path: Path) -> None:
    done = device_check(["--device", "tpu"], tmp_path, timeout=120)

    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "--device" in done.stderr, done.stderr
