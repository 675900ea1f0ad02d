"""`fmnist-dist train`: builds the Accelerator, data, model and optimizer, runs the Trainer, saves the results.

    fmnist-dist train                                                      # one device
    accelerate launch --config_file launch/multi-gpu.yaml -m fmnist_dist train   # every GPU of a node
    accelerate launch --config_file launch/cpu.yaml -m fmnist_dist train --cpu   # 2 CPU processes (gloo)
"""

from __future__ import annotations

import os
import platform
import tempfile
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import accelerate
import torch
import torchvision
from accelerate import Accelerator, DataLoaderConfiguration, InitProcessGroupKwargs
from accelerate.utils import parse_flag_from_env, set_seed

import fmnist_dist
from fmnist_dist.checkpoint import save_state_dict
from fmnist_dist.config import DEFAULT_BATCH_SIZE, TrainConfig
from fmnist_dist.data import first_images, is_on_device, load_split, make_loader, place_on_device
from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.model import NeuralNetwork
from fmnist_dist.plots import plot_run
from fmnist_dist.state import Progress, clear_states, find_state, load_training_state
from fmnist_dist.tracking import (
    WANDB, MetricsLog, choose_wandb_mode, finish_run, log_model_artifact, start_run,
)
from fmnist_dist.training import Trainer, output_paths

# A process that loses its peers fails its next collective after this long instead of waiting forever.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
SAMPLE_IMAGES = 32


def run_training(cfg: TrainConfig, given: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Train as `cfg` says; return the final epoch's metrics (on every process)."""
    cfg = replace(cfg, batch_size=cfg.batch_size or DEFAULT_BATCH_SIZE)  # interim, until the global batch plan
    check_output_dir(cfg.output_dir)
    accelerator = build_accelerator(cfg)
    check_all_processes_joined(accelerator)
    accelerator.print(describe_setup(accelerator))
    set_seed(cfg.seed)  # the same initial weights on every process, and reproducible ones
    train_set, test_set = load_datasets(cfg, accelerator)
    model = NeuralNetwork()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=effective_lr(cfg, accelerator), momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    model, optimizer, train_loader, test_loader = accelerator.prepare(
        model, optimizer, loader_for(train_set, cfg, cfg.batch_size, True), loader_for(test_set, cfg, cfg.eval_batch_size, False)
    )
    progress = start_progress(cfg, accelerator)
    paths = output_paths(cfg.output_dir)
    progress.wandb_run_id = start_run(
        accelerator, cfg.wandb_project, run_config(cfg, accelerator), wandb_init_kwargs(cfg, progress.wandb_run_id)
    ) or progress.wandb_run_id
    trainer = Trainer(cfg, accelerator, model, optimizer, train_loader, test_loader, len(train_set), progress,
                      MetricsLog(paths["metrics"], progress.metrics), first_images(test_set, SAMPLE_IMAGES))
    trainer.fit()
    save_final_model(accelerator, model, paths["model"])
    report_results(cfg, accelerator, trainer, paths)
    finish_run(accelerator)
    return progress.metrics[-1]


def check_output_dir(output_dir: Path) -> None:
    """Refuse an output directory that cannot be created or written, before any work is done."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise UsageError(
            f"cannot write to output directory {output_dir} ({first_line(error)}); choose another --output-dir"
        ) from error


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """The job's Accelerator; mixed precision and accumulation come from flags, else from `accelerate launch`."""
    if cfg.tracker == WANDB:
        choose_wandb_mode()
    options: dict[str, Any] = {}
    if cfg.gradient_accumulation_steps is not None:
        options["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    return Accelerator(
        cpu=wants_cpu(cfg.cpu),
        mixed_precision=cfg.mixed_precision,
        log_with=WANDB if cfg.tracker == WANDB else None,
        project_dir=str(cfg.output_dir),
        # A seedable sampler shuffles by (seed + epoch): every epoch differs, every rerun and resume repeats it.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
        **options,
    )


def wants_cpu(cpu_flag: bool) -> bool:
    """`--cpu`, or ACCELERATE_USE_CPU=1 (which Accelerate itself reads only after setting up the process group)."""
    return cpu_flag or parse_flag_from_env("ACCELERATE_USE_CPU")


def check_all_processes_joined(accelerator: Accelerator) -> None:
    """Refuse a launch whose processes did not form one job (each would train alone and overwrite the others)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UsageError(
            f"accelerate launch started {launched} processes but they did not join one job "
            f"({accelerator.num_processes} process(es) on {accelerator.device}); on a machine without a GPU per "
            "process pass --cpu (or set ACCELERATE_USE_CPU=1) to run them on the CPU over gloo"
        )


def describe_setup(accelerator: Accelerator) -> str:
    """The line the main process prints once: device, process count, backend, precision."""
    return (
        f"fmnist-dist: {accelerator.num_processes} process(es) on {accelerator.device} "
        f"({accelerator.distributed_type.value}, mixed precision: {accelerator.mixed_precision}, "
        f"gradient accumulation: {accelerator.gradient_accumulation_steps})"
    )


def load_datasets(cfg: TrainConfig, accelerator: Accelerator) -> tuple:
    """Both splits; the main process downloads first so that processes never race on the files."""
    with accelerator.main_process_first():
        train_set = load_split(cfg.data_dir, train=True, download=cfg.download)
        test_set = load_split(cfg.data_dir, train=False, download=cfg.download)
    return (place_on_device(train_set, accelerator, cfg.data_on_device),
            place_on_device(test_set, accelerator, cfg.data_on_device))


def loader_for(dataset, cfg: TrainConfig, batch_size: int, shuffle: bool):
    """A loader with the user's workers and pinned memory, unless the data already lives on the device."""
    on_device = is_on_device(dataset)
    return make_loader(
        dataset, batch_size, shuffle,
        num_workers=0 if on_device else cfg.num_workers,
        pin_memory=not on_device and torch.cuda.is_available() and not cfg.cpu,
    )


def effective_lr(cfg: TrainConfig, accelerator: Accelerator) -> float:
    """`--lr`, times the process count with `--scale-lr` (each process adds a batch to every step)."""
    return cfg.lr * accelerator.num_processes if cfg.scale_lr else cfg.lr


def start_progress(cfg: TrainConfig, accelerator: Accelerator) -> Progress:
    """A fresh start (forgetting an earlier run's states), or the progress of the state `--resume` names."""
    if cfg.resume is None:
        if accelerator.is_main_process:
            clear_states(cfg.output_dir)
        accelerator.wait_for_everyone()
        return Progress(world_size=accelerator.num_processes, batch_size=cfg.batch_size)
    state_dir = find_state(cfg.output_dir, cfg.resume)
    progress = load_training_state(accelerator, state_dir)
    accelerator.print(f"fmnist-dist: resuming from {state_dir} (epoch {progress.epoch + 1}, step {progress.global_step})")
    if (progress.world_size, progress.batch_size) != (accelerator.num_processes, cfg.batch_size):
        accelerator.print(
            f"fmnist-dist: warning: the state was saved with {progress.world_size} process(es) at batch size "
            f"{progress.batch_size}; continuing with {accelerator.num_processes} at {cfg.batch_size} changes the "
            "data order, so the result will differ from an uninterrupted run"
        )
    return progress


def run_config(cfg: TrainConfig, accelerator: Accelerator) -> dict[str, Any]:
    """Everything that defines the run, for W&B: settings, world size, device and versions."""
    return {
        **cfg.to_log(),
        "effective_lr": effective_lr(cfg, accelerator),
        "world_size": accelerator.num_processes,
        "global_batch_size": cfg.batch_size * accelerator.num_processes,
        "device": str(accelerator.device),
        "distributed_type": accelerator.distributed_type.value,
        "mixed_precision": accelerator.mixed_precision,
        "versions": {
            "fmnist_dist": fmnist_dist.__version__,
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__,
            "python": platform.python_version(),
        },
    }


def wandb_init_kwargs(cfg: TrainConfig, run_id: str | None) -> dict[str, Any]:
    """wandb.init arguments: naming flags, and the saved run id so a resumed job continues the same run."""
    kwargs: dict[str, Any] = {"name": cfg.run_name, "group": cfg.run_group, "tags": list(cfg.tags) or None}
    if run_id:
        kwargs.update(id=run_id, resume="allow")
    return {key: value for key, value in kwargs.items() if value is not None}


def save_final_model(accelerator: Accelerator, model: torch.nn.Module, path: Path) -> None:
    """Once every process is done, the main process saves plain weights that `NeuralNetwork` loads anywhere."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        save_state_dict(unwrapped.state_dict(), path)
        accelerator.print(f"fmnist-dist: saved {path}")


def report_results(cfg: TrainConfig, accelerator: Accelerator, trainer: Trainer, paths: dict) -> None:
    """Plots, and the W&B predictions and model artifact (main process; the last evaluation is on every one)."""
    if not accelerator.is_main_process or trainer.last_eval is None:
        return
    plot_run(trainer.progress.metrics, paths["curves"], paths["confusion"])
    if not cfg.log_samples_every_epoch:  # else the Trainer logged them after every epoch, the last one included
        trainer.log_predictions(trainer.last_eval)
    if cfg.log_model:
        log_model_artifact(accelerator, paths["model"])
