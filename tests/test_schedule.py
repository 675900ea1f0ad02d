"""The learning-rate schedule is PyTorch's own: the rates at chosen steps equal those of the schedulers built
directly, replaying a schedule to a step gives the rates of stepping it there, and odd lengths do not crash."""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, OneCycleLR, SequentialLR

from fmnist_dist.recipe.schedule import WARMUP_START_FACTOR, build_scheduler
from fmnist_dist.settings.train_config import TrainConfig

LR, STEPS_PER_EPOCH, EPOCHS, WARMUP = 0.1, 10, 3, 7


def rates(scheduler, optimizer, steps: int) -> list[float]:
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def sgd() -> torch.optim.SGD:
    return torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=LR, momentum=0.9)


def ours(schedule: str, start_step: int = 0, **flags) -> tuple:
    optimizer = sgd()
    cfg = TrainConfig(lr=LR, lr_schedule=schedule, epochs=EPOCHS, warmup_steps=WARMUP, warmup_epochs=0, **flags)
    return build_scheduler(optimizer, cfg, 64, STEPS_PER_EPOCH, start_step), optimizer


def test_warmup_then_cosine_equals_pytorchs_schedulers() -> None:
    reference_optimizer = sgd()
    total = EPOCHS * STEPS_PER_EPOCH
    reference = SequentialLR(
        reference_optimizer,
        [
            LinearLR(reference_optimizer, start_factor=WARMUP_START_FACTOR, total_iters=WARMUP),
            CosineAnnealingLR(reference_optimizer, T_max=total - WARMUP),
        ],
        milestones=[WARMUP],
    )

    scheduler, optimizer = ours("cosine")
    expected = rates(reference, reference_optimizer, total)
    assert rates(scheduler, optimizer, total) == expected
    assert expected[0] == pytest.approx(LR * WARMUP_START_FACTOR) and expected[WARMUP] == pytest.approx(LR)


def test_onecycle_equals_pytorchs_with_the_warmup_as_its_rising_phase() -> None:
    reference_optimizer = sgd()
    total = EPOCHS * STEPS_PER_EPOCH
    reference = OneCycleLR(
        reference_optimizer, max_lr=LR, total_steps=total, pct_start=(WARMUP + 1) / total, cycle_momentum=False
    )

    scheduler, optimizer = ours("onecycle")
    expected = rates(reference, reference_optimizer, total)
    assert rates(scheduler, optimizer, total) == expected
    assert expected[WARMUP] == pytest.approx(LR)  # the peak where the linear warm-up reaches it
    assert optimizer.param_groups[0]["momentum"] == 0.9  # --momentum is left alone


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
def test_a_schedule_replayed_to_a_step_continues_with_the_same_rates(schedule: str) -> None:
    straight, straight_optimizer = ours(schedule)
    expected = rates(straight, straight_optimizer, EPOCHS * STEPS_PER_EPOCH)

    resumed, resumed_optimizer = ours(schedule, start_step=5)  # mid-warm-up
    assert rates(resumed, resumed_optimizer, EPOCHS * STEPS_PER_EPOCH - 5) == expected[5:]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
@pytest.mark.parametrize("warmup", [EPOCHS * STEPS_PER_EPOCH, 10 * EPOCHS * STEPS_PER_EPOCH])
def test_a_warmup_as_long_as_the_run_or_longer_still_trains_every_step(schedule: str, warmup: int) -> None:
    optimizer = sgd()
    cfg = TrainConfig(lr=LR, lr_schedule=schedule, epochs=EPOCHS, warmup_steps=warmup, warmup_epochs=0)
    scheduler = build_scheduler(optimizer, cfg, 64, STEPS_PER_EPOCH)

    seen = rates(scheduler, optimizer, EPOCHS * STEPS_PER_EPOCH)
    assert all(0 < rate <= LR for rate in seen[:-1])


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_every_warmup_length_rises_to_the_peak_at_the_step_where_it_ends(schedule: str, steps: int) -> None:
    for warmup in range(steps + 2):
        optimizer = sgd()
        cfg = TrainConfig(lr=LR, lr_schedule=schedule, epochs=1, warmup_steps=warmup, warmup_epochs=0)
        seen = rates(build_scheduler(optimizer, cfg, 64, steps), optimizer, steps)

        ends = max(0, min(warmup, steps - (2 if schedule == "onecycle" else 1)))  # steps are left after it
        assert all(0 <= rate <= LR * (1 + 1e-12) for rate in seen), (warmup, seen)
        if ends:
            assert seen[ends] == pytest.approx(LR) and all(rate < LR for rate in seen[:ends]), (warmup, seen)
