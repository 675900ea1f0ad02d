"""The train settings turned into the recipe's plain values: how a step's images are split, and the schedule."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.position import BatchPlan, TrainingPosition, steps_per_epoch
from fmnist_dist.recipe.schedule import WARMUP_START_FACTOR, build_scheduler
from fmnist_dist.settings.train_config import DEFAULT_BATCH_SIZE, REFERENCE_BATCH_SIZE, TrainConfig


def batch_plan(cfg: TrainConfig, processes: int) -> BatchPlan:
    """The plan `--batch-size` or `--global-batch-size` asks for on `processes` processes.

    Raises:
        UsageError: a global batch size that does not split evenly over processes x accumulation steps.
    """
    accumulation = cfg.accumulation_steps
    if cfg.global_batch_size is None:
        return BatchPlan(cfg.batch_size or DEFAULT_BATCH_SIZE, processes, accumulation)
    shares = processes * accumulation
    if cfg.global_batch_size % shares:
        raise UsageError(
            f"--global-batch-size {cfg.global_batch_size} does not split evenly over {processes} process(es) x "
            f"{accumulation} accumulation step(s); pass a multiple of {shares}"
        )
    return BatchPlan(cfg.global_batch_size // shares, processes, accumulation)


def peak_lr(cfg: TrainConfig, global_batch_size: int) -> float:
    """`--lr`, or with `--scale-lr` the linear scaling rule: lr x global batch / REFERENCE_BATCH_SIZE."""
    return cfg.lr * lr_scale(cfg, global_batch_size)


def lr_scale(cfg: TrainConfig, global_batch_size: int) -> float:
    return global_batch_size / REFERENCE_BATCH_SIZE if cfg.scale_lr else 1.0


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of warm-up from `--warmup-steps` or `--warmup-epochs`."""
    return cfg.warmup_steps or round(cfg.warmup_epochs_or_default * steps_per_epoch)


def build_schedule(
    optimizer: Optimizer, cfg: TrainConfig, global_batch_size: int, dataset_size: int, position: TrainingPosition
) -> LRScheduler:
    """The schedule of `cfg` for `cfg.epochs` epochs of `dataset_size` images, replayed to `position`.

    Args:
        optimizer: the SGD optimizer (not yet wrapped by Accelerate).
        global_batch_size: images per optimizer step (for the step count and --scale-lr).
        position: where the run stands (the start for a fresh run).
    """
    per_epoch = steps_per_epoch(global_batch_size, dataset_size)
    return build_scheduler(
        optimizer,
        cfg.lr_schedule,
        total_steps=cfg.epochs * per_epoch,
        warmup_steps=warmup_steps(cfg, per_epoch),
        peak_lr=peak_lr(cfg, global_batch_size),
        # When --scale-lr raises the peak further, the warm-up starts at the unscaled --lr, the small-batch rate
        # (Goyal et al. 2017, arXiv:1706.02677, section 2.2).
        start_factor=min(WARMUP_START_FACTOR, 1 / lr_scale(cfg, global_batch_size)),
        start_step=position.schedule_step(global_batch_size, dataset_size),
    )
