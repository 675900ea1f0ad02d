"""Resumable training state: Accelerate's `save_state` plus the loop's own progress, written atomically.

A state lives in `<output-dir>/state/step-<global step>/`. It is written under a temporary name and renamed
only once every process has finished writing, so a state directory with that name is always complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.recipe.position import TrainingPosition
from fmnist_dist.runtime.collective_errors import fail_together
from fmnist_dist.settings.train_config import MAX_COUNT, RESUME_AUTO, RESUME_LATEST
from fmnist_dist.storage import strict_json
from fmnist_dist.storage.atomic_files import atomic_write, reporting_write_errors
from fmnist_dist.storage.metrics_log import EpochRecord, is_number, metrics_record_problem
from fmnist_dist.storage.run_dir import (
    PROGRESS_FILE,
    TMP_PREFIX,
    RunDirectory,
    is_state_name,
    is_unfinished_state_name,
    tmp_state,
    trash_state,
)


@dataclass
class Progress:
    """What a state holds besides Accelerate's objects: the position, the epoch's totals and the run's record.

    Attributes:
        position: where training stands (epoch, images of its global order trained, optimizer steps).
        epoch_loss_sum, epoch_samples: summed training loss and image count of the epoch so far, over all
            processes (so a resumed run reports the same epoch loss as an uninterrupted one).
        dataset_size: training images; a state resumes only on the same training set.
        world_size, per_process_batch, global_batch_size: how the run that saved it was split.
        config: the run's settings (`TrainConfig.to_log()`), the defaults of a resumed run.
        wandb_run_id: the W&B run to continue.
        metrics: the records of the finished epochs.
        save_index: this state's place in the order of the saves into its output directory (1 for the first).
            Newest means most recently saved: a run resumed from an older state saves lower step numbers than
            the states of the run it abandoned, and it is still the run that `--resume auto` must continue.
    """

    position: TrainingPosition = field(default_factory=TrainingPosition)
    epoch_loss_sum: float = 0.0
    epoch_samples: int = 0
    dataset_size: int = 0
    world_size: int = 1
    per_process_batch: int = 0
    global_batch_size: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    wandb_run_id: str | None = None
    metrics: list[EpochRecord] = field(default_factory=list)
    save_index: int = 0

    @property
    def global_step(self) -> int:
        return self.position.global_step

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Progress:
        """The progress a state's `progress.json` holds.

        Raises:
            ValueError, TypeError, KeyError: the file is not a state's progress, or its position is impossible.
        """
        progress = cls(**{**saved, "position": TrainingPosition(**saved["position"])})
        if problem := _progress_problem(progress):  # the records are checked as saved, then typed
            raise ValueError(problem)
        progress.metrics = [EpochRecord.from_json(record) for record in progress.metrics]
        return progress

    def finish_epoch(self, record: EpochRecord) -> None:
        """Move on to the next epoch after `record`, the finished epoch's metrics."""
        self.metrics.append(record)
        self.position.next_epoch()
        self.epoch_loss_sum = 0.0
        self.epoch_samples = 0


def save_training_state(accelerator: Accelerator, output_dir: Path, progress: Progress, keep: int) -> Path:
    """Save model, optimizer, RNG states and `progress` (all processes call this); keep the newest `keep` states.

    Raises:
        UsageError: on every process, when any process could not write its part (a full disk, say); the
            unfinished state is removed and the earlier states are left as they were.
    """
    run_dir = RunDirectory(Path(output_dir))
    root, final = run_dir.states, run_dir.state(progress.global_step)
    tmp = tmp_state(final)
    advice = "the earlier states are intact; free some space, then continue with --resume"
    try:
        # Each stretch ends with an exchange of errors, which is also the barrier between the stretches.
        with fail_together(accelerator), reporting_write_errors(final, advice):
            if accelerator.is_main_process:
                _remove_unfinished(root)
                tmp.mkdir(parents=True)
                saved = complete_states(root)  # in save order: the last one has the highest index
                progress.save_index = 1 + (_save_index(saved[-1]) if saved else 0)
        with fail_together(accelerator), reporting_write_errors(final, advice):
            accelerator.save_state(str(tmp))
        with fail_together(accelerator), reporting_write_errors(final, advice):
            if accelerator.is_main_process:
                text = strict_json.dumps(asdict(progress), indent=1)
                atomic_write(tmp / PROGRESS_FILE, lambda f: f.write(text.encode()))
                if final.exists():  # a state of the same step from a replayed stretch
                    discard_state(final)
                tmp.rename(final)
                _prune(root, keep)
    except Exception:
        if accelerator.is_main_process:  # after the exchange: no process writes into it any more
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _progress_problem(progress: Progress) -> str | None:
    """What makes a loaded progress impossible (a hand edit, another program's file), or None."""
    position = progress.position
    counts = {
        "position.epoch": position.epoch,
        "position.samples_done": position.samples_done,
        "position.global_step": position.global_step,
        "save_index": progress.save_index,
    }
    sizes = {
        "dataset_size": progress.dataset_size,
        "world_size": progress.world_size,
        "per_process_batch": progress.per_process_batch,
        "global_batch_size": progress.global_batch_size,
    }
    bounds = [(name, value, 0) for name, value in counts.items()] + [(name, value, 1) for name, value in sizes.items()]
    for name, value, least in bounds:
        if not (type(value) is int and least <= value <= MAX_COUNT):
            return f"{name} is {value!r}, not a whole number from {least} to {MAX_COUNT}"
    if position.samples_done > progress.dataset_size:
        return f"position.samples_done {position.samples_done} is past the {progress.dataset_size} training images"
    for name in ("epoch_loss_sum", "epoch_samples"):
        value = getattr(progress, name)
        if not (is_number(value) and 0 <= value < math.inf):
            return f"{name} is {value!r}, not a finite number of at least 0"
    if not (isinstance(progress.config, dict) and isinstance(progress.metrics, list)):
        return "its config is not an object or its metrics not a list"
    if not (progress.wandb_run_id is None or isinstance(progress.wandb_run_id, str)):
        return f"wandb_run_id is {progress.wandb_run_id!r}, not a string"
    for number, record in enumerate(progress.metrics, 1):
        if problem := metrics_record_problem(record):
            return f"its record of epoch {number}: {problem}"
    return None


def find_state(output_dir: Path, resume: str) -> Path | None:
    """The state to resume from: `resume` itself if it names a state, else the newest in the output dir.

    Returns None for `--resume auto` when the output dir holds no state yet (a fresh start).

    Raises:
        UsageError: `resume` names no complete state, or `--resume` finds none; the message lists those there are.
    """
    root = RunDirectory(Path(output_dir)).states
    if resume not in (RESUME_AUTO, RESUME_LATEST):
        return _named_state(Path(resume), root)
    states = complete_states(root)
    if states or resume == RESUME_AUTO:
        return states[-1] if states else None
    raise UsageError(
        f"--resume: no saved training state in {root}; train without --resume first (or use --resume auto), "
        "or pass --output-dir of the run to continue"
    )


def _named_state(path: Path, root: Path) -> Path:
    if path.name.startswith(TMP_PREFIX):
        problem = "is an unfinished state (its save was interrupted)"
    elif (path / PROGRESS_FILE).is_file():
        return path
    elif not path.exists():
        problem = "does not exist"
    else:
        problem = f"is not a saved training state (no {PROGRESS_FILE})"
    states = complete_states(root)
    choices = f"states in {root}: {', '.join(p.name for p in states)}" if states else f"there is no state in {root}"
    raise UsageError(f"--resume {path} {problem}; {choices} (or pass --resume to take the newest)")


def read_progress(state_dir: Path) -> Progress:
    """The progress saved in a state's progress.json (model and optimizer are restored by `restore_state`)."""
    try:
        return Progress.from_dict(json.loads((state_dir / PROGRESS_FILE).read_text()))
    except Exception as error:
        raise UsageError(_unreadable(state_dir, error)) from error


def restore_state(accelerator: Accelerator, state_dir: Path) -> None:
    """Restore the prepared model and optimizer and the RNG states from `state_dir` (all processes call this)."""
    try:
        accelerator.load_state(str(state_dir))
    except Exception as error:
        raise UsageError(_unreadable(state_dir, error)) from error


def _unreadable(state_dir: Path, error: BaseException) -> str:
    return (
        f"--resume: the state {state_dir} cannot be read ({type(error).__name__}: {first_line(error)}); "
        "pass an earlier state with --resume STATE_DIR, or start afresh with --overwrite"
    )


def complete_states(root: Path) -> list[Path]:
    """Finished state directories under `root`, in the order they were saved (see `Progress.save_index`).

    Only the names fmnist-dist gives (`step-` and the step's digits) count: a copy the user made beside them
    (`step-000000120-mine`) is never resumed by `--resume auto`, pruned by `--keep-states` or removed by
    `--overwrite` (`--resume` takes it when named).
    """
    if not root.is_dir():
        return []
    states = sorted(p for p in root.iterdir() if is_state_name(p.name) and (p / PROGRESS_FILE).is_file())
    return sorted(states, key=_save_index)  # stable: states of older versions, all 0, stay in step order


def _save_index(state_dir: Path) -> int:
    """A state's `save_index`; 0 where progress.json cannot tell (resuming from it reports why)."""
    try:
        index = json.loads((state_dir / PROGRESS_FILE).read_text()).get("save_index", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return index if isinstance(index, int) else 0


def unfinished_states(root: Path) -> list[Path]:
    """The `.tmp-step-*` and `.trash-step-*` directories that interrupted saves and deletions left under `root`
    (only fmnist-dist makes them)."""
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if p.is_dir() and is_unfinished_state_name(p.name)]


def _remove_unfinished(root: Path) -> None:
    for unfinished in unfinished_states(root):
        shutil.rmtree(unfinished, ignore_errors=True)


def discard_state(state: Path) -> None:
    """Delete a complete state, renaming it to a `.trash-` name first, so that an interruption never leaves a
    part of it under a state's name (where `--resume auto` would take it); the next save clears the rest.

    Raises:
        OSError: it could not be renamed or deleted.
    """
    trash = trash_state(state)
    shutil.rmtree(trash, ignore_errors=True)  # left by an earlier interrupted discard of the same step
    state.rename(trash)
    shutil.rmtree(trash)


def _prune(root: Path, keep: int) -> None:
    for old in complete_states(root)[:-keep]:
        with contextlib.suppress(OSError):  # an old state that cannot be deleted is only space
            discard_state(old)
