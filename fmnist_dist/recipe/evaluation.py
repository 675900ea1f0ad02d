"""Test-set evaluation across processes: every test image counted exactly once, whatever the process count."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from fmnist_dist.recipe.model import NUM_CLASSES


@dataclass(frozen=True)
class EvalResult:
    """Test loss and accuracy, with every prediction in test-set order (on the CPU, on every process)."""

    loss: float
    accuracy: float
    predictions: torch.Tensor
    targets: torch.Tensor

    @property
    def samples(self) -> int:
        return len(self.targets)

    def confusion_matrix(self) -> torch.Tensor:
        """Counts indexed [true class, predicted class]."""
        pairs = self.targets * NUM_CLASSES + self.predictions
        return torch.bincount(pairs, minlength=NUM_CLASSES * NUM_CLASSES).reshape(NUM_CLASSES, NUM_CLASSES)

    def per_class_accuracy(self) -> list[float]:
        """The fraction of each true class predicted correctly (NaN for a class absent from the test set)."""
        confusion = self.confusion_matrix().double()
        return (confusion.diagonal() / confusion.sum(dim=1)).tolist()


def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator) -> EvalResult:
    """Evaluate on every process's shard of the test set; all processes must call it (it gathers).

    `gather_for_metrics` drops the samples Accelerate duplicated to pad the last round of batches,
    so the totals cover each test image exactly once.
    """
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    predictions, targets = [], []
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            losses = F.cross_entropy(logits.float(), labels, reduction="none")
            losses, predicted, labels = accelerator.gather_for_metrics((losses, logits.argmax(dim=1), labels))
            loss_sum += losses.sum()
            predictions.append(predicted)
            targets.append(labels)
    predictions_cpu, targets_cpu = torch.cat(predictions).cpu(), torch.cat(targets).cpu()
    return EvalResult(
        loss=loss_sum.item() / len(targets_cpu),
        accuracy=(predictions_cpu == targets_cpu).double().mean().item(),
        predictions=predictions_cpu,
        targets=targets_cpu,
    )
