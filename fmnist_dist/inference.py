"""`evaluate` and `predict`: a saved model on the test set, on chosen test images, or on image files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from fmnist_dist.errors import UsageError
from fmnist_dist.inputs.backgrounds import Background
from fmnist_dist.inputs.fashion_mnist import load_split
from fmnist_dist.inputs.images import load_image
from fmnist_dist.recipe.data import make_loader
from fmnist_dist.recipe.evaluation import EvalResult, evaluate
from fmnist_dist.recipe.model import CLASSES
from fmnist_dist.runtime.collective_errors import on_main_process_first
from fmnist_dist.runtime.devices import wants_cpu
from fmnist_dist.storage.weights import load_model


@dataclass(frozen=True)
class Prediction:
    """One image's predicted class and probability, with its true class when known."""

    source: str
    predicted: str
    probability: float
    actual: str | None = None


def evaluate_checkpoint(checkpoint: Path, data_dir: Path, download: bool, batch_size: int, cpu: bool) -> EvalResult:
    """Test-set accuracy and loss of saved weights (also under `accelerate launch`, sharded across processes)."""
    accelerator = Accelerator(cpu=wants_cpu(cpu))
    model = load_model(checkpoint)
    test_set = on_main_process_first(accelerator, lambda: load_split(data_dir, train=False, download=download))
    model, loader = accelerator.prepare(model, make_loader(test_set, batch_size, False, 0, False))
    try:
        return evaluate(model, loader, accelerator)
    finally:
        accelerator.end_training()  # shuts the process group down; a launched process may abort at exit without


def predict_test_images(checkpoint: Path, data_dir: Path, download: bool, indices: Sequence[int]) -> list[Prediction]:
    """Predictions for test images chosen by index, as in the quickstart's last step."""
    test_set = load_split(data_dir, train=False, download=download)
    if bad := [i for i in indices if not 0 <= i < len(test_set)]:
        raise UsageError(f"--index {bad[0]} is outside the test set (0-{len(test_set) - 1}); pick an index in range")
    images = torch.stack([test_set[i][0] for i in indices])
    actual: list[str | None] = [CLASSES[int(test_set[i][1])] for i in indices]
    return _predict(checkpoint, images, [f"test[{i}]" for i in indices], actual)


def predict_files(checkpoint: Path, paths: Sequence[Path], background: Background = "auto") -> list[Prediction]:
    """Predictions for image files (PNG, JPEG, any size), converted to 28x28 grayscale like the training data.

    Args:
        background: the ground the garments stand on ("white", "black"), or "auto" to judge it per image
            (`inputs.images.load_image`).
    """
    images = torch.stack([load_image(path, background) for path in paths])
    return _predict(checkpoint, images, [str(p) for p in paths], [None] * len(paths))


def _predict(checkpoint: Path, images: torch.Tensor, sources: list[str], actual: list[str | None]) -> list[Prediction]:
    model = load_model(checkpoint).eval()
    with torch.no_grad():
        probabilities = model(images).softmax(dim=1)
    best, classes = probabilities.max(dim=1)
    return [
        Prediction(source, CLASSES[int(c)], float(p), true)
        for source, c, p, true in zip(sources, classes, best, actual, strict=True)
    ]
