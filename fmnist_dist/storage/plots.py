"""Training curves and the confusion matrix as PNG files, drawn from the metrics records."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and clusters
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from fmnist_dist.recipe.model import CLASSES
from fmnist_dist.storage.atomic_files import atomic_write
from fmnist_dist.storage.metrics_log import ConfusionMatrix, EpochRecord

DPI = 100
CURVES_SIZE = (10, 4)  # inches; at DPI, 1000 x 400 pixels
CONFUSION_SIZE = (8, 7)  # inches; at DPI, 800 x 700 pixels
COLORS = {"train": "tab:blue", "validation": "tab:orange", "test": "tab:green"}  # the same in both panels


def plot_run(records: Sequence[EpochRecord], curves_path: Path, confusion_path: Path) -> list[Path]:
    """Draw `curves.png` (losses and accuracies per epoch) and `confusion.png` (the confusion matrix of the last
    epoch that scored the test set; none is drawn before one has, as in a run with `--val-size` stopped early on).

    Returns:
        The files written.
    """
    plot_curves(records, curves_path)
    matrices = [r.confusion_matrix for r in records if r.confusion_matrix is not None]
    if not matrices:
        return [curves_path]
    plot_confusion(matrices[-1], confusion_path)
    return [curves_path, confusion_path]


def plot_curves(records: Sequence[EpochRecord], path: Path) -> None:
    """Train, validation and test loss (left) and validation and test accuracy (right) against the epoch.

    A value that was not finite, or not scored (None), leaves a gap: with `--val-size` the test set is scored at the
    end of the run, a single point. Without a validation split the plot shows train and test loss and the test
    accuracy, as it always did.
    """
    epochs = [r.epoch for r in records]
    validated = any(r.val_loss is not None for r in records)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=CURVES_SIZE, dpi=DPI)
    loss_ax.plot(epochs, [r.train_loss for r in records], marker="o", color=COLORS["train"], label="train")
    if validated:
        loss_ax.plot(epochs, [r.val_loss for r in records], marker="o", color=COLORS["validation"], label="validation")
    loss_ax.plot(epochs, [r.test_loss for r in records], marker="o", color=COLORS["test"], label="test")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    loss_ax.legend()
    if validated:
        acc_ax.plot(
            epochs,
            _percent([r.val_accuracy for r in records]),
            marker="o",
            color=COLORS["validation"],
            label="validation",
        )
    acc_ax.plot(epochs, _percent([r.test_accuracy for r in records]), marker="o", color=COLORS["test"], label="test")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy" if validated else "Test accuracy")
    if validated:
        acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, also for a one-epoch run
    _save(fig, path)


def _percent(fractions: list[float | None]) -> list[float | None]:
    return [None if fraction is None else 100 * fraction for fraction in fractions]


def plot_confusion(matrix: ConfusionMatrix, path: Path) -> None:
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
            ax.text(
                j, i, str(count), ha="center", va="center", fontsize=8, color="white" if count > threshold else "black"
            )
    _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> None:
    """Write the figure as PNG atomically: a failed redraw leaves the previous plot whole."""
    try:
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
