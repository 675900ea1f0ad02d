"""Resumable training state: Accelerate's `save_state` plus the loop's own progress, written atomically.

A state lives in `<output-dir>/state/step-<global step>/`. It is written under a temporary name and renamed
only once every process has finished writing, so a state directory with that name is always complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from fmnist_dist.checkpoint import atomic_write
from fmnist_dist.errors import UsageError, first_line

STATE_DIR = "state"
PROGRESS_FILE = "progress.json"
STATE_PREFIX = "step-"
TMP_PREFIX = ".tmp-"


@dataclass
class Progress:
    """Where the loop stands: the epoch under way and how many of its batches are done, and what to carry on."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    epoch_loss_sum: float = 0.0
    epoch_samples: int = 0
    wandb_run_id: str | None = None
    world_size: int = 1
    batch_size: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def finish_epoch(self, record: dict[str, Any]) -> None:
        """Move on to the next epoch after `record`, the finished epoch's metrics."""
        self.metrics.append(record)
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_loss_sum = 0.0
        self.epoch_samples = 0


def save_training_state(accelerator: Accelerator, output_dir: Path, progress: Progress, keep: int) -> Path:
    """Save model, optimizer, RNG states and `progress` (all processes call this); keep the newest `keep` states."""
    root = Path(output_dir) / STATE_DIR
    final = root / f"{STATE_PREFIX}{progress.global_step:09d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        _remove_unfinished(root)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        text = json.dumps(asdict(progress), indent=1)
        atomic_write(tmp / PROGRESS_FILE, lambda f: f.write(text.encode()))
        shutil.rmtree(final, ignore_errors=True)  # a state of the same step from a replayed stretch
        tmp.rename(final)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def find_state(output_dir: Path, resume: str) -> Path:
    """The state to resume from: `resume` itself if it is a state directory, else the newest in the output dir."""
    if resume != "latest":
        path = Path(resume)
        if path.name.startswith(TMP_PREFIX):
            raise UsageError(f"--resume {path}: an unfinished state (its save was interrupted); pass a step-* dir")
        if not (path / PROGRESS_FILE).is_file():
            raise UsageError(f"--resume {path}: not a saved training state (no {PROGRESS_FILE}); pass a state dir")
        return path
    states = complete_states(Path(output_dir) / STATE_DIR)
    if not states:
        raise UsageError(
            f"--resume: no saved training state in {Path(output_dir) / STATE_DIR}; "
            "train without --resume first, or pass --output-dir of the run to continue"
        )
    return states[-1]


def load_training_state(accelerator: Accelerator, state_dir: Path) -> Progress:
    """Restore model, optimizer and RNG states from `state_dir` (all processes call this); return its progress."""
    try:
        progress = Progress(**json.loads((state_dir / PROGRESS_FILE).read_text()))
        accelerator.load_state(str(state_dir))
    except Exception as error:  # noqa: BLE001 - damaged files fail in json, safetensors, torch or pickle readers
        raise UsageError(
            f"--resume: the state {state_dir} cannot be read ({type(error).__name__}: {first_line(error)}); "
            "pass an earlier state with --resume STATE_DIR, or train again without --resume"
        ) from error
    return progress


def complete_states(root: Path) -> list[Path]:
    """Finished state directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob(f"{STATE_PREFIX}*") if (p / PROGRESS_FILE).is_file())


def clear_states(output_dir: Path) -> None:
    """Forget an earlier run's states, so that a fresh run's `--resume` never picks them up."""
    shutil.rmtree(Path(output_dir) / STATE_DIR, ignore_errors=True)


def _remove_unfinished(root: Path) -> None:
    for unfinished in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(unfinished, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    for old in complete_states(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
