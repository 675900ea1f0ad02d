"""Resumable training state: Accelerate's `save_state` plus the loop's own progress, written atomically.

A state lives in `<output-dir>/state/step-<global step>/`. It is written under a temporary name and renamed
only once every process has finished writing, so a state directory with that name is always complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from accelerate import Accelerator
from torch import nn

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.recipe.position import TrainingPosition
from fmnist_dist.runtime.collective_errors import fail_together
from fmnist_dist.settings.train_config import MAX_COUNT, RESUME_AUTO, RESUME_LATEST
from fmnist_dist.storage import strict_json
from fmnist_dist.storage.atomic_files import atomic_write, reporting_write_errors, umask_file_mode
from fmnist_dist.storage.metrics_log import EpochRecord, is_number, metrics_record_problem
from fmnist_dist.storage.run_dir import (
    BEST_MODEL_FILE,
    COMPLETE_PREFIX,
    PROGRESS_FILE,
    STATE_WEIGHTS_FILE,
    TMP_PREFIX,
    RunDirectory,
    complete_state,
    final_state,
    is_complete_state_name,
    is_unfinished_state_name,
    tmp_state,
    trash_state,
)

# The options of an optimizer's parameter group that a resumed run sets itself after the restore: the rate (the
# schedule), momentum and weight decay (the settings), the schedule's base rate; and the parameters.
RESET_AFTER_RESTORE = frozenset({"lr", "initial_lr", "momentum", "weight_decay", "params"})
OLD_RUN_ID = "wandb_run_id"  # progress.json's name of `tracker_run_id` in states of earlier versions


@dataclass
class Progress:
    """What a state holds besides Accelerate's objects: the position, the epoch's totals and the run's record.

    Attributes:
        position: where training stands (epoch, images of its global order trained, optimizer steps).
        epoch_loss_sum, epoch_samples: summed training loss and image count of the epoch so far, over all
            processes (so a resumed run reports the same epoch loss as an uninterrupted one).
        dataset_size: training images trained on (the training set less its validation split, `--val-size`); a
            state resumes only on the same training set.
        training_data: what it was trained on, {"data_dir": ..., "fingerprint": ...}
            (`inputs.fashion_mnist.fingerprint` of the whole training set's images and labels, its validation
            split included); None in states saved before it was recorded.
        world_size, per_process_batch, global_batch_size: how the run that saved it was split.
        config: the run's settings (`TrainConfig.to_log()`), the defaults of a resumed run.
        tracker_run_id: the tracker's run to continue (the W&B run id); saved as `wandb_run_id` before.
        metrics: the records of the finished epochs.
        save_index: this state's place in the order of the saves into its output directory (1 for the first).
            Newest means most recently saved: a run resumed from an older state saves lower step numbers than
            the states of the run it abandoned, and it is still the run that `--resume auto` must continue.
        best_value, best_epoch: with `--val-size`, the best value of `--monitor` so far and the epoch (from 1) that
            reached it, whose weights are model-best.pth; None before the first epoch, without a validation split,
            and in states saved before they were kept.
        epochs_without_improvement: finished epochs since `best_epoch` (what `--early-stopping-patience` counts);
            0 in states saved before it was kept.
    """

    position: TrainingPosition = field(default_factory=TrainingPosition)
    epoch_loss_sum: float = 0.0
    epoch_samples: int = 0
    dataset_size: int = 0
    world_size: int = 1
    per_process_batch: int = 0
    global_batch_size: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    tracker_run_id: str | None = None
    metrics: list[EpochRecord] = field(default_factory=list)
    save_index: int = 0
    training_data: dict[str, str] | None = None
    best_value: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0

    @property
    def global_step(self) -> int:
        return self.position.global_step

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Progress:
        """The progress a state's `progress.json` holds.

        Raises:
            ValueError, TypeError, KeyError: the file is not a state's progress, or its position is impossible.
        """
        saved = dict(saved)
        if OLD_RUN_ID in saved:  # a state saved before the run id was named for what it is
            saved.setdefault("tracker_run_id", saved.pop(OLD_RUN_ID))
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

    At every moment of the save, of the replacement of a state of the same step and of the pruning, `--resume
    auto` finds a complete state, the newest one there is: the new state is written under `.tmp-step-N`,
    renamed to `.complete-step-N` once complete (resumable from then on, and newer than any `step-N`), and only
    then does it replace an older `step-N` and are the oldest states deleted.

    Raises:
        UsageError: on every process, when any process could not write its part (a full disk, say); the
            unfinished state is removed and the earlier states are left as they were.
    """
    run_dir = RunDirectory(Path(output_dir))
    root, final = run_dir.states, run_dir.state(progress.global_step)
    tmp = tmp_state(final)
    kept, then = _what_a_failed_save_keeps(root)
    try:
        # Each stretch ends with an exchange of errors, which is also the barrier between the stretches.
        with fail_together(accelerator), reporting_write_errors(final, kept, then):
            if accelerator.is_main_process:
                finish_interrupted_saves(root)
                tmp.mkdir(parents=True)
                saved = complete_states(root)  # in save order: the last one has the highest index
                progress.save_index = 1 + (_save_index(saved[-1]) if saved else 0)
        with fail_together(accelerator), reporting_write_errors(final, kept, then):
            accelerator.save_state(str(tmp))
        with fail_together(accelerator), reporting_write_errors(final, kept, then):
            if accelerator.is_main_process:
                give_umask_modes(tmp)
                keep_best_model(run_dir.best_model, tmp, progress)
                text = strict_json.dumps(asdict(progress), indent=1)
                atomic_write(tmp / PROGRESS_FILE, lambda f: f.write(text.encode()))
                tmp.rename(complete_state(final))  # every process's part and progress.json are written: complete
                _put_in_place(complete_state(final))
                _prune(root, keep)
    except Exception:
        if accelerator.is_main_process:  # after the exchange: no process writes into it any more
            shutil.rmtree(tmp, ignore_errors=True)  # never raises over the error that ended the save
        raise
    return final


def keep_best_model(best_model: Path, state: Path, progress: Progress) -> None:
    """Put the run's model-best.pth, which holds `progress.best_epoch`'s weights, in the state being saved: a hard
    link (model-best.pth is replaced by a rename, so the link keeps these bytes) or, where the file system has
    none, a copy. A run resumed from the state takes it back (`restore_best_model`).

    Raises:
        OSError: it could be neither linked nor copied.
    """
    if progress.best_epoch is None or not best_model.is_file():
        return
    kept = state / BEST_MODEL_FILE
    try:
        os.link(best_model, kept)
    except OSError:
        shutil.copyfile(best_model, kept)


def restore_best_model(accelerator: Accelerator, state_dir: Path, progress: Progress, best_model: Path) -> None:
    """Make `best_model` (model-best.pth) the one `state_dir` was saved with (all processes call this; the main
    process writes, atomically): the epochs a run resumed from an older state abandons may have replaced it with
    weights that are not this run's. A state saved before any best epoch takes away the abandoned run's; a state
    of an older version, which kept none, leaves the file as it is.

    Raises:
        UsageError: on every process, when the file could not be replaced.
    """
    kept = state_dir / BEST_MODEL_FILE
    with fail_together(accelerator), reporting_write_errors(best_model, "the state is intact", "resume again"):
        if not accelerator.is_main_process:
            return
        if kept.is_file():
            if not (best_model.exists() and best_model.samefile(kept)):
                with kept.open("rb") as source:
                    atomic_write(best_model, lambda target: shutil.copyfileobj(source, target))
        elif progress.best_epoch is None:
            best_model.unlink(missing_ok=True)


def _what_a_failed_save_keeps(root: Path) -> tuple[str, str]:
    """What a failed save leaves to resume, and how to go on: the earlier states, or, before the first, none."""
    if complete_states(root):
        return "the earlier states are intact", "continue with --resume"
    return (
        "no state of this run had been saved yet",
        "train again (--resume auto starts afresh where there is no state)",
    )


def finish_interrupted_saves(root: Path) -> None:
    """Finish what interrupted saves and deletions left under `root` (the main process, holding the lock).

    A complete state still named `.complete-step-N` takes the place of `step-N`, which it is newer than; the
    unfinished `.tmp-` and `.trash-` directories are deleted.

    Raises:
        OSError: a complete state could not be renamed into place.
    """
    for complete in root.glob(f"{COMPLETE_PREFIX}*") if root.is_dir() else ():
        if complete in complete_states(root):
            _put_in_place(complete)
    for unfinished in unfinished_states(root):
        shutil.rmtree(unfinished, ignore_errors=True)


def _put_in_place(complete: Path) -> None:
    """Rename the complete state `complete` (`.complete-step-N`) to `step-N`, discarding an older `step-N` first
    (until the rename, `complete` is the one `--resume auto` takes)."""
    final = final_state(complete)
    if final.exists():  # a state of the same step from a replayed stretch
        discard_state(final)
    complete.rename(final)


def give_umask_modes(directory: Path) -> None:
    """Give every file in `directory` the mode the umask gives a new file (safetensors writes its files private
    to their owner, 0600, whatever the umask), so that other accounts read states on shared storage as usual.

    Raises:
        OSError: a mode could not be changed.
    """
    mode = umask_file_mode()
    for path in directory.iterdir():
        if path.is_file() and stat.S_IMODE(path.stat().st_mode) != mode:
            path.chmod(mode)


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
    if not (is_number(progress.epoch_loss_sum) and 0 <= progress.epoch_loss_sum < math.inf):
        return f"epoch_loss_sum is {progress.epoch_loss_sum!r}, not a finite number of at least 0"
    samples = progress.epoch_samples
    # A whole count; states saved before it was kept as an int hold it as a float (480.0).
    if not (is_number(samples) and 0 <= samples <= MAX_COUNT and float(samples).is_integer()):
        return f"epoch_samples is {samples!r}, not a whole number from 0 to {MAX_COUNT}"
    if not (isinstance(progress.config, dict) and isinstance(progress.metrics, list)):
        return "its config is not an object or its metrics not a list"
    if not (progress.tracker_run_id is None or isinstance(progress.tracker_run_id, str)):
        return f"tracker_run_id is {progress.tracker_run_id!r}, not a string"
    data, data_keys = progress.training_data, ("data_dir", "fingerprint")
    if not (data is None or (isinstance(data, dict) and all(isinstance(data.get(k), str) for k in data_keys))):
        return f"training_data is {data!r}, not an object of strings {', '.join(data_keys)}"
    if problem := _selection_problem(progress):
        return problem
    records: list[Any] = progress.metrics  # as saved (JSON objects): typed once they pass
    for number, record in enumerate(records, 1):
        if problem := metrics_record_problem(record):
            return f"its record of epoch {number}: {problem}"
        if record["epoch"] != number:
            return f"its record of epoch {number} says epoch {record['epoch']}"
    # One record per finished epoch: the job reports and plots the last one as the run's result.
    if len(records) != position.epoch:
        return f"it holds {len(records)} epoch record(s) for the {position.epoch} epoch(s) it has trained"
    return None


def _selection_problem(progress: Progress) -> str | None:
    """What makes a loaded progress's best epoch and count of epochs since impossible, or None."""
    epochs = progress.position.epoch
    value, epoch, since = progress.best_value, progress.best_epoch, progress.epochs_without_improvement
    if (value is None) != (epoch is None):
        return f"best_value is {value!r} and best_epoch {epoch!r}: both or neither must be given"
    if value is not None and not (is_number(value) and math.isfinite(value)):
        return f"best_value is {value!r}, not a finite number"
    if epoch is not None and not (type(epoch) is int and 1 <= epoch <= epochs):
        return f"best_epoch is {epoch!r}, not a whole number from 1 to the {epochs} epoch(s) trained"
    last_possible = epochs - epoch if epoch is not None else 0  # every epoch after the best one, at most
    if not (type(since) is int and 0 <= since <= last_possible):
        return f"epochs_without_improvement is {since!r}, not a whole number from 0 to {last_possible}"
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
    if path.name.startswith(COMPLETE_PREFIX) and not path.exists() and (final_state(path) / PROGRESS_FILE).is_file():
        # The interrupted save it names has taken its final name since: the resume's own claim of the output
        # directory renamed it (`finish_interrupted_saves`).
        return final_state(path)
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


def restore_state(
    accelerator: Accelerator, state_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """Restore the prepared model and optimizer and the RNG states from `state_dir` (all processes call this),
    after checking every tensor the state holds for them against them: names, shapes, dtypes, finite values.

    Raises:
        UsageError: on every process, when the state cannot be read or does not fit the model or optimizer.
    """
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper loads into the inner one
    check = partial(_check_optimizer_state, state_dir, _parameter_names(accelerator.unwrap_model(model)))
    with fail_together(accelerator):
        handle = torch_optimizer.register_load_state_dict_pre_hook(check)
        try:
            _check_weights(state_dir, accelerator.unwrap_model(model))
            accelerator.load_state(str(state_dir))
        except UsageError:
            raise
        except Exception as error:
            raise UsageError(_unreadable(state_dir, error)) from error
        finally:
            handle.remove()


def _check_weights(state_dir: Path, model: nn.Module) -> None:
    """Refuse a state whose model weights do not fit `model` (before Accelerate copies them in, casting them)."""
    path = state_dir / STATE_WEIGHTS_FILE
    if not path.is_file():
        return  # Accelerate's load names the missing file
    saved, expected = safetensors.torch.load_file(path), model.state_dict()
    if keys := sorted(saved.keys() ^ expected.keys()):
        raise _misfit(state_dir, f"its model weights {STATE_WEIGHTS_FILE} differ in their names: {keys[:5]}")
    for name, tensor in saved.items():
        if problem := _tensor_problem(tensor, expected[name]):
            raise _misfit(state_dir, f"the model's {name} {problem}")


def _check_optimizer_state(
    state_dir: Path, names: dict[torch.Tensor, str], optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> None:
    """Refuse optimizer state that does not fit the optimizer's parameters (torch would cast its tensors, and
    checks no shape of them); a load_state_dict pre-hook, so it sees the tensors as saved."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    indices = [index for group in saved["param_groups"] for index in group["params"]]
    if len(indices) != len(params):
        raise _misfit(state_dir, f"its optimizer state is for {len(indices)} parameters, the model has {len(params)}")
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=False):
        # torch takes every saved option of a group (nesterov, maximize, dampening, ...) over the optimizer's own;
        # only those the run sets again after the restore may differ (a different option is another optimizer).
        for key in group.keys() & saved_group.keys() - RESET_AFTER_RESTORE:
            if saved_group[key] != group[key]:
                raise _misfit(state_dir, f"its optimizer's {key} is {saved_group[key]!r}, not {group[key]!r}")
    for index, param in zip(indices, params, strict=True):
        for key, value in saved["state"].get(index, {}).items():
            like = param if isinstance(value, torch.Tensor) and value.dim() > 0 else value  # a step count: a scalar
            if isinstance(value, torch.Tensor) and (problem := _tensor_problem(value, like)):
                raise _misfit(state_dir, f"the optimizer's {key} of {names.get(param, 'a parameter')} {problem}")


def _tensor_problem(found: torch.Tensor, expected: torch.Tensor) -> str | None:
    """How a restored tensor differs from the one it restores (shape, dtype), or that it is not finite; or None."""
    if found.shape != expected.shape or found.dtype != expected.dtype:
        return f"is {_kind(found)}, not {_kind(expected)}"
    if found.is_floating_point() and not torch.isfinite(found).all():
        return "holds non-finite values (NaN or infinity)"
    return None


def _kind(tensor: torch.Tensor) -> str:
    return f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"


def _parameter_names(model: nn.Module) -> dict[torch.Tensor, str]:
    return {param: name for name, param in model.named_parameters()}


def _misfit(state_dir: Path, problem: str) -> UsageError:
    return UsageError(
        f"--resume: the state {state_dir} does not fit this model and optimizer: {problem}; pass another state "
        "with --resume STATE_DIR, or start afresh with --overwrite"
    )


def _unreadable(state_dir: Path, error: BaseException) -> str:
    return (
        f"--resume: the state {state_dir} cannot be read ({type(error).__name__}: {first_line(error)}); "
        "pass an earlier state with --resume STATE_DIR, or start afresh with --overwrite"
    )


def complete_states(root: Path) -> list[Path]:
    """Finished state directories under `root`, in the order they were saved (see `Progress.save_index`).

    Only the names fmnist-dist gives (`step-` and the step's digits) count: a copy the user made beside them
    (`step-000000120-mine`) is never resumed by `--resume auto`, pruned by `--keep-states` or removed by
    `--overwrite` (`--resume` takes it when named). A `.complete-step-N` (a save interrupted before it took its
    name) counts instead of the older `step-N` it was about to replace.
    """
    if not root.is_dir():
        return []
    found = sorted(p for p in root.iterdir() if is_complete_state_name(p.name) and (p / PROGRESS_FILE).is_file())
    by_step = {final_state(p): p for p in sorted(found, key=lambda p: p.name.startswith(COMPLETE_PREFIX))}
    states = sorted(by_step.values(), key=final_state)
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
