"""Results that do not depend on the number of processes: the global training position, the global batch size,
exact resume on another world size, gradient accumulation over exactly a step's images, and resumed settings."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_SIZE, printed_by_training, quiet_train_args, train, train_in_process, trained_indices

from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.position import TrainingPosition
from fmnist_dist.recipe.sampling import epoch_order
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.metrics_log import MetricsLog
from fmnist_dist.storage.run_dir import STATES_DIR
from fmnist_dist.storage.training_state import complete_states
from fmnist_dist.training.recipe_settings import batch_plan

GLOBAL_BATCH = 48  # divides by 1, 2 and 3 processes
STATE_STEP = 10  # a mid-epoch state: 480 of the 1003 images of epoch 1 trained


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(output_dir / "model.pth", map_location="cpu", weights_only=True)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[key] - b[key]).abs().max().item() for key in a)


def metrics(output_dir: Path) -> list[dict]:
    return [record.as_json() for record in MetricsLog.read(output_dir / "metrics.jsonl")]


# ------------------------------------------------------------------------------------------- the position


def test_seeds_never_share_an_epoch_order() -> None:
    orders = {seed: [tuple(epoch_order(100, seed, epoch).tolist()) for epoch in range(20)] for seed in (0, 1)}

    assert not set(orders[0]) & set(orders[1])
    assert len(set(orders[0])) == 20  # every epoch of one seed differs too
    assert torch.equal(epoch_order(100, 3, 2), epoch_order(100, 3, 2))  # and it is reproducible


def test_global_batch_that_does_not_split_evenly_is_refused() -> None:
    with pytest.raises(UsageError, match="--global-batch-size 50 does not split evenly over 3 process"):
        batch_plan(TrainConfig(global_batch_size=50), processes=3)
    with pytest.raises(UsageError, match="exclude each other"):
        TrainConfig(batch_size=16, global_batch_size=64)


def test_a_step_splits_its_images_over_micro_batches_then_processes() -> None:
    plan = batch_plan(TrainConfig(global_batch_size=96, gradient_accumulation_steps=3), processes=2)

    assert (plan.per_process, plan.micro_batch, plan.global_batch) == (16, 32, 96)
    assert plan.micro_batch_sizes(96) == [32, 32, 32]
    assert plan.micro_batch_sizes(40) == [32, 8]  # an epoch's short last step: fewer, shorter micro-batches
    assert [plan.process_share(8, rank) for rank in (0, 1)] == [8, 0]


def test_the_position_counts_images_of_the_global_order() -> None:
    position = TrainingPosition()
    while not position.epoch_finished(100):
        position.advance(position.step_samples(32, 100))

    assert (position.samples_done, position.global_step) == (100, 4)  # 32 + 32 + 32 + 4
    assert position.epoch_fraction(100) == 1.0


# ---------------------------------------------------------------------------------- the same on any world size


@pytest.fixture(scope="module")
def reference(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, global batch 48, 2 epochs, every state kept, every trained index recorded."""
    out = tmp_path_factory.mktemp("reference") / "out"
    train(
        data_dir,
        out,
        1,
        "--global-batch-size",
        GLOBAL_BATCH,
        "--checkpoint-every",
        STATE_STEP,
        "--keep-states",
        100,
        record=True,
    )
    return out


@pytest.fixture(scope="module")
def two_process_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("two") / "out"
    train(data_dir, out, 2, "--global-batch-size", GLOBAL_BATCH, "--checkpoint-every", STATE_STEP, "--keep-states", 100)
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_global_batch_size_gives_the_same_model_on_1_2_and_3_processes(
    data_dir: Path, reference: Path, two_process_run: Path, tmp_path: Path
) -> None:
    three = tmp_path / "three"
    train(data_dir, three, 3, "--global-batch-size", GLOBAL_BATCH)

    assert max_difference(weights(reference), weights(two_process_run)) < 1e-5
    assert max_difference(weights(reference), weights(three)) < 1e-5
    assert [r["global_batch_size"] for r in metrics(three)] == [GLOBAL_BATCH] * 2


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize(("saved_by", "resumed_on"), [(1, 2), (2, 1), (2, 3)], ids=["1-on-2", "2-on-1", "2-on-3"])
def test_a_mid_epoch_state_resumes_exactly_on_another_world_size(
    saved_by: int, resumed_on: int, data_dir: Path, reference: Path, two_process_run: Path, tmp_path: Path
) -> None:
    source = reference if saved_by == 1 else two_process_run
    out = tmp_path / "resumed"
    state = complete_states(source / STATES_DIR)[0]
    assert state.name == f"step-{STATE_STEP:09d}"
    shutil.copytree(state, out / STATES_DIR / state.name)

    result = train(data_dir, out, resumed_on, "--resume", record=True)

    assert f"world size {saved_by} -> {resumed_on}" in result.stdout
    before_state = trained_indices(reference)[0][: STATE_STEP * GLOBAL_BATCH]
    after_state = trained_indices(out)[0]  # the rest of the interrupted epoch
    assert sorted(before_state + after_state) == list(range(TRAIN_SIZE))  # each image exactly once
    assert metrics(out)[0]["train_samples"] == TRAIN_SIZE
    assert max_difference(weights(reference), weights(out)) < 1e-5


# ------------------------------------------------------------------------------------- gradient accumulation


def test_accumulating_3_batches_of_64_equals_a_batch_of_192(data_dir: Path, tmp_path: Path) -> None:
    # 1003 images: neither 64 nor 192 divides them, so the last step has 43 images in one short micro-batch.
    accumulated = tmp_path / "accumulated"
    train_in_process(
        quiet_train_args(data_dir, accumulated, "--epochs", 1, "--batch-size", 64, "--gradient-accumulation-steps", 3)
    )
    large = tmp_path / "large"
    train_in_process(quiet_train_args(data_dir, large, "--epochs", 1, "--batch-size", 192))

    assert max_difference(weights(accumulated), weights(large)) < 1e-6
    assert metrics(accumulated)[0]["global_step"] == metrics(large)[0]["global_step"] == 6


# Micro-batches of 8, 3 per optimizer step, a state every 5 steps: states fall mid-step-plan and mid-epoch.
ACCUMULATION_FLAGS = (
    "--batch-size",
    8,
    "--gradient-accumulation-steps",
    3,
    "--checkpoint-every",
    5,
    "--keep-states",
    100,
)


def assert_every_resume_bit_identical(
    straight: Path, states: list[Path], work: Path, resume: Callable[[Path], object]
) -> None:
    """Resume a copy of each of `states` (with `resume(output_dir)`) and compare it with the straight run."""
    for state in states:
        out = work / f"from-{state.name}"
        shutil.copytree(state, out / STATES_DIR / state.name)
        resume(out)
        assert all(torch.equal(a, b) for a, b in zip(weights(straight).values(), weights(out).values(), strict=True)), (
            state.name
        )
        assert metrics(out) == metrics(straight) or [r["train_loss"] for r in metrics(out)] == [
            r["train_loss"] for r in metrics(straight)
        ]


def test_resume_from_every_state_with_accumulation_is_bit_identical(data_dir: Path, tmp_path: Path) -> None:
    """One process, in this one: the straight run, then a resume from every state it saved but the last."""
    straight = tmp_path / "straight"
    train_in_process(quiet_train_args(data_dir, straight, *ACCUMULATION_FLAGS))
    states = complete_states(straight / STATES_DIR)[:-1]
    assert len(states) > 10

    assert_every_resume_bit_identical(
        straight, states, tmp_path, lambda out: train_in_process(quiet_train_args(data_dir, out, "--resume"))
    )


@pytest.mark.integration
@pytest.mark.slow
def test_resume_with_accumulation_on_two_processes_is_bit_identical(data_dir: Path, tmp_path: Path) -> None:
    """Two real processes: a mid-epoch state of each epoch."""
    straight = tmp_path / "straight"
    train(data_dir, straight, 2, *ACCUMULATION_FLAGS)
    states = complete_states(straight / STATES_DIR)[:-1]

    assert_every_resume_bit_identical(
        straight, [states[0], states[-2]], tmp_path, lambda out: train(data_dir, out, 2, "--resume")
    )


# ---------------------------------------------------------------------------------------- resumed settings


@pytest.fixture(scope="module")
def warmup_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Cosine schedule with a 30-step warm-up, lr 0.05: the state of step 10 is mid-warm-up."""
    out = tmp_path_factory.mktemp("warmup") / "out"
    train_in_process(
        quiet_train_args(
            data_dir,
            out,
            "--lr",
            "0.05",
            "--lr-schedule",
            "cosine",
            "--warmup-steps",
            "30",
            "--checkpoint-every",
            STATE_STEP,
            "--keep-states",
            100,
        )
    )
    return out


def resume_copy(
    run: Path, work: Path, data_dir: Path, capsys: pytest.CaptureFixture[str], *flags: str
) -> tuple[Path, str]:
    """Resume a copy of `run`'s first state in `work` (in this process); return `work` and what the run printed."""
    state = complete_states(run / STATES_DIR)[0]
    shutil.copytree(state, work / STATES_DIR / state.name)
    return work, printed_by_training(quiet_train_args(data_dir, work, "--resume", *flags), capsys)


def test_resume_without_flags_continues_with_the_saved_settings(
    warmup_run: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, printed = resume_copy(warmup_run, tmp_path / "resumed", data_dir, capsys)

    assert "same settings" in printed
    assert all(torch.equal(a, b) for a, b in zip(weights(warmup_run).values(), weights(out).values(), strict=True))
    assert [r["lr"] for r in metrics(out)] == [r["lr"] for r in metrics(warmup_run)]


def test_resume_with_a_new_lr_applies_it_and_says_so(
    warmup_run: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, printed = resume_copy(
        warmup_run, tmp_path / "resumed", data_dir, capsys, "--lr", "1e-9", "--lr-schedule", "constant"
    )

    assert "lr 0.05 -> 1e-09" in printed and "lr_schedule cosine -> constant" in printed
    assert [r["lr"] for r in metrics(out)] == [pytest.approx(1e-9)] * 2
    assert max_difference(weights(warmup_run), weights(out)) > 1e-3
