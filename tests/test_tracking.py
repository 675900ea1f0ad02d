"""W&B tracking, offline: one run per job (also with two real processes), named by the flags, holding the epoch
metrics, the sample-predictions table, the confusion matrix and, with `--log-model`, the weights as an artifact;
and a W&B that cannot start never stops training.

Offline runs are checked in the run's own transaction log (`run-<id>.wandb`, what `wandb sync` uploads), read
record by record with W&B's protobuf schema, and in the table files the run writes next to it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import launch_cli, run_cli, train_args
from wandb.proto import wandb_internal_pb2

from fmnist_dist.recipe.model import CLASSES
from fmnist_dist.storage.metrics_log import MetricsLog
from fmnist_dist.tracking.wandb_tracker import ignore_unusable_init_timeout, rejected_flag
from fmnist_dist.training.build import SAMPLE_IMAGES

pytestmark = pytest.mark.slow

EPOCHS = 2
RUN_NAME = "outputs test/run"  # a space and a slash: not allowed in artifact names
RUN_GROUP = "outputs-test-group"
TAGS = ["ci", "two-processes"]


@dataclass(frozen=True)
class TrackedJob:
    """A finished `train --tracker wandb` job and the one offline W&B run it left under `cwd/wandb`."""

    result: subprocess.CompletedProcess
    cwd: Path
    output_dir: Path

    @property
    def run_dirs(self) -> list[Path]:
        return sorted((self.cwd / "wandb").glob("offline-run-*"))

    @property
    def records(self) -> list[wandb_internal_pb2.Record]:
        (run_dir,) = self.run_dirs
        (log,) = run_dir.glob("run-*.wandb")
        return list(read_wandb_log(log))

    def history(self) -> list[dict[str, str]]:
        """Each logged step as {key: JSON value}; nested media fields are joined with '/'."""
        return [{_item_key(item): item.value_json for item in r.history.item} for r in self.of_type("history")]

    def run_record(self) -> wandb_internal_pb2.RunRecord:
        (record,) = self.of_type("run")
        return record.run

    def artifacts(self) -> list[wandb_internal_pb2.ArtifactRecord]:
        return [r.artifact for r in self.of_type("artifact")]

    def of_type(self, kind: str) -> list[wandb_internal_pb2.Record]:
        return [r for r in self.records if r.WhichOneof("record_type") == kind]


def read_wandb_log(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of a `.wandb` file: a 7-byte header, then LevelDB-log blocks of 32 KiB holding chunks
    (4-byte CRC, 2-byte length, 1-byte type: full, first, middle or last piece of one protobuf Record)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, header, full, last = 32 * 1024, 7, 1, 4
    position, pieces = header, b""
    while position + header <= len(data):
        if block - position % block < header:  # the rest of a block too short for a chunk is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + header])
        if kind == 0:  # zero padding up to the end of the block
            position += block - position % block
            continue
        pieces += data[position + header : position + header + length]
        position += header + length
        if kind in (full, last):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def _item_key(item) -> str:
    return "/".join(item.nested_key) or item.key


def _logged_tables(job: TrackedJob, name: str) -> list[dict[str, str]]:
    return [row for row in job.history() if f"{name}/_type" in row]


def _steps_with(job: TrackedJob, key: str) -> list[int]:
    """The positions in the history of the steps that logged `key`."""
    return [i for i, row in enumerate(job.history()) if key in row]


def _tracked_job(runner, data_dir: Path, cwd: Path, *flags: str) -> TrackedJob:
    """A W&B-offline training run in its own fresh working directory."""
    output_dir = cwd / "out"
    result = runner(
        train_args(data_dir, output_dir, "--cpu", "--epochs", str(EPOCHS), "--tracker", "wandb", *flags), cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return TrackedJob(result, cwd, output_dir)


@pytest.fixture(scope="module")
def launched_job(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrackedJob:
    """Two real gloo processes with W&B offline, named by the flags, storing the model, in a fresh directory."""
    return _tracked_job(
        launch_cli,
        data_dir,
        tmp_path_factory.mktemp("wandb-launch"),
        "--run-name",
        RUN_NAME,
        "--run-group",
        RUN_GROUP,
        "--tags",
        *TAGS,
        "--log-model",
    )


@pytest.fixture(scope="module")
def every_epoch_job(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrackedJob:
    """One process with W&B offline and `--log-samples-every-epoch`."""
    return _tracked_job(run_cli, data_dir, tmp_path_factory.mktemp("wandb-every-epoch"), "--log-samples-every-epoch")


@pytest.mark.integration
def test_a_two_process_job_makes_exactly_one_offline_run(launched_job: TrackedJob) -> None:
    assert len(launched_job.run_dirs) == 1, [p.name for p in launched_job.run_dirs]
    assert len(launched_job.of_type("run")) == 1


@pytest.mark.integration
def test_the_run_records_every_epochs_test_metrics(launched_job: TrackedJob) -> None:
    records = MetricsLog.read(launched_job.output_dir / "metrics.jsonl")
    logged = [json.loads(row["test/accuracy"]) for row in launched_job.history() if "test/accuracy" in row]
    assert logged == pytest.approx([r.test_accuracy for r in records])
    assert len(logged) == EPOCHS
    assert all("test/loss" in row for row in launched_job.history() if "test/accuracy" in row)


@pytest.mark.integration
def test_run_name_group_and_tags_come_from_the_flags(launched_job: TrackedJob) -> None:
    run = launched_job.run_record()
    assert (run.display_name, run.run_group, list(run.tags)) == (RUN_NAME, RUN_GROUP, TAGS)


@pytest.mark.integration
def test_the_run_config_records_the_world_size(launched_job: TrackedJob) -> None:
    config = {item.key: json.loads(item.value_json) for r in launched_job.of_type("config") for item in r.config.update}
    assert config["world_size"] == 2
    assert config["epochs"] == EPOCHS


@pytest.mark.integration
def test_log_model_stores_model_pth_as_a_model_artifact(launched_job: TrackedJob) -> None:
    models = [a for a in launched_job.artifacts() if a.type == "model"]
    assert len(models) == 1
    assert [entry.path for entry in models[0].manifest.contents] == ["model.pth"]


@pytest.mark.integration
def test_samples_and_confusion_matrix_are_logged_once_at_the_end_by_default(launched_job: TrackedJob) -> None:
    last_epoch = _steps_with(launched_job, "test/accuracy")[-1]
    assert _steps_with(launched_job, "test/predictions/_type") == [last_epoch]
    assert _steps_with(launched_job, "test/confusion_matrix_table/_type") == [last_epoch]


@pytest.mark.integration
def test_log_samples_every_epoch_logs_them_after_every_epoch(every_epoch_job: TrackedJob) -> None:
    epochs = _steps_with(every_epoch_job, "test/accuracy")
    assert len(epochs) == EPOCHS
    assert _steps_with(every_epoch_job, "test/predictions/_type") == epochs
    assert _steps_with(every_epoch_job, "test/confusion_matrix_table/_type") == epochs


@pytest.mark.integration
def test_samples_table_shows_test_images_with_predicted_and_true_labels(every_epoch_job: TrackedJob) -> None:
    (run_dir,) = every_epoch_job.run_dirs
    last = _logged_tables(every_epoch_job, "test/predictions")[-1]
    table = json.loads((run_dir / "files" / json.loads(last["test/predictions/path"])).read_text())
    assert table["columns"] == ["image", "predicted", "true"]
    assert len(table["data"]) == SAMPLE_IMAGES
    for image, predicted, true in table["data"]:
        assert image == "Image" and predicted in CLASSES and true in CLASSES


@pytest.mark.integration
def test_no_model_artifact_without_log_model(every_epoch_job: TrackedJob) -> None:
    assert not [a for a in every_epoch_job.artifacts() if a.type == "model"]


@pytest.mark.integration
def test_training_goes_on_when_wandb_cannot_start(data_dir: Path, tmp_path: Path) -> None:
    result = run_cli(
        train_args(data_dir, tmp_path / "out", "--cpu", "--epochs", "1", "--tracker", "wandb"),
        tmp_path,
        WANDB_MODE="not-a-mode",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "W&B could not start" in line]
    assert len(warnings) == 1 and warnings[0].startswith("fmnist-dist: warning: ")
    assert "WANDB_MODE='not-a-mode' is invalid" in warnings[0]
    assert "epoch 1/1:" in result.stdout
    assert (tmp_path / "out" / "model.pth").is_file()
    assert len(MetricsLog.read(tmp_path / "out" / "metrics.jsonl")) == 1


@pytest.mark.integration
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--wandb-project", "a/b"], "--wandb-project is invalid: Invalid project name 'a/b'"),
        (["--tags", "ok", "x" * 300], "--tags is invalid: run_tags: Value error, Tag 'xxx"),
    ],
    ids=["project", "tag"],
)
def test_a_wandb_flag_wandb_rejects_is_named_in_one_warning_and_training_goes_on(
    flags: list[str], expected: str, data_dir: Path, tmp_path: Path
) -> None:
    result = run_cli(
        train_args(data_dir, tmp_path / "out", "--cpu", "--epochs", "1", "--tracker", "wandb", *flags), tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("fmnist-dist: warning: ")]
    assert f"W&B could not start ({expected}" in warning and "WANDB_" not in warning
    assert (tmp_path / "out" / "model.pth").is_file()


def test_rejected_flag_names_the_flag_and_wandbs_reason() -> None:
    assert rejected_flag({"project": "fmnist-dist", "name": "a name/with a slash", "tags": ["ci"]}) is None
    assert rejected_flag({"project": "fmnist-dist", "tags": ["x" * 65]}) == (
        "--tags is invalid: run_tags: Value error, Tag 'xxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxxxx' is 65 "
        "characters. Tags must be between 1 and 64 characters"
    )


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("0", False),
        ("-1", False),
        ("abc", False),
        ("", False),
        ("nan", False),
        ("inf", False),
        ("0.5", True),
        ("2", True),
    ],
)
def test_only_a_positive_finite_init_timeout_is_kept(
    value: str, kept: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", value)
    ignore_unusable_init_timeout()
    assert ("WANDB_INIT_TIMEOUT" in os.environ) == kept
    assert (capsys.readouterr().err == "") == kept
