"""Run tracking: Weights & Biases through Accelerate's tracker API, and the local metrics.jsonl.

Tracking must never stop training: without W&B credentials the run is recorded offline (sync it later with
`wandb sync`), and a tracker that fails to start or to log is reported once and then left out.
"""

from __future__ import annotations

import contextlib
import json
import netrc
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from accelerate import Accelerator

from fmnist_dist import CLASSES, strict_json
from fmnist_dist.checkpoint import atomic_write
from fmnist_dist.errors import first_line

WANDB = "wandb"


class MetricsLog:
    """`metrics.jsonl`: one strict JSON object per epoch (non-finite values as null), rewritten atomically."""

    def __init__(self, path: Path, records: Sequence[dict[str, Any]] = ()) -> None:
        self.path = Path(path)
        self.records = list(records)

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        lines = "".join(strict_json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.path, lambda f: f.write(lines.encode()))

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The records of an existing metrics file."""
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def choose_wandb_mode() -> str | None:
    """Record offline when no W&B credentials are found and the user did not choose a mode; return the mode."""
    if "WANDB_MODE" not in os.environ and not _has_wandb_credentials():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE")


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start_run(
    accelerator: Accelerator,
    project: str,
    run_config: dict[str, Any],
    wandb_kwargs: dict[str, Any],
) -> str | None:
    """Start the job's one W&B run (on the main process; Accelerate makes it a no-op elsewhere); return its id.

    Args:
        accelerator: built with `log_with="wandb"`, or without trackers (then nothing happens).
        project: the W&B project.
        run_config: hyperparameters, world size, device and versions, logged as the run's config.
        wandb_kwargs: extra `wandb.init` arguments (name, group, tags, and `id`/`resume` to continue a run).
    """
    if not accelerator.log_with:
        return None
    try:
        accelerator.init_trackers(project, config=run_config, init_kwargs={WANDB: wandb_kwargs})
    except Exception as error:  # noqa: BLE001 - any tracker failure must leave training running
        reason = f"W&B could not start ({first_line(error)}; check the WANDB_* environment variables)"
        _drop_trackers(accelerator, reason)
        return None
    run = wandb_run(accelerator)
    return run.id if run is not None else None


def wandb_run(accelerator: Accelerator) -> Any | None:
    """The live wandb run on the main process, else None."""
    if not accelerator.is_main_process or not accelerator.trackers:
        return None
    return accelerator.get_tracker(WANDB, unwrap=True)


def log_values(accelerator: Accelerator, values: dict[str, Any], step: int) -> None:
    """Log scalars or media at `step`; a failing tracker is dropped instead of failing the job."""
    if not accelerator.trackers:
        return
    try:
        accelerator.log(values, step=step)
    except Exception as error:  # noqa: BLE001
        _drop_trackers(accelerator, f"W&B logging failed ({first_line(error)})")


def log_predictions(
    accelerator: Accelerator,
    images: torch.Tensor,
    predictions: torch.Tensor,
    targets: torch.Tensor,
    step: int,
) -> None:
    """Log a W&B confusion matrix and a table of sample test images with predicted and true labels.

    Args:
        images: a few test images (N x 1 x 28 x 28, values in [0, 1]) for the table.
        predictions: the predicted class of every test image, in test-set order.
        targets: the true class of every test image, in the same order.
    """
    if wandb_run(accelerator) is None:
        return
    import wandb

    table = wandb.Table(columns=["image", "predicted", "true"])
    for image, predicted, true in zip(images, predictions, targets):
        table.add_data(wandb.Image(image.squeeze(0).cpu().numpy()), CLASSES[predicted], CLASSES[true])
    confusion = wandb.plot.confusion_matrix(
        y_true=targets.tolist(), preds=predictions.tolist(), class_names=list(CLASSES)
    )
    log_values(accelerator, {"test/predictions": table, "test/confusion_matrix": confusion}, step)


def log_model_artifact(accelerator: Accelerator, path: Path) -> None:
    """Attach the saved weights to the run as a W&B model artifact."""
    run = wandb_run(accelerator)
    if run is None:
        return
    import wandb

    try:
        # Artifact names allow letters, digits, '-', '_' and '.'; run names (from --run-name) allow anything.
        name = re.sub(r"[^\w.-]", "-", f"{run.name or run.id}-model")
        artifact = wandb.Artifact(name, type="model")
        artifact.add_file(str(path))
        run.log_artifact(artifact)
    except Exception as error:  # noqa: BLE001
        _warn(f"W&B could not store {path} as an artifact ({first_line(error)})")


def mark_preempting(accelerator: Accelerator) -> None:
    """Tell W&B the run stopped to be resumed (it shows as preempted, not failed or finished)."""
    run = wandb_run(accelerator)
    if run is not None:
        with contextlib.suppress(Exception):  # tracking never fails training; the run is closed next anyway
            run.mark_preempting()


def finish_run(accelerator: Accelerator) -> None:
    """Close the run (on every process: Accelerate makes it a no-op where no tracker runs)."""
    try:
        accelerator.end_training()
    except Exception as error:  # noqa: BLE001
        _warn(f"W&B did not close cleanly ({first_line(error)})")


def _drop_trackers(accelerator: Accelerator, reason: str) -> None:
    for tracker in accelerator.trackers:
        with contextlib.suppress(Exception):  # close a half-started run; there may be none to close
            tracker.finish()
    accelerator.trackers = []
    _warn(f"{reason}; training goes on without W&B tracking")


def _warn(message: str) -> None:
    # One plain line on stderr, like the CLI's errors (a Python warning would add its source file and line).
    print(f"fmnist-dist: warning: {message}", file=sys.stderr, flush=True)
