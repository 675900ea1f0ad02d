"""`fmnist-dist train`: builds the Accelerator, data, model and optimizer, runs the Trainer, saves the results.

fmnist-dist train                                                      # one device
accelerate launch --config_file launch/multi-gpu.yaml -m fmnist_dist train   # every GPU of a node
accelerate launch --config_file launch/cpu.yaml -m fmnist_dist train --cpu   # 2 CPU processes (gloo)
"""

from __future__ import annotations

import os
import platform
from datetime import timedelta
from pathlib import Path
from typing import Any

import accelerate
import torch
import torchvision
from accelerate import Accelerator, DataLoaderConfiguration, PartialState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

import fmnist_dist
from fmnist_dist.errors import UsageError
from fmnist_dist.inputs.dataset_checks import describe_dataset
from fmnist_dist.inputs.fashion_mnist import fingerprint, load_split
from fmnist_dist.recipe.data import first_images, is_on_device, make_loader, ordered_loader, place_on_device
from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.recipe.position import BatchPlan, steps_per_epoch
from fmnist_dist.recipe.sampling import GlobalOrderBatchSampler
from fmnist_dist.recipe.schedule import build_scheduler, peak_lr
from fmnist_dist.runtime.collective_errors import fail_together, on_main_process_first
from fmnist_dist.runtime.devices import (
    apply_threads,
    check_precision_runs,
    precision_in_effect,
    precision_refusals_as_usage_errors,
    wants_cpu,
)
from fmnist_dist.runtime.job_exit import released_after
from fmnist_dist.runtime.stop_signals import StopRequest, TrainingStopped
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.metrics_log import EpochRecord, MetricsLog
from fmnist_dist.storage.output_dir import OutputDirLock, claim_output_dir, remove_earlier_run
from fmnist_dist.storage.plots import plot_run
from fmnist_dist.storage.run_dir import RunDirectory
from fmnist_dist.storage.training_state import restore_state
from fmnist_dist.storage.weights import save_state_dict
from fmnist_dist.tracking.base import RunSpec, Tracker
from fmnist_dist.tracking.registry import make_tracker, tracker_type
from fmnist_dist.training.resume import check_resumable, describe_resume, plan_start, record_setup
from fmnist_dist.training.trainer import Trainer, TrainingData

# A process that loses its peers fails its next collective after this long instead of waiting forever.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
SAMPLE_IMAGES = 32


def run_training(cfg: TrainConfig, given: frozenset[str] = frozenset(), stop: StopRequest | None = None) -> EpochRecord:
    """Train as `cfg` says; return the final epoch's record (on every process).

    Args:
        given: the settings written on the command line; a resumed run takes the others from its state.
        stop: the stop signals' record (the CLI installs it before its slow imports); None: no stop on signals.

    Raises:
        UsageError: bad settings, data or state; or training diverged.
        TrainingStopped: a stop signal arrived; a state was saved where every process stopped.
    """
    # Its release is a clean-up step: should it fail, the job still ends as it would have, with one warning more.
    lock = OutputDirLock(cfg.output_dir)
    with released_after(lock, f"releasing the lock of --output-dir {cfg.output_dir}") as output_lock:
        return _train(cfg, given, stop or StopRequest(), output_lock)


def _train(cfg: TrainConfig, given: frozenset[str], stop: StopRequest, output_lock: OutputDirLock) -> EpochRecord:
    apply_threads(cfg.threads)  # before any parallel work; a per-invocation setting, so a resume does not change it
    processes = join_processes(cfg)
    check_all_processes_joined(processes)
    claim_output_dir(processes, output_lock, cfg.resume, cfg.overwrite)  # before anything there is read
    with fail_together(processes):
        start = plan_start(cfg, given)  # a resumed run's settings decide everything below, the Accelerator included
    cfg, progress = start.cfg, start.progress
    accelerator = build_accelerator(cfg)
    set_seed(cfg.seed)  # the same initial weights on every process, and reproducible ones
    train_set, test_set = load_datasets(cfg, accelerator)
    plan = BatchPlan.from_config(cfg, accelerator.num_processes)
    training_set_fingerprint = fingerprint(train_set)
    check_resumable(start, len(train_set), training_set_fingerprint)
    accelerator.print(describe_setup(accelerator, plan, cfg.data_dir))
    if start.state_dir is not None:
        accelerator.print(describe_resume(start, plan))
    record_setup(progress, plan, len(train_set))
    progress.training_data = {"data_dir": str(cfg.data_dir), "fingerprint": training_set_fingerprint}
    model = NeuralNetwork()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sampler = GlobalOrderBatchSampler(len(train_set), plan.micro_batch, cfg.seed)
    model, optimizer, train_loader, test_loader = accelerator.prepare(
        model,
        optimizer,
        train_loader_for(train_set, cfg, sampler),
        test_loader_for(test_set, cfg, plan.processes),
        device_placement=[
            None,
            None,
            loader_placement(train_set, accelerator),
            loader_placement(test_set, accelerator),
        ],
    )
    if start.state_dir is not None:
        restore_state(accelerator, start.state_dir, model, optimizer)
        set_hyperparameters(optimizer, cfg)  # flags given now override the restored optimizer's
    scheduler = accelerator.prepare(
        build_scheduler(
            optimizer.optimizer,
            cfg,
            plan.global_batch,
            steps_per_epoch(plan.global_batch, len(train_set)),
            progress.position.schedule_step(plan.global_batch, len(train_set)),
        )
    )
    if cfg.overwrite:  # only now that the settings, data, model and schedule have been built without error
        remove_earlier_run(accelerator, cfg.output_dir)
    run_dir = RunDirectory(cfg.output_dir)
    tracker = make_tracker(cfg.tracker, accelerator)
    progress.tracker_run_id = (
        tracker.start(run_spec(cfg, accelerator, plan, progress.tracker_run_id)) or progress.tracker_run_id
    )
    trainer = Trainer(
        cfg,
        accelerator,
        model,
        optimizer,
        scheduler,
        TrainingData(train_loader, sampler, plan, len(train_set)),
        test_loader,
        progress,
        MetricsLog(run_dir.metrics, progress.metrics),
        first_images(test_set, SAMPLE_IMAGES),
        stop,
        tracker,
    )
    try:
        trainer.fit()
        save_final_model(accelerator, model, run_dir.model)
        report_results(cfg, accelerator, trainer, run_dir, tracker)
    except TrainingStopped:
        tracker.mark_preempted()
        raise
    finally:
        tracker.finish()  # never raises: a failure is one warning line; the process group closes in leave_job
    return progress.metrics[-1]


def join_processes(cfg: TrainConfig) -> PartialState:
    """Join the job's processes in one process group first, so that any later error can reach them all."""
    return PartialState(cpu=wants_cpu(cfg.cpu), timeout=COLLECTIVE_TIMEOUT)


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
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            # One schedule step per optimizer step (without this, Accelerate steps it once per process).
            step_scheduler_with_optimizer=False,
        )
    check_precision_runs(accelerator, flag_given=cfg.mixed_precision is not None)
    return accelerator


def check_all_processes_joined(processes: PartialState) -> None:
    """Refuse a launch whose processes did not form one job (each would train alone and overwrite the others)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != processes.num_processes:
        raise UsageError(
            f"accelerate launch started {launched} processes but they did not join one job "
            f"({processes.num_processes} process(es) on {processes.device}); on a machine without a GPU per "
            "process pass --cpu (or set ACCELERATE_USE_CPU=1) to run them on the CPU over gloo"
        )


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


def load_datasets(cfg: TrainConfig, accelerator: Accelerator) -> tuple:
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


def train_loader_for(train_set, cfg: TrainConfig, sampler: GlobalOrderBatchSampler) -> DataLoader:
    """The training loader, in the sampler's global batches (Accelerate gives each process its slice)."""
    return ordered_loader(train_set, sampler, **_loading_options(train_set, cfg))


def test_loader_for(test_set, cfg: TrainConfig, processes: int) -> DataLoader:
    """The test set in order, `--eval-batch-size` images per process per batch."""
    return make_loader(test_set, cfg.eval_batch_size * processes, False, **_loading_options(test_set, cfg))


def _loading_options(dataset, cfg: TrainConfig) -> dict[str, Any]:
    """The user's workers and pinned memory, unless the data already lives on the device."""
    on_device = is_on_device(dataset)
    return {
        "num_workers": 0 if on_device else cfg.num_workers,
        "pin_memory": not on_device and torch.cuda.is_available() and not cfg.cpu,
    }


def loader_placement(dataset, accelerator: Accelerator) -> bool | None:
    """`accelerator.prepare`'s `device_placement` for a loader of `dataset`: False where its batches are made on
    the device already (on the CPU, or from a split placed on the device), else None (Accelerate's default).

    Placing such batches changes nothing but costs Accelerate's walk through every batch (`send_to_device`), a
    few µs per step on the CPU and more on a GPU, where an optimizer step of this MLP takes well under a ms.
    """
    return False if accelerator.device.type == "cpu" or is_on_device(dataset) else None


def set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Give a restored optimizer this run's momentum and weight decay (the schedule sets its rate)."""
    for group in optimizer.param_groups:
        group.update(momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def run_spec(cfg: TrainConfig, accelerator: Accelerator, plan: BatchPlan, resume_id: str | None) -> RunSpec:
    """The tracked run as the flags name it, continuing `resume_id` (the run id a resumed state saved)."""
    return RunSpec(
        project=cfg.wandb_project,
        config=run_config(cfg, accelerator, plan),
        name=cfg.run_name,
        group=cfg.run_group,
        tags=cfg.tags,
        resume_id=resume_id,
    )


def run_config(cfg: TrainConfig, accelerator: Accelerator, plan: BatchPlan) -> dict[str, Any]:
    """Everything that defines the run, for the tracker: settings, world size, batch split, device and versions."""
    return {
        **cfg.to_log(),
        "peak_lr": peak_lr(cfg, plan.global_batch),
        "world_size": accelerator.num_processes,
        "global_batch_size": plan.global_batch,
        "per_process_batch_size": plan.per_process,
        "device": str(accelerator.device),
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": precision_in_effect(accelerator),
        "cpu_threads": torch.get_num_threads(),
        "versions": {
            "fmnist_dist": fmnist_dist.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__,
            "python": platform.python_version(),
        },
    }


def save_final_model(accelerator: Accelerator, model: torch.nn.Module, path: Path) -> None:
    """Once every process is done, the main process saves plain weights that `NeuralNetwork` loads anywhere."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        save_state_dict(unwrapped.state_dict(), path)
        accelerator.print(f"fmnist-dist: saved {path}")


def report_results(
    cfg: TrainConfig, accelerator: Accelerator, trainer: Trainer, run_dir: RunDirectory, tracker: Tracker
) -> None:
    """Plots, and the tracker's predictions and model artifact (main process; the last evaluation is on every one).

    A resumed run that had nothing left to train (its last run ended before writing these) evaluated nothing,
    so it logs no predictions; the plots come from the metrics history.
    """
    if not accelerator.is_main_process:
        return
    plot_run(trainer.progress.metrics, run_dir.curves, run_dir.confusion)
    # With --log-samples-every-epoch the Trainer logged them after every epoch, the last one included.
    if trainer.last_eval is not None and not cfg.log_samples_every_epoch:
        trainer.log_predictions(trainer.last_eval)
    if cfg.log_model:
        tracker.log_artifact(run_dir.model, "model")
