"""`fmnist-dist train`: joins the processes, builds the run (training/build.py), trains it, saves and reports.

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
from accelerate import Accelerator, PartialState

import fmnist_dist
from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.model import plain_state_dict
from fmnist_dist.recipe.position import BatchPlan
from fmnist_dist.runtime.collective_errors import fail_together
from fmnist_dist.runtime.devices import apply_threads, precision_in_effect, wants_cpu
from fmnist_dist.runtime.job_exit import released_after
from fmnist_dist.runtime.stop_signals import StopRequest, TrainingStopped
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.metrics_log import EpochRecord
from fmnist_dist.storage.output_dir import OutputDirLock, claim_output_dir, remove_earlier_run
from fmnist_dist.storage.plots import plot_run
from fmnist_dist.storage.run_dir import RunDirectory
from fmnist_dist.storage.weights import save_state_dict
from fmnist_dist.tracking.base import RunSpec, Tracker
from fmnist_dist.tracking.sweep import SweepTrial, as_sweep_trial, describe_trial
from fmnist_dist.training.build import build_run
from fmnist_dist.training.recipe_settings import peak_lr
from fmnist_dist.training.resume import plan_start
from fmnist_dist.training.trainer import FitResult, Trainer

# A process that loses its peers fails its next collective after this long instead of waiting forever.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def run_training(cfg: TrainConfig, given: frozenset[str] = frozenset(), stop: StopRequest | None = None) -> EpochRecord:
    """Train as `cfg` says; return the final epoch's record (on every process).

    Args:
        given: the settings written on the command line; a resumed run takes the others from its state.
        stop: the stop signals' record (the CLI installs it before its slow imports); None: no stop on signals.

    Raises:
        UsageError: bad settings, data or state; or training diverged.
        TrainingStopped: a stop signal arrived; a state was saved where every process stopped.
    """
    # Under a W&B sweep agent, every process finds the trial's own directory in the environment it inherited.
    cfg, trial = as_sweep_trial(cfg, os.environ)
    # Its release is a clean-up step: should it fail, the job still ends as it would have, with one warning more.
    lock = OutputDirLock(cfg.output_dir)
    with released_after(lock, f"releasing the lock of --output-dir {cfg.output_dir}") as output_lock:
        return _train(cfg, given, stop or StopRequest(), output_lock, trial)


def _train(
    cfg: TrainConfig, given: frozenset[str], stop: StopRequest, output_lock: OutputDirLock, trial: SweepTrial | None
) -> EpochRecord:
    apply_threads(cfg.threads)  # before any parallel work; a per-invocation setting, so a resume does not change it
    processes = join_processes(cfg)
    check_all_processes_joined(processes)
    if trial is not None:
        processes.print(describe_trial(trial, cfg.output_dir))
    claim_output_dir(processes, output_lock, cfg.resume, cfg.overwrite)  # before anything there is read
    with fail_together(processes):
        start = plan_start(cfg, given)  # a resumed run's settings decide everything below, the Accelerator included
    cfg, progress = start.cfg, start.progress
    run = build_run(start, stop)
    accelerator = run.accelerator
    if cfg.overwrite:  # only now that the settings, data, model and schedule have been built without error
        remove_earlier_run(accelerator, cfg.output_dir)
    run_dir = RunDirectory(cfg.output_dir)
    tracker = run.trainer.tracker
    progress.tracker_run_id = (
        tracker.start(run_spec(cfg, accelerator, run.plan, progress.tracker_run_id, trial)) or progress.tracker_run_id
    )
    try:
        result = run.trainer.fit()
        save_final_model(accelerator, run.model, run_dir.model)
        report_results(cfg, accelerator, run.trainer, result, run_dir, tracker)
    except TrainingStopped:
        tracker.mark_preempted()
        raise
    finally:
        tracker.finish()  # never raises: a failure is one warning line; the process group closes in leave_job
    return result.final_record


def join_processes(cfg: TrainConfig) -> PartialState:
    """Join the job's processes in one process group first, so that any later error can reach them all."""
    return PartialState(cpu=wants_cpu(cfg.cpu), timeout=COLLECTIVE_TIMEOUT)


def check_all_processes_joined(processes: PartialState) -> None:
    """Refuse a launch whose processes did not form one job (each would train alone and overwrite the others)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != processes.num_processes:
        raise UsageError(
            f"accelerate launch started {launched} processes but they did not join one job "
            f"({processes.num_processes} process(es) on {processes.device}); on a machine without a GPU per "
            "process pass --cpu (or set ACCELERATE_USE_CPU=1) to run them on the CPU over gloo"
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


def run_spec(
    cfg: TrainConfig, accelerator: Accelerator, plan: BatchPlan, resume_id: str | None, trial: SweepTrial | None
) -> RunSpec:
    """The tracked run as the flags name it, continuing `resume_id` (the run id a resumed state saved); a sweep's
    trial is the run its agent named."""
    return RunSpec(
        project=cfg.wandb_project,
        config=run_config(cfg, accelerator, plan),
        name=cfg.run_name,
        group=cfg.run_group,
        tags=cfg.tags,
        resume_id=resume_id,
        sweep_id=trial.sweep_id if trial is not None else None,
    )


def save_final_model(accelerator: Accelerator, model: torch.nn.Module, path: Path) -> None:
    """Once every process is done, the main process saves plain weights that `NeuralNetwork` loads anywhere."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_state_dict(plain_state_dict(accelerator, model), path)
        accelerator.print(f"fmnist-dist: saved {path}")


def report_results(
    cfg: TrainConfig,
    accelerator: Accelerator,
    trainer: Trainer,
    result: FitResult,
    run_dir: RunDirectory,
    tracker: Tracker,
) -> None:
    """Plots, and the tracker's predictions and model artifact (main process; the last evaluation is on every one).

    A resumed run that had nothing left to train (its last run ended before writing these) evaluated nothing,
    so it logs no predictions; the plots come from the metrics history.
    """
    if not accelerator.is_main_process:
        return
    plot_run(result.metrics, run_dir.curves, run_dir.confusion)
    # With --log-samples-every-epoch the Trainer logged them after every epoch, the last one included.
    if result.last_eval is not None and not cfg.log_samples_every_epoch:
        trainer.log_predictions(result.last_eval)
    if cfg.log_model:
        tracker.log_artifact(run_dir.model, "model")
