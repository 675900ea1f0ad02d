"""What a user sees around a run: a progress bar only on a terminal (and only from the main process), one line
per epoch always, curves.png and confusion.png at the end (and `plot` to redraw them), and `predict`/`evaluate`
on the saved model, with image files of any size and colour."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_command, cli_env, run_cli, train_args
from PIL import Image

from fmnist_dist.cli import main
from fmnist_dist.inputs.fashion_mnist import load_split
from fmnist_dist.recipe.model import CLASSES
from fmnist_dist.storage.metrics_log import MetricsLog
from fmnist_dist.storage.plots import CONFUSION_SIZE, CURVES_SIZE, DPI

pytestmark = pytest.mark.slow

EPOCHS = 2
BAR_MARKS = ("img/s", "%|", "\u2588")  # tqdm's rate unit, the bar's left edge, a full block
TERMINAL_COLUMNS, TERMINAL_ROWS = 120, 40


@dataclass(frozen=True)
class Job:
    returncode: int
    stdout: str
    stderr: str
    output_dir: Path


def summary_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("epoch ") and "train loss" in line]


def run_on_terminal(command: Sequence[str], cwd: Path, timeout: float = 300, **env: str) -> tuple[int, str]:
    """Run `command` with stdin, stdout and stderr on a pseudo-terminal (120x40), in `cli_env(**env)`; return its
    exit code and output."""
    controller, terminal = pty.openpty()
    # A new pty is 0x0, and tqdm draws nothing on a zero-width terminal.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", TERMINAL_ROWS, TERMINAL_COLUMNS, 0, 0))
    process = subprocess.Popen(command, cwd=cwd, env=cli_env(**env), stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 1.0)[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: every process holding the terminal has exited
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        else:
            process.kill()
            pytest.fail(f"{command} ran past {timeout}s")
    finally:
        os.close(controller)
    return process.wait(timeout=30), b"".join(chunks).decode(errors="replace")


def launch_command(*args: object) -> list[str]:
    """What conftest's launch_cli runs: `accelerate launch` with launch/cpu.yaml, two gloo processes."""
    return [*cli_command(2), *map(str, args)]


@pytest.fixture(scope="module")
def piped_job(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Job:
    """One process trained with its output piped, as in CI logs; its model feeds the inference tests."""
    cwd = tmp_path_factory.mktemp("piped")
    result = run_cli(train_args(data_dir, cwd / "out", "--cpu", "--epochs", str(EPOCHS), "--log-every", "2"), cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return Job(result.returncode, result.stdout, result.stderr, cwd / "out")


# Progress and per-epoch lines


@pytest.mark.integration
def test_no_progress_bar_when_output_is_not_a_terminal(piped_job: Job) -> None:
    for mark in BAR_MARKS:
        assert mark not in piped_job.stderr
    assert [line.split(":")[0] for line in summary_lines(piped_job.stdout)] == ["epoch 1/2", "epoch 2/2"]


@pytest.mark.integration
def test_terminal_shows_one_bar_per_epoch_from_the_main_process_only(data_dir: Path, tmp_path: Path) -> None:
    returncode, output = run_on_terminal(
        launch_command(*train_args(data_dir, tmp_path / "out", "--cpu", "--epochs", str(EPOCHS), "--log-every", "2")),
        tmp_path,
    )
    assert returncode == 0, output[-3000:]
    for epoch in range(1, EPOCHS + 1):
        assert output.count(f"epoch {epoch}/{EPOCHS}:   0%|") == 1  # each process would draw its own bar
    assert "img/s" in output and "loss=" in output
    assert len(summary_lines(output)) == EPOCHS  # printed by the main process alone


@pytest.mark.integration
def test_no_progress_flag_removes_the_bar_on_a_terminal(data_dir: Path, tmp_path: Path) -> None:
    returncode, output = run_on_terminal(
        [
            sys.executable,
            "-m",
            "fmnist_dist",
            *map(str, train_args(data_dir, tmp_path / "out", "--cpu", "--epochs", "1", "--no-progress")),
        ],
        tmp_path,
    )
    assert returncode == 0, output[-3000:]
    for mark in BAR_MARKS:
        assert mark not in output
    assert len(summary_lines(output)) == 1


# Plots


def assert_png(path: Path, size_inches: tuple[float, float]) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (round(size_inches[0] * DPI), round(size_inches[1] * DPI))
        image.verify()


@pytest.mark.integration
def test_training_writes_curves_and_confusion_pngs(piped_job: Job) -> None:
    assert_png(piped_job.output_dir / "curves.png", CURVES_SIZE)
    assert_png(piped_job.output_dir / "confusion.png", CONFUSION_SIZE)


@pytest.mark.integration
def test_plot_command_redraws_the_pngs_from_metrics(piped_job: Job, tmp_path: Path, capsys) -> None:
    shutil.copy(piped_job.output_dir / "metrics.jsonl", tmp_path)
    assert main(["plot", str(tmp_path)]) == 0
    assert_png(tmp_path / "curves.png", CURVES_SIZE)
    assert_png(tmp_path / "confusion.png", CONFUSION_SIZE)
    assert "curves.png" in capsys.readouterr().out


@pytest.mark.parametrize("metrics", [None, "", "not json\n"], ids=["no-metrics-file", "empty", "not-json"])
def test_plot_without_usable_metrics_is_a_one_line_usage_error(tmp_path: Path, capsys, metrics: str | None) -> None:
    if metrics is not None:
        (tmp_path / "metrics.jsonl").write_text(metrics)
    assert main(["plot", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("fmnist-dist: error: ") and "metrics.jsonl" in error
    assert not (tmp_path / "curves.png").exists()


# Inference


@pytest.mark.integration
def test_predict_image_file_matches_the_same_test_image_by_index(
    piped_job: Job, data_dir: Path, tmp_path: Path, capsys
) -> None:
    """A test image saved as a 56x56 RGB PNG, and its negative (light background), predict as the image itself."""
    test_set = load_split(data_dir, train=False, download=False)
    index = 7
    pixels = (test_set[index][0][0].numpy() * 255).round().astype(np.uint8)
    large = np.kron(pixels, np.ones((2, 2), dtype=np.uint8))  # each pixel becomes a 2x2 block
    dark, light = tmp_path / "dark.png", tmp_path / "light.png"
    Image.fromarray(large).convert("RGB").save(dark)
    Image.fromarray(255 - large).convert("RGB").save(light)
    model = str(piped_job.output_dir / "model.pth")

    assert main(["predict", "--checkpoint", model, "--data-dir", str(data_dir), "--index", str(index)]) == 0
    by_index = capsys.readouterr().out.split(": ", 1)[1].split(", actual")[0]
    assert main(["predict", "--checkpoint", model, "--image", str(dark), str(light)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"{dark}: {by_index}", f"{light}: {by_index}"]


@pytest.mark.integration
@pytest.mark.parametrize("mode,size", [("L", (300, 180)), ("RGBA", (20, 20)), ("P", (64, 97)), ("RGB", (28, 28))])
def test_predict_takes_images_of_any_size_and_colour_mode(
    piped_job: Job, tmp_path: Path, capsys, mode: str, size: tuple[int, int]
) -> None:
    path = tmp_path / ("image.jpg" if mode == "L" else "image.png")
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).convert(mode).save(path)
    assert main(["predict", "--checkpoint", str(piped_job.output_dir / "model.pth"), "--image", str(path)]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    predicted = line.split('predicted: "')[1].split('"')[0]
    assert line.startswith(f"{path}: ") and predicted in CLASSES and line.endswith("%)")


@pytest.mark.integration
@pytest.mark.parametrize("content", [b"not an image", None], ids=["not-an-image", "missing"])
def test_predict_bad_image_file_is_a_one_line_usage_error(
    piped_job: Job, tmp_path: Path, capsys, content: bytes | None
) -> None:
    path = tmp_path / "shirt.png"
    if content is not None:
        path.write_bytes(content)
    assert main(["predict", "--checkpoint", str(piped_job.output_dir / "model.pth"), "--image", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"fmnist-dist: error: cannot read image {path}")


def evaluate_saved_model(job: Job, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`fmnist-dist evaluate` of the job's model.pth on the CPU, as one process."""
    checkpoint = job.output_dir / "model.pth"
    args = ["evaluate", "--checkpoint", checkpoint, "--data-dir", data_dir, "--no-download", "--cpu", *extra]
    return run_cli(args, job.output_dir)


@pytest.mark.integration
def test_evaluate_json_has_per_class_accuracy_consistent_with_the_total(piped_job: Job, data_dir: Path) -> None:
    result = evaluate_saved_model(piped_job, data_dir, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    final_epoch = MetricsLog.read(piped_job.output_dir / "metrics.jsonl")[-1]
    assert report["accuracy"] == pytest.approx(final_epoch.test_accuracy)
    assert list(report["per_class_accuracy"]) == list(CLASSES)
    labels = load_split(data_dir, train=False, download=False).targets.tolist()
    counts = [labels.count(c) for c in range(len(CLASSES))]
    correct = sum(acc * n for acc, n in zip(report["per_class_accuracy"].values(), counts, strict=False))
    assert correct / sum(counts) == pytest.approx(report["accuracy"])


@pytest.mark.integration
def test_evaluate_prints_one_line_per_class(piped_job: Job, data_dir: Path) -> None:
    result = evaluate_saved_model(piped_job, data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    total, *per_class = result.stdout.splitlines()
    assert total.startswith("test accuracy ")
    assert [line.split()[0] for line in per_class] == [name.split()[0] for name in CLASSES]
    assert all(line.endswith("%") for line in per_class)
