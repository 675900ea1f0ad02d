"""What a tracker does for a training job, whichever service it records the run on.

A job makes one tracker (`registry.make_tracker`) for its Accelerator, starts it once, logs through it while
training and finishes it at the end; every process makes the same calls, and a tracker acts where it should (the
main process, for most). Tracking never stops training: a tracker that fails reports it once, in a warning, and
goes on without recording.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator


@dataclass(frozen=True)
class RunSpec:
    """The tracked run: where it goes, what it is called, and what defines it.

    Attributes:
        project: the project the run belongs to.
        config: hyperparameters, world size, device and versions, recorded as the run's configuration.
        name, group, tags: how the run is named and grouped (None or empty: the tracker's own choice).
        resume_id: the id `Tracker.start` returned for the job this one resumes (saved in its state), so that both
            are one run; None for a fresh job.
        sweep_id: the W&B sweep this job is a trial of (`tracking.sweep`), whose agent has named the run; None
            outside a sweep.
    """

    project: str
    config: dict[str, Any]
    name: str | None = None
    group: str | None = None
    tags: tuple[str, ...] = ()
    resume_id: str | None = None
    sweep_id: str | None = None


class Tracker(ABC):
    """Records one training job as one run. Each method may be called on every process.

    Args:
        accelerator: the job's Accelerator, built with `log_with=<the class's log_with>`.
    """

    # The Accelerate tracker this one logs through (`Accelerator(log_with=...)`), or None.
    log_with: ClassVar[str | None] = None

    def __init__(self, accelerator: Accelerator) -> None:
        self.accelerator = accelerator

    @abstractmethod
    def start(self, run: RunSpec) -> str | None:
        """Start the run (once per job, before anything is logged); return its id, which the job saves in its
        states and passes back as `run.resume_id` when it is resumed; None when there is no run to continue."""

    @abstractmethod
    def log_values(self, values: Mapping[str, float], step: int) -> None:
        """Record scalars (a loss, a rate, an epoch's `EpochRecord.tracker_values`) at optimizer step `step`."""

    @abstractmethod
    def log_predictions(
        self, images: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor, step: int
    ) -> None:
        """Record the test set's confusion matrix and a table of sample images with predicted and true labels.

        Args:
            images: a few test images (N x 1 x 28 x 28, values in [0, 1]): the first N of the test set.
            predictions: the predicted class of every test image, in test-set order.
            targets: the true class of every test image, in the same order.
            step: the optimizer step they belong to.
        """

    @abstractmethod
    def log_artifact(self, path: Path, kind: str) -> None:
        """Store the file or directory at `path` with the run, as a `kind` ("model" for the saved weights,
        "profile" for a directory of profiler traces)."""

    @abstractmethod
    def mark_preempted(self) -> None:
        """Say that the job stopped to be resumed (a preemption), not that it failed or finished."""

    @abstractmethod
    def finish(self) -> None:
        """End the run (every process calls this once, also after a failure)."""


def warn(message: str) -> None:
    """One plain line on stderr, like the CLI's errors (a Python warning would add its source file and line)."""
    print(f"fmnist-dist: warning: {message}", file=sys.stderr, flush=True)
