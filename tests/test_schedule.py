"""The learning-rate schedule is PyTorch's own: the rates at chosen steps equal those of the schedulers built
directly, replaying a schedule to a step gives the rates of stepping it there, odd lengths do not crash, and
the train settings (--warmup-epochs, --scale-lr) become the schedule's plain values as documented."""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, OneCycleLR, SequentialLR

from fmnist_dist.recipe.position import TrainingPosition
from fmnist_dist.recipe.schedule import WARMUP_START_FACTOR, build_scheduler
from fmnist_dist.settings.train_config import REFERENCE_BATCH_SIZE, TrainConfig
from fmnist_dist.training.recipe_settings import build_schedule

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


def ours(schedule: str, start_step: int = 0) -> tuple:
    optimizer = sgd()
    total = EPOCHS * STEPS_PER_EPOCH
    return build_scheduler(optimizer, schedule, total, WARMUP, LR, start_step=start_step), optimizer


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
    scheduler = build_scheduler(optimizer, schedule, EPOCHS * STEPS_PER_EPOCH, warmup, LR)

    seen = rates(scheduler, optimizer, EPOCHS * STEPS_PER_EPOCH)
    assert all(0 < rate <= LR for rate in seen[:-1])


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_every_warmup_length_rises_to_the_peak_at_the_step_where_it_ends(schedule: str, steps: int) -> None:
    for warmup in range(steps + 2):
        optimizer = sgd()
        seen = rates(build_scheduler(optimizer, schedule, steps, warmup, LR), optimizer, steps)

        ends = max(0, min(warmup, steps - (2 if schedule == "onecycle" else 1)))  # steps are left after it
        assert all(0 <= rate <= LR * (1 + 1e-12) for rate in seen), (warmup, seen)
        if ends:
            assert seen[ends] == pytest.approx(LR) and all(rate < LR for rate in seen[:ends]), (warmup, seen)


def test_settings_become_the_schedules_steps_and_rates() -> None:
    cfg = TrainConfig(lr=LR, lr_schedule="constant", epochs=EPOCHS, warmup_epochs=0.5)
    dataset_size = STEPS_PER_EPOCH * REFERENCE_BATCH_SIZE
    optimizer = sgd()
    scheduler = build_schedule(optimizer, cfg, REFERENCE_BATCH_SIZE, dataset_size, TrainingPosition())

    seen = rates(scheduler, optimizer, EPOCHS * STEPS_PER_EPOCH)
    warmup = STEPS_PER_EPOCH // 2  # --warmup-epochs 0.5
    assert seen[0] == pytest.approx(LR * WARMUP_START_FACTOR)
    assert seen[warmup] == pytest.approx(LR) and seen[warmup - 1] < LR


@pytest.mark.parametrize(("scale", "start_factor"), [(4, WARMUP_START_FACTOR), (16, 1 / 16)])
def test_scale_lr_raises_the_peak_and_warms_up_from_no_higher_than_the_unscaled_lr(
    scale: int, start_factor: float
) -> None:
    cfg = TrainConfig(lr=LR, lr_schedule="constant", epochs=1, scale_lr=True, warmup_steps=WARMUP)
    global_batch = scale * REFERENCE_BATCH_SIZE
    optimizer = sgd()
    scheduler = build_schedule(optimizer, cfg, global_batch, global_batch * 2 * WARMUP, TrainingPosition())

    seen = rates(scheduler, optimizer, 2 * WARMUP)
    assert seen[0] == pytest.approx(scale * LR * start_factor)
    assert seen[WARMUP:] == [pytest.approx(scale * LR)] * WARMUP
