"""Training curves and the confusion matrix as PNG files, drawn from the metrics records."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and clusters
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fmnist_dist import CLASSES  # noqa: E402
from fmnist_dist.checkpoint import atomic_write, file_problem  # noqa: E402
from fmnist_dist.errors import UsageError, first_line  # noqa: E402

DPI = 100
CURVES_SIZE = (10, 4)  # inches; at DPI, 1000 x 400 pixels
CONFUSION_SIZE = (8, 7)  # inches; at DPI, 800 x 700 pixels
PLOTTED_VALUES = ("train_loss", "test_loss", "test_accuracy")  # besides the epoch and the confusion matrix


def plot_run(records: Sequence[dict[str, Any]], curves_path: Path, confusion_path: Path) -> None:
    """Draw `curves.png` (losses and accuracy per epoch) and `confusion.png` (the last epoch's matrix)."""
    plot_curves(records, curves_path)
    plot_confusion(records[-1]["confusion_matrix"], confusion_path)


def plot_curves(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Train and test loss (left) and test accuracy (right) against the epoch."""
    epochs = [r["epoch"] for r in records]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=CURVES_SIZE, dpi=DPI)
    loss_ax.plot(epochs, [r["train_loss"] for r in records], marker="o", label="train")
    loss_ax.plot(epochs, [r["test_loss"] for r in records], marker="o", label="test")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [100 * r["test_accuracy"] for r in records], marker="o", color="tab:green")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Test accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, also for a one-epoch run
    _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], path: Path) -> None:
    """A 10x10 confusion matrix with the class names, true classes down, predictions across."""
    fig, ax = plt.subplots(figsize=CONFUSION_SIZE, dpi=DPI)
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="test images")  # as tall as the matrix
    ticks = range(len(CLASSES))
    ax.set_xticks(ticks, CLASSES, rotation=45, ha="right")
    ax.set_yticks(ticks, CLASSES)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (test set)")
    threshold = max(max(row) for row in matrix) / 2
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, count, ha="center", va="center", fontsize=8, color="white" if count > threshold else "black")
    _save(fig, path)


def records_for_plot(metrics_path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, refusing a missing or empty file and any line that is not a record.

    Raises:
        UsageError: naming the file, or the line of it, that cannot be plotted.
    """
    if problem := file_problem(metrics_path):
        raise UsageError(f"{metrics_path} {problem}; pass the --output-dir of a finished training run")
    try:
        lines = metrics_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {metrics_path} ({first_line(error)}); pass a run's --output-dir") from error
    records = [_metrics_record(line, number, metrics_path) for number, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise UsageError(f"{metrics_path} holds no epochs yet; plot after the first epoch has finished")
    return records


def _metrics_record(line: str, number: int, path: Path) -> dict[str, Any]:
    """Line `number` of `path` as a metrics record, or a UsageError naming the line and what is wrong with it."""
    try:
        record = json.loads(line)
    except ValueError as error:
        problem = f"not JSON: {first_line(error)}"
    else:
        problem = metrics_record_problem(record)
    if problem:
        raise UsageError(f"line {number} of {path} is not an fmnist-dist metrics record ({problem}); "
                         "pass the metrics.jsonl or --output-dir of a training run")
    return record


def metrics_record_problem(record: Any) -> str | None:
    """What keeps a parsed metrics record (a line of metrics.jsonl) from being plotted, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if missing := [key for key in ("epoch", *PLOTTED_VALUES, "confusion_matrix") if key not in record]:
        return f"no {', '.join(missing)}"
    if not is_number(record["epoch"]):
        return f"epoch is {record['epoch']!r}, not a number"
    # null is what the training writes for a non-finite loss or accuracy (strict JSON); matplotlib leaves a gap.
    if wrong := [key for key in PLOTTED_VALUES if record[key] is not None and not is_number(record[key])]:
        return f"{wrong[0]} is {record[wrong[0]]!r}, not a number"
    if not _is_confusion_matrix(record["confusion_matrix"]):
        return f"confusion_matrix is not {len(CLASSES)} rows of {len(CLASSES)} counts"
    return None


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (which JSON keeps apart, and Python does not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_confusion_matrix(matrix: Any) -> bool:
    return (isinstance(matrix, list) and len(matrix) == len(CLASSES)
            and all(isinstance(row, list) and len(row) == len(CLASSES) and all(map(_is_count, row)) for row in matrix))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _save(fig: plt.Figure, path: Path) -> None:
    """Write the figure as PNG atomically: a failed redraw leaves the previous plot whole."""
    try:
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
