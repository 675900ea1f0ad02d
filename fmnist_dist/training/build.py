"""Building a run: the Accelerator, the data, the model, the optimizer, the schedule, the tracker and the Trainer.

`fmnist-dist train` (training/job.py), the benchmark and the in-process tests build their runs here, fresh
or resumed:

    run = build_run(plan_start(cfg, given=frozenset()))
    result = run.trainer.fit()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fmnist_dist.inputs.dataset_checks import describe_dataset
from fmnist_dist.inputs.fashion_mnist import fingerprint, load_split
from fmnist_dist.recipe.data import Split, first_images, is_on_device, make_loader, ordered_loader, place_on_device
from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.recipe.position import BatchPlan
from fmnist_dist.recipe.sampling import GlobalOrderBatchSampler
from fmnist_dist.recipe.train_step import build_optimizer
from fmnist_dist.recipe.validation import hold_out
from fmnist_dist.runtime.collective_errors import on_main_process_first
from fmnist_dist.runtime.devices import (
    check_precision_runs,
    precision_in_effect,
    precision_refusals_as_usage_errors,
    wants_cpu,
)
from fmnist_dist.runtime.stop_signals import StopRequest
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.metrics_log import MetricsLog
from fmnist_dist.storage.run_dir import RunDirectory
from fmnist_dist.storage.training_state import restore_best_model, restore_state
from fmnist_dist.tracking.registry import make_tracker, tracker_type
from fmnist_dist.training.recipe_settings import batch_plan, build_schedule
from fmnist_dist.training.resume import Start, check_resumable, describe_resume, record_setup
from fmnist_dist.training.trainer import Trainer, TrainingData

SAMPLE_IMAGES = 32  # test images shown on W&B with their predictions


@dataclass(frozen=True)
class Run:
    """A built run: its Accelerator, how its batches are split, the prepared model and the Trainer."""

    accelerator: Accelerator
    plan: BatchPlan
    model: nn.Module
    trainer: Trainer


def build_run(start: Start, stop: StopRequest | None = None) -> Run:
    """Build everything a run trains with, as `start` says (fresh, or resumed from its state).

    The main process prints the set-up line (and where a resumed run continues) before the slow parts.

    Args:
        start: from `resume.plan_start`: the settings, the progress, and the state to continue (if any).
        stop: the stop signals' record; None: the run does not stop on signals.

    Raises:
        UsageError: bad settings, data or state.
    """
    cfg, progress = start.cfg, start.progress
    accelerator = build_accelerator(cfg)
    set_seed(cfg.seed)  # the same initial weights on every process, and reproducible ones
    train_set, test_set = load_datasets(cfg, accelerator)
    plan = batch_plan(cfg, accelerator.num_processes)
    training_set_fingerprint = fingerprint(train_set)  # of the whole set: a state's split is fixed by its settings
    train_set, val_set = hold_out(train_set, cfg.val_size, cfg.seed)
    check_resumable(start, len(train_set), training_set_fingerprint)
    accelerator.print(describe_setup(accelerator, plan, cfg.data_dir))
    if val_set is not None:
        accelerator.print(describe_validation(cfg, len(train_set) + len(val_set)))
    if start.state_dir is not None:
        accelerator.print(describe_resume(start, plan))
    record_setup(progress, plan, len(train_set))
    progress.training_data = {"data_dir": str(cfg.data_dir), "fingerprint": training_set_fingerprint}
    model, optimizer, train, test_loader, val_loader = prepare_training(
        accelerator, cfg, plan, train_set, test_set, val_set
    )
    if start.state_dir is not None:
        restore_state(accelerator, start.state_dir, model, optimizer)
        restore_best_model(accelerator, start.state_dir, progress, RunDirectory(cfg.output_dir).best_model)
        set_hyperparameters(optimizer, cfg)  # flags given now override the restored optimizer's
    scheduler = accelerator.prepare(
        build_schedule(optimizer.optimizer, cfg, plan.global_batch, len(train_set), progress.position)
    )
    trainer = Trainer(
        cfg,
        accelerator,
        model,
        optimizer,
        scheduler,
        train,
        test_loader,
        progress,
        MetricsLog(RunDirectory(cfg.output_dir).metrics, progress.metrics),
        first_images(test_set, SAMPLE_IMAGES),
        stop or StopRequest(),
        make_tracker(cfg.tracker, accelerator),  # started by the job, once the run is built
        val_loader,
    )
    accelerator.print(trainer.meter.compute.describe())
    return Run(accelerator, plan, model, trainer)


def prepare_training(
    accelerator: Accelerator,
    cfg: TrainConfig,
    plan: BatchPlan,
    train_set: Split,
    test_set: Split,
    val_set: Split | None,
) -> tuple[nn.Module, AcceleratedOptimizer, TrainingData, DataLoader, DataLoader | None]:
    """The quickstart's model and optimizer, the training and test loaders and the validation split's (None
    without one), prepared by Accelerate."""
    model = NeuralNetwork()
    optimizer = build_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    sampler = GlobalOrderBatchSampler(len(train_set), plan.micro_batch, cfg.seed)
    evaluated = [test_set] if val_set is None else [test_set, val_set]
    model, optimizer, train_loader, test_loader, *val_loader = accelerator.prepare(
        model,
        optimizer,
        train_loader_for(train_set, cfg, sampler),
        *(test_loader_for(split, cfg, plan.processes) for split in evaluated),
        device_placement=[None, None, *(loader_placement(split, accelerator) for split in (train_set, *evaluated))],
    )
    train = TrainingData(train_loader, sampler, plan, len(train_set))
    return model, optimizer, train, test_loader, val_loader[0] if val_loader else None


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """The job's Accelerator; mixed precision comes from the flag, else from `accelerate launch`.

    Gradient accumulation is the Trainer's own (each step's gradient is the mean over exactly its images, also
    for an epoch's short last step), so Accelerate's stays at 1.
    """
    with precision_refusals_as_usage_errors():
        accelerator = Accelerator(
            cpu=wants_cpu(cfg.cpu),
            mixed_precision=cfg.mixed_precision,
            log_with=tracker_type(cfg.tracker).log_with,
            project_dir=str(cfg.output_dir),
            # The samplers yield global batches and Accelerate gives each process its slice of every one, so the
            # images of an optimizer step do not depend on the number of processes.
            # non_blocking: a batch copied to the accelerator (from pinned memory, with the data off the device)
            # does not wait for the queued steps, so a step that logs nothing never synchronises with the host.
            dataloader_config=DataLoaderConfiguration(split_batches=True, non_blocking=True),
            # One schedule step per optimizer step (without this, Accelerate steps it once per process).
            step_scheduler_with_optimizer=False,
        )
    check_precision_runs(accelerator, flag_given=cfg.mixed_precision is not None)
    return accelerator


def describe_setup(accelerator: Accelerator, plan: BatchPlan, data_dir: Path) -> str:
    """The line the main process prints once: device, process count, backend, precision in effect, CPU threads
    per process, how a batch is split, and the data when it is not the real FashionMNIST files."""
    data = describe_dataset(data_dir)
    return (
        f"fmnist-dist: {accelerator.num_processes} process(es) on {accelerator.device} "
        f"({accelerator.distributed_type.value}, mixed precision: {precision_in_effect(accelerator)}, "
        f"{torch.get_num_threads()} CPU thread(s) per process, global batch "
        f"{plan.global_batch} = {plan.processes} process(es) x {plan.per_process} images x "
        f"{plan.accumulation} accumulation step(s))" + (f"; data: {data}" if data else "")
    )


def describe_validation(cfg: TrainConfig, training_images: int) -> str:
    """The line that says what the validation split holds out, and what it chooses."""
    stopping = (
        f", early stopping after {cfg.early_stopping_patience} epoch(s) without improvement"
        if cfg.early_stopping_patience
        else ""
    )
    return (
        f"fmnist-dist: validation split: {cfg.val_size} of the {training_images} training images, held out by "
        f"--seed {cfg.seed} and never trained on; best epoch by {cfg.monitor_or_default} kept as "
        f"{RunDirectory(cfg.output_dir).best_model}{stopping}; the test set is scored "
        + ("after every epoch" if cfg.test_every_epoch else "at the end of the run")
    )


def load_datasets(cfg: TrainConfig, accelerator: Accelerator) -> tuple[Split, Split]:
    """Both splits; the main process downloads first so that processes never race on the files.

    Raises:
        UsageError: on every process, when the data is missing or damaged on any (say on one node only).
    """
    train_set, test_set = on_main_process_first(
        accelerator,
        lambda: (
            load_split(cfg.data_dir, train=True, download=cfg.download),
            load_split(cfg.data_dir, train=False, download=cfg.download),
        ),
    )
    return (
        place_on_device(train_set, accelerator, cfg.data_on_device),
        place_on_device(test_set, accelerator, cfg.data_on_device),
    )


def train_loader_for(train_set: Dataset, cfg: TrainConfig, sampler: GlobalOrderBatchSampler) -> DataLoader:
    """The training loader, in the sampler's global batches (Accelerate gives each process its slice)."""
    return ordered_loader(train_set, sampler, **_loading_options(train_set, cfg))


def test_loader_for(test_set: Dataset, cfg: TrainConfig, processes: int) -> DataLoader:
    """The test set (or the validation split) in order, `--eval-batch-size` images per process per batch."""
    return make_loader(test_set, cfg.eval_batch_size * processes, False, **_loading_options(test_set, cfg))


def _loading_options(dataset: Dataset, cfg: TrainConfig) -> dict[str, Any]:
    """The user's workers and pinned memory, unless the data already lives on the device."""
    on_device = is_on_device(dataset)
    return {
        "num_workers": 0 if on_device else cfg.num_workers,
        "pin_memory": not on_device and torch.cuda.is_available() and not cfg.cpu,
    }


def loader_placement(dataset: Dataset, accelerator: Accelerator) -> bool | None:
    """`accelerator.prepare`'s `device_placement` for a loader of `dataset`: False where its batches are made on
    the device already (on the CPU, or from a split placed on the device), else None (Accelerate's default).

    Placing such batches changes nothing but costs Accelerate's walk through every batch (`send_to_device`) at
    every step.
    """
    return False if accelerator.device.type == "cpu" or is_on_device(dataset) else None


def set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Give a restored optimizer this run's momentum and weight decay (the schedule sets its rate)."""
    for group in optimizer.param_groups:
        group.update(momentum=cfg.momentum, weight_decay=cfg.weight_decay)
