"""Two real gloo processes under `accelerate launch`: one set of results, every sample counted once,
the data split between the ranks, and the learning rate scaled on request."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    TEST_SIZE,
    TRAIN_SIZE,
    launch_cli,
    launch_preloaded,
    recorded_ranks,
    run_cli,
    train,
    train_args,
)

from fmnist_dist.storage.metrics_log import MetricsLog

pytestmark = pytest.mark.integration  # real processes: see tests/conftest.py

EPOCHS = 2
DEVICE_LINE = "process(es) on"
# 1003 images in batches of 8 on 2 processes: the last round has 11 real images, so Accelerate pads it.
SHARD_BATCH = 8
SHARD_EPOCHS = 3


@pytest.fixture(scope="module")
def two_process_run(
    data_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess, Path]:
    """A 2-process `train --cpu` whose eval batches of 64 do not divide the 301 test images evenly."""
    output_dir = tmp_path_factory.mktemp("two-process") / "out"
    result = launch_cli(
        train_args(data_dir, output_dir, "--epochs", str(EPOCHS), "--eval-batch-size", "64", "--cpu"),
        cwd=output_dir.parent,
    )
    return result, output_dir


def read_metrics(output_dir: Path) -> list[dict]:
    return [record.as_json() for record in MetricsLog.read(output_dir / "metrics.jsonl")]


@pytest.mark.slow
def test_two_process_training_exits_cleanly(two_process_run) -> None:
    result, _ = two_process_run

    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_two_process_training_writes_one_model_and_one_metrics_file(two_process_run) -> None:
    _, output_dir = two_process_run

    assert list(output_dir.parent.rglob("model.pth")) == [output_dir / "model.pth"]
    assert list(output_dir.parent.rglob("metrics.jsonl")) == [output_dir / "metrics.jsonl"]


@pytest.mark.slow
def test_two_process_metrics_have_one_line_per_epoch(two_process_run) -> None:
    _, output_dir = two_process_run

    assert [record["epoch"] for record in read_metrics(output_dir)] == list(range(1, EPOCHS + 1))


@pytest.mark.slow
def test_two_process_evaluation_counts_every_test_image_once(two_process_run) -> None:
    _, output_dir = two_process_run

    assert [record["test_samples"] for record in read_metrics(output_dir)] == [TEST_SIZE] * EPOCHS


@pytest.mark.slow
def test_two_process_metrics_record_world_size_two(two_process_run) -> None:
    _, output_dir = two_process_run

    assert [record["world_size"] for record in read_metrics(output_dir)] == [2] * EPOCHS


@pytest.mark.slow
def test_two_process_final_accuracy_matches_single_process_evaluate(two_process_run, data_dir: Path) -> None:
    _, output_dir = two_process_run

    result = run_cli(
        ["evaluate", "--checkpoint", output_dir / "model.pth", "--data-dir", data_dir, "--no-download", "--json"],
        cwd=output_dir,
    )

    assert result.returncode == 0, result.stderr
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated["samples"] == TEST_SIZE
    # Equal up to float rounding: one image more or less would differ by 1/301.
    assert read_metrics(output_dir)[-1]["test_accuracy"] == pytest.approx(evaluated["accuracy"], abs=1e-9)


@pytest.mark.slow
def test_device_line_is_printed_once_by_the_main_process(two_process_run) -> None:
    result, _ = two_process_run

    device_lines = [line for line in (result.stdout + result.stderr).splitlines() if DEVICE_LINE in line]
    assert len(device_lines) == 1 and "2 process(es)" in device_lines[0], result.stdout + result.stderr


@pytest.mark.slow
def test_scale_lr_scales_the_learning_rate_with_the_global_batch(data_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    # 2 processes x 64 images: a global batch of 128, twice the reference batch of 64.
    result = launch_preloaded(
        train_args(
            data_dir,
            output_dir,
            "--epochs",
            "1",
            "--lr",
            "0.03",
            "--scale-lr",
            "--batch-size",
            "64",
            "--lr-schedule",
            "constant",
            "--warmup-epochs",
            "0",
            "--cpu",
        ),
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    # The optimizer's own learning rate, as Accelerate saved it with the end-of-epoch training state.
    (optimizer_file,) = output_dir.glob("state/*/optimizer.bin")
    optimizer_state = torch.load(optimizer_file, weights_only=True, map_location="cpu")
    assert [group["lr"] for group in optimizer_state["param_groups"]] == [pytest.approx(0.03 * 2)]


def launch_recorder(data_dir: Path, work: Path, seed: int) -> list[list[list[int]]]:
    """Train on 2 gloo processes, recording what each rank trained on; per epoch, one list per rank."""
    out = work / "out"
    train(
        data_dir,
        out,
        2,
        "--batch-size",
        str(SHARD_BATCH),
        "--epochs",
        str(SHARD_EPOCHS),
        "--seed",
        str(seed),
        record=True,
    )
    ranks = recorded_ranks(out)
    return [list(epoch) for epoch in zip(*ranks, strict=False)]


@pytest.fixture(scope="module")
def shard_runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list]:
    """Per epoch, per rank, the training indices trained: from two launches with the same seed."""
    tmp = tmp_path_factory.mktemp("shards")
    return launch_recorder(data_dir, tmp / "first", seed=7), launch_recorder(data_dir, tmp / "second", seed=7)


@pytest.mark.slow
def test_every_training_index_is_seen_exactly_once_per_epoch(shard_runs) -> None:
    epochs, _ = shard_runs

    assert len(epochs) == SHARD_EPOCHS
    for ranks in epochs:
        seen = [index for rank in ranks for index in rank]
        assert sorted(seen) == list(range(TRAIN_SIZE))


@pytest.mark.slow
def test_ranks_train_on_disjoint_indices(shard_runs) -> None:
    epochs, _ = shard_runs

    for rank0, rank1 in epochs:
        assert rank0 and rank1
        assert not set(rank0) & set(rank1)


@pytest.mark.slow
def test_training_order_changes_between_epochs(shard_runs) -> None:
    epochs, _ = shard_runs

    orders = [tuple(rank0 + rank1) for rank0, rank1 in epochs]
    assert len(set(orders)) == SHARD_EPOCHS


@pytest.mark.slow
def test_training_order_is_reproducible_from_the_seed(shard_runs) -> None:
    first, second = shard_runs

    assert first == second
