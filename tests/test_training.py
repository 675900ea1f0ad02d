"""Single-process `fmnist-dist train`: it learns, records every epoch, saves weights plain PyTorch loads,
and every option it takes (here: gradient accumulation) changes training the way it says. In-process: the run
that `build_run` builds returns what it produced, and its states count images in whole numbers."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from conftest import TRAIN_SIZE, run_cli, synthetic_data, train_args, train_in_process
from torchvision import datasets
from torchvision.transforms import ToTensor

from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.runtime.stop_signals import TrainingStopped
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.metrics_log import MetricsLog
from fmnist_dist.storage.run_dir import PROGRESS_FILE, RunDirectory
from fmnist_dist.training.build import build_run
from fmnist_dist.training.resume import plan_start
from fmnist_dist.training.trainer import FitResult

EPOCHS = 3
TEST_SIZE = 301
METRIC_KEYS = {
    "epoch",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "test_samples",
    "train_seconds",
    "eval_seconds",
    "train_samples_per_second",
    "world_size",
}


@pytest.fixture(scope="module")
def learnable_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough synthetic images to learn from in a few seconds."""
    return synthetic_data(tmp_path_factory, "learnable", train_size=2000, test_size=TEST_SIZE, seed=1)


@pytest.fixture(scope="module")
def trained_run(learnable_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output directory of one single-process training run of EPOCHS epochs."""
    output_dir = tmp_path_factory.mktemp("trained") / "out"
    result = run_cli(
        train_args(learnable_data_dir, output_dir, "--epochs", str(EPOCHS), "--no-progress"), cwd=output_dir.parent
    )
    assert result.returncode == 0, result.stderr
    return output_dir


def read_metrics(output_dir: Path) -> list[dict]:
    return [record.as_json() for record in MetricsLog.read(output_dir / "metrics.jsonl")]


def load_plain(path: Path) -> NeuralNetwork:
    """model.pth loaded as a quickstart user would: weights only, strictly, into a fresh network."""
    model = NeuralNetwork()
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"), strict=True)
    return model.eval()


@pytest.mark.integration
@pytest.mark.slow
def test_training_reaches_accuracy_far_above_chance(trained_run: Path) -> None:
    assert read_metrics(trained_run)[-1]["test_accuracy"] > 0.6  # chance is 0.1


@pytest.mark.integration
@pytest.mark.slow
def test_metrics_file_has_one_line_per_epoch_with_every_required_key(trained_run: Path) -> None:
    records = read_metrics(trained_run)

    assert [r["epoch"] for r in records] == list(range(1, EPOCHS + 1))
    for record in records:
        assert record.keys() >= METRIC_KEYS
        assert 0 <= record["test_accuracy"] <= 1
        assert record["test_samples"] == TEST_SIZE
        assert record["world_size"] == 1
        assert record["train_seconds"] > 0 and record["eval_seconds"] > 0 and record["train_samples_per_second"] > 0


@pytest.mark.integration
@pytest.mark.slow
def test_saved_model_loads_with_weights_only_into_a_fresh_network(trained_run: Path) -> None:
    model = load_plain(trained_run / "model.pth")  # raises on a missing, extra or misshapen tensor

    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.integration
@pytest.mark.slow
def test_saved_model_accuracy_matches_evaluate_and_the_last_epoch(trained_run: Path, learnable_data_dir: Path) -> None:
    test_set = datasets.FashionMNIST(root=str(learnable_data_dir), train=False, download=False, transform=ToTensor())
    images = torch.stack([image for image, _ in test_set])
    with torch.no_grad():
        predicted = load_plain(trained_run / "model.pth")(images).argmax(dim=1)
    direct_accuracy = (predicted == test_set.targets).double().mean().item()

    result = run_cli(
        [
            "evaluate",
            "--checkpoint",
            trained_run / "model.pth",
            "--data-dir",
            learnable_data_dir,
            "--no-download",
            "--json",
        ],
        cwd=trained_run,
    )

    assert result.returncode == 0, result.stderr
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    assert reported["samples"] == TEST_SIZE
    # Equal up to float rounding: one image more or less would differ by 1/301.
    assert reported["accuracy"] == pytest.approx(direct_accuracy, abs=1e-9)
    assert read_metrics(trained_run)[-1]["test_accuracy"] == pytest.approx(direct_accuracy, abs=1e-9)


@pytest.fixture(scope="module")
def even_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A training set that divides evenly into batches of 16 and of 32, so every optimizer step is a full one."""
    return synthetic_data(tmp_path_factory, "even", train_size=256, test_size=20, seed=2)


def train_weights(data_dir: Path, output_dir: Path, *flags: str) -> dict[str, torch.Tensor]:
    """Train one epoch with `flags` in this process; return the saved weights."""
    train_in_process(train_args(data_dir, output_dir, "--epochs", "1", "--no-progress", *flags))
    return torch.load(output_dir / "model.pth", weights_only=True, map_location="cpu")


def initial_weights(seed: int) -> dict[str, torch.Tensor]:
    """The weights `train --seed SEED` starts from."""
    set_seed(seed)
    return NeuralNetwork().state_dict()


def all_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> bool:
    return all(torch.allclose(a[key], b[key], rtol=0, atol=atol) for key in a)


def test_gradient_accumulation_steps_like_a_batch_that_many_times_larger(even_data_dir: Path, tmp_path: Path) -> None:
    accumulated = train_weights(
        even_data_dir, tmp_path / "accumulated", "--batch-size", "16", "--gradient-accumulation-steps", "2"
    )
    large_batch = train_weights(even_data_dir, tmp_path / "large", "--batch-size", "32")
    small_batch = train_weights(even_data_dir, tmp_path / "small", "--batch-size", "16")

    # 8 optimizer steps on 32 images each, whether the 32 come in one batch or in two accumulated ones, equal up
    # to the rounding of summing in another order (1.06e-6 here on 2026-12-02, 1e-5 as across processes)...
    assert all_close(accumulated, large_batch, atol=1e-5)
    # ...and not 16 steps on 16 images each, nor the untrained weights.
    assert not all_close(accumulated, small_batch, atol=1e-3)
    assert not all_close(accumulated, initial_weights(seed=0), atol=1e-3)


# ----------------------------------------------------------------------------------------------- in-process

IN_PROCESS_BATCH, IN_PROCESS_STATE_STEP = 32, 10


@pytest.fixture(scope="module")
def fitted(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FitResult, Path]:
    """One run built by `build_run` and fitted in this process (2 epochs, a state every 10 steps)."""
    output_dir = tmp_path_factory.mktemp("in-process") / "out"
    cfg = TrainConfig(
        data_dir=data_dir,
        download=False,
        output_dir=output_dir,
        epochs=2,
        batch_size=IN_PROCESS_BATCH,
        eval_batch_size=64,
        checkpoint_every=IN_PROCESS_STATE_STEP,
        keep_states=100,
        cpu=True,
        tracker="none",
        progress=False,
    )
    return build_run(plan_start(cfg, given=frozenset())).trainer.fit(), output_dir


def test_fit_returns_every_epochs_record_and_the_last_evaluation(fitted: tuple[FitResult, Path]) -> None:
    result, output_dir = fitted

    assert [r.epoch for r in result.metrics] == [1, 2]
    assert result.final_record == result.metrics[-1]
    assert [r.test_accuracy for r in MetricsLog.read(output_dir / "metrics.jsonl")] == [
        r.test_accuracy for r in result.metrics
    ]
    assert result.last_eval is not None and result.last_eval.samples == result.final_record.test_samples
    assert result.last_eval.accuracy == result.final_record.test_accuracy


def test_a_mid_epoch_state_counts_the_epochs_images_as_a_whole_number(fitted: tuple[FitResult, Path]) -> None:
    result, output_dir = fitted
    state = RunDirectory(output_dir).state(IN_PROCESS_STATE_STEP)

    saved = json.loads((state / PROGRESS_FILE).read_text())

    assert saved["epoch_samples"] == IN_PROCESS_STATE_STEP * IN_PROCESS_BATCH < TRAIN_SIZE
    assert type(saved["epoch_samples"]) is int  # not 320.0
    assert all(type(r.train_samples) is int for r in result.metrics)


def test_a_run_stopped_after_overwrite_says_to_resume_without_it(data_dir: Path, tmp_path: Path) -> None:
    """The same command again, --overwrite included, would remove the state the stop just saved."""
    cfg = TrainConfig(
        data_dir=data_dir,
        download=False,
        output_dir=tmp_path / "out",
        overwrite=True,
        cpu=True,
        tracker="none",
        progress=False,
    )
    trainer = build_run(plan_start(cfg, given=frozenset())).trainer
    trainer.stop.signal_number = signal.SIGTERM  # as the stop signals' handler records one

    with pytest.raises(TrainingStopped) as stopped:
        trainer.fit()

    assert str(stopped.value).endswith("run the same command without --overwrite, with --resume auto, to continue")
