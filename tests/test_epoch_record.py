"""The epoch record, in-process: one type that the Trainer builds; metrics.jsonl holds it as today's strict JSON,
in today's key order; `plot` and a resumed state check it with the same code, so both name the same problem; older
records (without the keys added since) still plot; trackers see its values under today's names."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from conftest import epoch_record

from fmnist_dist.cli import main
from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.position import TrainingPosition
from fmnist_dist.storage import strict_json
from fmnist_dist.storage.metrics_log import EpochRecord, MetricsLog, metrics_record_problem, records_for_plot
from fmnist_dist.storage.plots import plot_run
from fmnist_dist.storage.training_state import Progress

# The throughput, utilisation and memory of an epoch, written since --profile-steps came.
THROUGHPUT_KEYS = [
    "seconds_per_step",
    "data_wait_fraction",
    "flops_per_image",
    "tflops_per_second",
    "mfu",
    "peak_memory_mib",
]
# A metrics.jsonl line's keys, in the order the Trainer has written them since the validation split and the throughput
# metrics came.
KEYS = [
    "epoch",
    "global_step",
    "lr",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "val_loss",
    "val_accuracy",
    "val_samples",
    "test_samples",
    "train_samples",
    "train_seconds",
    "eval_seconds",
    "train_samples_per_second",
    *THROUGHPUT_KEYS,
    "world_size",
    "global_batch_size",
    "mixed_precision",
    "cpu_threads",
    "confusion_matrix",
]
# What the first versions wrote (before lr, global_batch_size, mixed_precision, cpu_threads, the throughput and
# the validation split).
LATER_KEYS = [
    "lr",
    "global_batch_size",
    "mixed_precision",
    "cpu_threads",
    *THROUGHPUT_KEYS,
    "val_loss",
    "val_accuracy",
    "val_samples",
]
FIRST_KEYS = [key for key in KEYS if key not in LATER_KEYS]
# What `plot` has always required.
REQUIRED = ["epoch", "train_loss", "test_loss", "test_accuracy", "confusion_matrix"]


def json_lines(path: Path) -> list[dict]:
    """The file's lines parsed as strict JSON (NaN or Infinity would fail)."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def saved_progress(metrics: list) -> dict:
    """A state's progress.json content (before JSON), as `save_training_state` makes it, holding `metrics`."""
    position = TrainingPosition(epoch=len(metrics), global_step=15 * len(metrics))  # one record per epoch trained
    return asdict(Progress(position, dataset_size=480, per_process_batch=16, global_batch_size=32, metrics=metrics))


def test_a_record_is_written_with_todays_keys_in_todays_order(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path).append(epoch_record())
    (line,) = json_lines(path)
    assert list(line) == KEYS
    assert line == asdict(epoch_record())


def test_non_finite_values_are_written_as_null_and_read_back_as_none(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    diverged = epoch_record(epoch=2, train_loss=float("nan"), test_loss=float("inf"), lr=float("-inf"))
    log = MetricsLog(path)
    log.append(epoch_record())
    log.append(diverged)
    assert json_lines(path)[1] == {**asdict(diverged), "train_loss": None, "test_loss": None, "lr": None}
    assert MetricsLog.read(path) == [epoch_record(), replace(diverged, train_loss=None, test_loss=None, lr=None)]


def test_a_record_of_the_first_versions_is_read_plotted_and_rewritten_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    old_line = json.dumps({key: value for key, value in asdict(epoch_record()).items() if key in FIRST_KEYS})
    path = tmp_path / "metrics.jsonl"
    path.write_text(old_line + "\n")
    (old,) = MetricsLog.read(path)
    assert (old.lr, old.global_batch_size, old.mixed_precision, old.cpu_threads) == (None, None, None, None)

    assert main(["plot", str(tmp_path)]) == 0
    assert (tmp_path / "curves.png").is_file() and (tmp_path / "confusion.png").is_file()
    MetricsLog(path, [old]).append(epoch_record(epoch=2))  # a resumed run rewrites the earlier lines
    assert path.read_text().splitlines()[0] == old_line


def test_a_record_needs_only_what_plot_draws() -> None:
    minimal = {key: value for key, value in asdict(epoch_record()).items() if key in REQUIRED}
    assert EpochRecord.from_json(minimal).as_json() == minimal
    assert metrics_record_problem({"test_loss": 1.0, "train_loss": 1.0}) == "no epoch, test_accuracy, confusion_matrix"


def test_keys_of_newer_versions_are_ignored() -> None:
    assert EpochRecord.from_json({**asdict(epoch_record()), "a_later_metric": 0.25}) == epoch_record()


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"epoch": "1"}, "epoch is '1', not a whole number"),
        ({"epoch": True}, "epoch is True, not a whole number"),
        ({"test_accuracy": "high"}, "test_accuracy is 'high', not a number"),
        ({"cpu_threads": 1.5}, "cpu_threads is 1.5, not a whole number"),
        ({"mixed_precision": 16}, "mixed_precision is 16, not a string"),
        ({"confusion_matrix": [[1] * 10] * 9}, "confusion_matrix is not 10 rows of 10 counts"),
        ({"confusion_matrix": [[-1] * 10] * 10}, "confusion_matrix is not 10 rows of 10 counts"),
    ],
)
def test_plot_and_resume_refuse_a_wrong_value_in_the_same_words(changes: dict, problem: str, tmp_path: Path) -> None:
    record = {**asdict(epoch_record()), **changes}
    assert metrics_record_problem(record) == problem
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(
        UsageError, match=re.escape(f"line 1 of {path} is not an fmnist-dist metrics record ({problem})")
    ):
        records_for_plot(path)
    with pytest.raises(ValueError, match=re.escape(f"its record of epoch 1: {problem}")):
        Progress.from_dict(saved_progress([record]))


def test_a_state_holds_the_records_as_metrics_jsonl_does_and_reads_them_back_typed() -> None:
    records = [epoch_record(), epoch_record(epoch=2, test_loss=float("nan"))]
    saved = json.loads(strict_json.dumps(saved_progress(records)))
    assert saved["metrics"][0] == epoch_record().as_json()
    assert Progress.from_dict(saved).metrics == [records[0], replace(records[1], test_loss=None)]


def test_trackers_see_an_epochs_values_under_todays_names() -> None:
    assert epoch_record().tracker_values() == {
        "epoch": 1,
        "train/epoch_loss": 1.5,
        "train/lr": 0.1,
        "test/loss": 1.25,
        "test/accuracy": 0.5,
        "val/loss": 1.0,
        "val/accuracy": 0.6,
        "perf/train_seconds": 2.0,
        "perf/eval_seconds": 0.5,
        "perf/train_samples_per_second": 240.0,
        "perf/epoch_seconds_per_step": 0.125,
        "perf/epoch_data_wait_fraction": 0.25,
        "perf/flops_per_image": 3_209_216,
        "perf/epoch_tflops_per_second": 0.00077,
        "perf/epoch_mfu": 0.5,
        "perf/epoch_peak_memory_mib": 512.5,
    }


def test_an_epoch_whose_loss_and_accuracy_were_not_finite_leaves_a_gap_in_the_curves(tmp_path: Path) -> None:
    """A null accuracy (a non-finite one, as written) failed the plot with a TypeError."""
    records = [epoch_record(), epoch_record(epoch=2, train_loss=None, test_loss=None, test_accuracy=None)]
    plot_run(records, tmp_path / "curves.png", tmp_path / "confusion.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
