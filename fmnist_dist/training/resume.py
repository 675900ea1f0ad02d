"""Deciding how a run starts: afresh, or continuing a saved state with its settings as the defaults."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate.utils import parse_choice_from_env

from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.position import BatchPlan
from fmnist_dist.settings.train_config import DEFAULT_MONITOR, MIXED_PRECISIONS, TrainConfig, changed_settings
from fmnist_dist.storage.training_state import Progress, find_state, read_progress
from fmnist_dist.training.model_selection import early_stop_reason, stopped_early


@dataclass(frozen=True)
class Start:
    """How a run starts: its settings, its progress, and the state it continues (None for a fresh start).

    Attributes:
        changed: for a resumed run, `{setting: (saved value, value now)}` for each setting that differs.
    """

    cfg: TrainConfig
    progress: Progress
    state_dir: Path | None = None
    changed: dict[str, tuple[Any, Any]] | None = None


def plan_start(cfg: TrainConfig, given: frozenset[str]) -> Start:
    """A fresh start, or the state `--resume` names with the saved settings under the flags given now.

    Args:
        given: the settings written on this command line (they override the saved ones).

    Raises:
        UsageError: `--resume` names no readable state; its saved settings are not ones the flags would take; a
            new --seed for a state saved mid-epoch; a new validation split or --monitor; --monitor or
            --early-stopping-patience without a validation split; or --epochs or --early-stopping-patience ends
            the run before the epoch the state is in.
    """
    state_dir = find_state(cfg.output_dir, cfg.resume) if cfg.resume else None
    if state_dir is None:
        cfg.check_choices_have_a_split()
        return Start(cfg, Progress(config=settings_record(cfg)))
    progress = read_progress(state_dir)
    check_same_validation_split(state_dir, progress.config, cfg, given)  # before the saved settings are checked
    resumed_cfg = cfg.resumed_from(progress.config, given, state_dir)
    resumed_cfg.check_choices_have_a_split()
    record = settings_record(resumed_cfg)
    changed = changed_settings(progress.config, record)
    check_same_epoch_order(state_dir, progress, changed)
    check_epochs_reach_the_state(state_dir, progress, resumed_cfg.epochs)
    check_patience_reaches_the_state(state_dir, progress, resumed_cfg.early_stopping_patience)
    progress.config = record
    return Start(resumed_cfg, progress, state_dir, changed)


def settings_record(cfg: TrainConfig) -> dict[str, Any]:
    """The settings a state saves: `cfg.to_log()`, with the mixed precision this run asks for even where the flag
    is not given, so that a resumed run can say when its own differs."""
    return {**cfg.to_log(), "mixed_precision": requested_precision(cfg.mixed_precision)}


def requested_precision(flag: str | None) -> str | None:
    """--mixed-precision, else what `accelerate launch` passes on (ACCELERATE_MIXED_PRECISION), else "no": what
    Accelerate itself reads. None for a mode the flag does not offer (fp8), which a resumed run could not check."""
    requested = flag or parse_choice_from_env("ACCELERATE_MIXED_PRECISION", "no")
    return requested if requested in MIXED_PRECISIONS else None


def check_same_epoch_order(state_dir: Path, progress: Progress, changed: dict[str, tuple[Any, Any]]) -> None:
    """Refuse a new `--seed` for a state saved mid-epoch: the seed orders the epoch, and a new order for its rest
    would train some of its images twice and others never. At an epoch end a new seed is fine."""
    position = progress.position
    if "seed" in changed and position.samples_done > 0:
        old, new = changed["seed"]
        raise UsageError(
            f"--resume: the state {state_dir} was saved mid-epoch (image {position.samples_done}/"
            f"{progress.dataset_size} of epoch {position.epoch + 1}), whose order comes from the seed: --seed "
            f"{new} (saved: {old}) would train some of its images twice and others never; resume without --seed, "
            "or from a state saved at an epoch end"
        )


def check_same_validation_split(
    state_dir: Path, saved: dict[str, Any], cfg: TrainConfig, given: frozenset[str]
) -> None:
    """Refuse a flag that would change a run's validation split or what chooses its best epoch: a new --val-size
    (images it trained on would be validated on, or images it validated on trained on), with a split a new --seed
    (which chooses another split), or a new --monitor (model-best.pth is the best by the saved one).

    Args:
        saved: the state's settings (`Progress.config`); states saved before --val-size held out nothing.
        cfg, given: the settings of this command line, and those written on it.
    """
    if change := _split_change(saved, cfg, given):
        flag, problem = change
        raise UsageError(
            f"--resume: the state {state_dir} {problem}; resume without {flag}, or start afresh with --overwrite"
        )


def _split_change(saved: dict[str, Any], cfg: TrainConfig, given: frozenset[str]) -> tuple[str, str] | None:
    """The flag given that changes the saved split or monitor, and what it would do; None if none does."""
    val_size, monitor = saved.get("val_size", 0), saved.get("monitor") or DEFAULT_MONITOR
    if "val_size" in given and cfg.val_size != val_size:
        return "--val-size", (
            f"holds out {val_size} training images as its validation split (--val-size {val_size}): --val-size "
            f"{cfg.val_size} would validate on images it trained on, or train on images it validated on"
        )
    if val_size and "seed" in given and cfg.seed != saved.get("seed"):
        return "--seed", (
            f"chose its validation split by --seed {saved.get('seed')}: --seed {cfg.seed} would choose another, "
            "holding out images it trained on"
        )
    if val_size and "monitor" in given and cfg.monitor_or_default != monitor:
        return "--monitor", (
            f"keeps its best epoch (model-best.pth) by --monitor {monitor}: --monitor {cfg.monitor_or_default} "
            "would compare its epochs with a best of another metric"
        )
    return None


def check_epochs_reach_the_state(state_dir: Path, progress: Progress, epochs: int) -> None:
    """Refuse an --epochs that ends before the epoch a state was saved in the middle of: the run would train
    nothing and save a model of a part-trained epoch as the final one. At an epoch end there is nothing to refuse:
    the run writes the model of the epochs the state has trained."""
    position = progress.position
    if position.samples_done > 0 and position.epoch >= epochs:
        raise UsageError(
            f"--resume: the state {state_dir} was saved in the middle of epoch {position.epoch + 1} (image "
            f"{position.samples_done}/{progress.dataset_size}), after the end of --epochs {epochs}; pass --epochs "
            f"{position.epoch + 1} or more to finish that epoch, or resume a state saved at or before the end of "
            f"epoch {epochs}"
        )


def check_patience_reaches_the_state(state_dir: Path, progress: Progress, patience: int | None) -> None:
    """Refuse an --early-stopping-patience that the epochs without improvement before a state saved mid-epoch have
    already used up: as with a short --epochs, the run would train nothing and save a model of a part-trained epoch
    as the final one (a run never saves such a state itself: it stops at the end of the epoch that uses it up)."""
    position = progress.position
    if position.samples_done > 0 and stopped_early(progress, patience):
        raise UsageError(
            f"--resume: the state {state_dir} was saved in the middle of epoch {position.epoch + 1} (image "
            f"{position.samples_done}/{progress.dataset_size}) after {progress.epochs_without_improvement} epoch(s) "
            f"without improvement, which --early-stopping-patience {patience} would stop before; pass "
            f"--early-stopping-patience {progress.epochs_without_improvement + 1} or more to finish that epoch, or "
            "resume a state saved at an epoch end"
        )


def check_resumable(start: Start, dataset_size: int, fingerprint: str) -> None:
    """Refuse to continue a state on another training set: its position would mean other images.

    A state saved before fingerprints were recorded is checked by its image count only.

    Args:
        fingerprint: `inputs.fashion_mnist.fingerprint` of the training set loaded now.
    """
    if start.state_dir is None:
        return
    saved, trained_on = start.progress.dataset_size, start.progress.training_data
    if saved != dataset_size:
        raise UsageError(
            f"--resume: the state {start.state_dir} was saved training on {saved} images, but "
            f"{start.cfg.data_dir} has {dataset_size}; resume with the same --data-dir, or start afresh with "
            "--overwrite"
        )
    if trained_on is not None and trained_on["fingerprint"] != fingerprint:
        raise UsageError(
            f"--resume: the state {start.state_dir} was trained on other images: the training set in "
            f"{trained_on['data_dir']} (fingerprint {trained_on['fingerprint']}), not the one now in "
            f"{start.cfg.data_dir} (fingerprint {fingerprint}); resume on the training set it was saved on, or start "
            "afresh with --overwrite"
        )


def record_setup(progress: Progress, plan: BatchPlan, dataset_size: int) -> None:
    """Write how this run is split into the progress that its states will carry."""
    progress.dataset_size = dataset_size
    progress.world_size = plan.processes
    progress.per_process_batch = plan.per_process
    progress.global_batch_size = plan.global_batch


def describe_resume(start: Start, plan: BatchPlan) -> str:
    """One line: the state, where it stands, and every setting that differs from the run that saved it."""
    saved, position = start.progress, start.progress.position
    changes = [f"{name} {_shown(old)} -> {_shown(new)}" for name, (old, new) in (start.changed or {}).items()]
    for name, old, new in (
        ("world size", saved.world_size, plan.processes),
        ("per-process batch", saved.per_process_batch, plan.per_process),
        ("global batch", saved.global_batch_size, plan.global_batch),
    ):
        if old != new:
            changes.append(f"{name} {old} -> {new}")
    if stopped_early(saved, start.cfg.early_stopping_patience):
        return (
            f"fmnist-dist: {start.state_dir} has stopped early after epoch {position.epoch}: "
            f"{early_stop_reason(saved, start.cfg.monitor_or_default)}; nothing to train (pass a larger "
            "--early-stopping-patience to train on)"
        )
    if position.epoch >= start.cfg.epochs:
        return (
            f"fmnist-dist: {start.state_dir} has trained {position.epoch} epoch(s), --epochs is "
            f"{start.cfg.epochs}: nothing to train (pass a larger --epochs to train on)"
        )
    return (
        f"fmnist-dist: resuming from {start.state_dir} at epoch {position.epoch + 1}, image "
        f"{position.samples_done}/{saved.dataset_size}, optimizer step {position.global_step}; "
        + (f"changed: {', '.join(changes)}" if changes else "same settings")
    )


def _shown(value: object) -> str:
    """A setting's value in the resume line: "default" for one left unset (None), so that the line never says
    `threads None -> 3`."""
    return "default" if value is None else str(value)
