"""The learning-rate schedule: PyTorch's own schedulers, stepped once per optimizer step.

--lr-schedule constant   linear warm-up (LinearLR), then --lr throughout (ConstantLR with factor 1)
--lr-schedule cosine     linear warm-up, then CosineAnnealingLR from --lr down to 0 at the last step
--lr-schedule onecycle   OneCycleLR (its own warm-up lasts --warmup-*, 30% of the run by default;
                         momentum is left at --momentum)
"""

from __future__ import annotations

import warnings

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, OneCycleLR, SequentialLR

from fmnist_dist.settings.train_config import REFERENCE_BATCH_SIZE, TrainConfig

# The warm-up starts at this fraction of the peak rate, or lower: at the unscaled --lr when --scale-lr raises
# the peak further (Goyal et al. 2017, arXiv:1706.02677, section 2.2: "gradual warmup" from the small-batch rate).
WARMUP_START_FACTOR = 0.1
ONECYCLE_DEFAULT_WARMUP = 0.3  # OneCycleLR's own default pct_start


def peak_lr(cfg: TrainConfig, global_batch_size: int) -> float:
    """`--lr`, or with `--scale-lr` the linear scaling rule: lr x global batch / REFERENCE_BATCH_SIZE."""
    return cfg.lr * lr_scale(cfg, global_batch_size)


def lr_scale(cfg: TrainConfig, global_batch_size: int) -> float:
    return global_batch_size / REFERENCE_BATCH_SIZE if cfg.scale_lr else 1.0


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of warm-up from `--warmup-steps` or `--warmup-epochs`."""
    return cfg.warmup_steps or round(cfg.warmup_epochs_or_default * steps_per_epoch)


def build_scheduler(
    optimizer: Optimizer, cfg: TrainConfig, global_batch_size: int, steps_per_epoch: int, start_step: int = 0
) -> LRScheduler:
    """The schedule of `cfg` for a run of `cfg.epochs * steps_per_epoch` optimizer steps, at step `start_step`.

    Every parameter group's rate is first set to the peak rate, so that a resumed run with a new `--lr`
    really trains at it. Stepping a fresh scheduler `start_step` times gives exactly the rates an
    uninterrupted run had there (the same arithmetic in the same order), also after a change of schedule.

    Args:
        optimizer: the SGD optimizer (not yet wrapped by Accelerate).
        global_batch_size: images per optimizer step (for --scale-lr).
        steps_per_epoch: optimizer steps per epoch at that batch size.
        start_step: steps already taken (0 for a fresh run).
    """
    peak = peak_lr(cfg, global_batch_size)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = peak
    total = cfg.epochs * steps_per_epoch
    # Steps are left after the warm-up (a schedule of no steps is undefined): a warm-up as long as the run or
    # longer ramps up over all but the last step (onecycle: the last two, its annealing needs two ends).
    warmup = max(0, min(warmup_steps(cfg, steps_per_epoch), total - (2 if cfg.lr_schedule == "onecycle" else 1)))
    scheduler = _schedule(optimizer, cfg, total, warmup, min(WARMUP_START_FACTOR, 1 / lr_scale(cfg, global_batch_size)))
    with warnings.catch_warnings():  # replaying steps before any optimizer.step() is intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(min(start_step, total)):  # a run resumed at or past its (new) end trains no more steps
            scheduler.step()
    return scheduler


def _schedule(optimizer: Optimizer, cfg: TrainConfig, total: int, warmup: int, start_factor: float) -> LRScheduler:
    if cfg.lr_schedule == "onecycle":
        # OneCycleLR peaks at step pct_start * total - 1: (warmup + 1) / total puts the peak at step `warmup`, as
        # the linear warm-up does (and a 1-step warm-up is no rising phase of length 0, which divides by zero).
        return OneCycleLR(
            optimizer,
            max_lr=optimizer.param_groups[0]["lr"],
            total_steps=total,
            pct_start=(warmup + 1) / total if warmup else ONECYCLE_DEFAULT_WARMUP,
            cycle_momentum=False,
        )
    after_warmup = (
        CosineAnnealingLR(optimizer, T_max=total - warmup)
        if cfg.lr_schedule == "cosine"
        else ConstantLR(optimizer, factor=1.0, total_iters=0)
    )
    if not warmup:
        return after_warmup
    ramp = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, after_warmup], milestones=[warmup])
