"""The learning-rate schedule: PyTorch's own schedulers, stepped once per optimizer step.

constant   linear warm-up (LinearLR), then the peak rate throughout (ConstantLR with factor 1)
cosine     linear warm-up, then CosineAnnealingLR from the peak rate down to 0 at the last step
onecycle   OneCycleLR (its own warm-up lasts the warm-up steps, 30% of the run without any; momentum is
           left as the optimizer has it)
"""

from __future__ import annotations

import warnings

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, OneCycleLR, SequentialLR

# The warm-up starts at this fraction of the peak rate (Goyal et al. 2017, arXiv:1706.02677, section 2.2:
# "gradual warmup" from a small rate).
WARMUP_START_FACTOR = 0.1
ONECYCLE_DEFAULT_WARMUP = 0.3  # OneCycleLR's own default pct_start


def build_scheduler(
    optimizer: Optimizer,
    schedule: str,
    total_steps: int,
    warmup_steps: int,
    peak_lr: float,
    start_factor: float = WARMUP_START_FACTOR,
    start_step: int = 0,
) -> LRScheduler:
    """The schedule for a run of `total_steps` optimizer steps, at step `start_step`.

    Every parameter group's rate is first set to the peak rate, so that a resumed run with a new peak really
    trains at it. Stepping a fresh scheduler `start_step` times gives exactly the rates an uninterrupted run
    had there (the same arithmetic in the same order), also after a change of schedule.

    Args:
        optimizer: the optimizer (not yet wrapped by Accelerate).
        schedule: "constant", "cosine" or "onecycle".
        total_steps: optimizer steps of the whole run (at least 1).
        warmup_steps: steps of the linear warm-up; a warm-up as long as the run or longer is shortened so
            that steps are left after it.
        peak_lr: the rate at the end of the warm-up.
        start_factor: the warm-up's first rate, as a fraction of the peak (constant and cosine).
        start_step: steps already taken (0 for a fresh run); a run at or past its end replays all of them.
    """
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = peak_lr
    # A schedule of no steps is undefined: the warm-up ramps up over all but the last step at most (onecycle:
    # the last two, its annealing needs two ends).
    warmup = max(0, min(warmup_steps, total_steps - (2 if schedule == "onecycle" else 1)))
    scheduler = _schedule(optimizer, schedule, total_steps, warmup, start_factor)
    with warnings.catch_warnings():  # replaying steps before any optimizer.step() is intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(min(start_step, total_steps)):  # a run resumed at or past its (new) end trains no more steps
            scheduler.step()
    return scheduler


def _schedule(optimizer: Optimizer, schedule: str, total: int, warmup: int, start_factor: float) -> LRScheduler:
    if schedule == "onecycle":
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
        if schedule == "cosine"
        else ConstantLR(optimizer, factor=1.0, total_iters=0)
    )
    if not warmup:
        return after_warmup
    ramp = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, after_warmup], milestones=[warmup])
