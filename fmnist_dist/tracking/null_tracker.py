"""`--tracker none`: the run is recorded only in its output directory (metrics.jsonl, plots, model.pth)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from fmnist_dist.tracking.base import RunSpec, Tracker


class NullTracker(Tracker):
    """A tracker that records nothing and starts no run."""

    def start(self, run: RunSpec) -> str | None:
        return None

    def log_values(self, values: Mapping[str, float], step: int) -> None:
        pass

    def log_predictions(
        self, images: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor, step: int
    ) -> None:
        pass

    def log_artifact(self, path: Path, kind: str) -> None:
        pass

    def mark_preempted(self) -> None:
        pass

    def finish(self) -> None:
        pass
