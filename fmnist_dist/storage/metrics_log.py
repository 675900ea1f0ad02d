"""metrics.jsonl: one epoch record per line, written by the training run and read back by `plot` and resume.

`EpochRecord` is the one definition of a record: the Trainer builds it, `MetricsLog` writes it, `plot` and a
resumed run's `progress.json` are checked by the same `metrics_record_problem`, and `EpochRecord.tracker_values`
names its values for the tracker.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.recipe.model import CLASSES
from fmnist_dist.storage import strict_json
from fmnist_dist.storage.atomic_files import atomic_write, file_problem

TRACKER_KEY = "tracker_key"  # a field's metadata: the name trackers show its value under
ConfusionMatrix = list[list[int]]  # true classes down, predicted classes across


def _tracked(key: str) -> dict[str, str]:
    return {TRACKER_KEY: key}


@dataclass(frozen=True, kw_only=True)
class EpochRecord:
    """One finished epoch: a line of metrics.jsonl, an entry of a state's progress, a step of the tracker.

    The fields are the JSON object's keys, in its order. Those without a default are in every record that any
    version wrote (what `plot` draws); the others are None in the records of older versions, which did not write
    them, and then stay out of the JSON. A number that is not finite (a diverged loss) is null in the JSON (strict
    JSON) and None when read back; so are the test set's values in an epoch that did not score it (`--val-size`
    without `--test-every-epoch`), whose record then lacks `test_samples`. A new metric is one field: None by
    default (older records lack it), with `_tracked(key)` as its metadata if trackers show it, and a line under
    Attributes (the docs' field table is generated from them).

    Attributes:
        epoch: the epoch, from 1.
        global_step: optimizer steps trained by the end of the epoch, over the whole run.
        lr: the learning rate after the epoch's last optimizer step.
        train_loss: the epoch's mean training loss, over every image of it and all processes.
        test_loss: the mean loss on the test set; null in an epoch that did not score it (with `--val-size`, every
            epoch but the run's last, unless `--test-every-epoch`).
        test_accuracy: the fraction of test images classified right, 0 to 1; null where `test_loss` is.
        val_loss: the mean loss on the validation split (`--val-size`); not in the records of runs without one.
        val_accuracy: the fraction of validation images classified right, 0 to 1.
        val_samples: validation images evaluated (each exactly once, whatever the number of processes).
        test_samples: test images evaluated (each exactly once, whatever the number of processes); not in an epoch
            that did not score the test set.
        train_samples: training images of the epoch.
        train_seconds: wall time of the epoch's training (for a resumed epoch, of the part trained since the resume).
        eval_seconds: wall time of the evaluation.
        train_samples_per_second: images trained per second by the whole job in this invocation.
        seconds_per_step: wall seconds per optimizer step, over the epoch's steps trained in this invocation
            (`train_seconds` / those steps).
        data_wait_fraction: the part of `train_seconds` a process spent waiting for the training loader's next
            batch (in its `next()`, timed on the host without waiting for the device), 0 to 1: the largest over the
            processes. On an accelerator, fetching that overlaps the device's work counts too: an upper bound.
        flops_per_image: model FLOPs of training one image (forward and backward), counted by
            `torch.utils.flop_counter` at start-up: 2 per multiply-accumulate of the matrix products, nothing else
            (3,209,216 for the quickstart's MLP; [Profiling](../how-to/profiling.md) has the convention).
        tflops_per_second: the whole job's achieved model TFLOP/s: `flops_per_image` x `train_samples_per_second`
            / 1e12.
        mfu: model FLOPs utilisation, 0 to 1: the achieved FLOP/s over the dense peak of all processes' devices at
            the precision in effect; absent where that peak is not known (the CPU, a GPU not in the table of
            [Profiling](../how-to/profiling.md#peak-flops)).
        peak_memory_mib: the most memory any process had used by the epoch's end since it started, in MiB
            (1,048,576 bytes): the accelerator allocator's peak of memory allocated to tensors
            (`torch.cuda.max_memory_allocated`), or on the CPU the process's peak resident set size; absent on MPS,
            which keeps no peak.
        world_size: processes of the job.
        global_batch_size: images per optimizer step, over all processes and accumulation steps.
        mixed_precision: the precision in effect: "no", "fp16", "bf16" or "fp8".
        cpu_threads: torch CPU threads per process.
        confusion_matrix: test images counted by true class (row) and predicted class (column), both in the order
            of `recipe.model.CLASSES`; null in an epoch that did not score the test set.
    """

    epoch: int = field(metadata=_tracked("epoch"))
    global_step: int | None = None
    lr: float | None = field(default=None, metadata=_tracked("train/lr"))
    train_loss: float | None = field(metadata=_tracked("train/epoch_loss"))
    test_loss: float | None = field(metadata=_tracked("test/loss"))
    test_accuracy: float | None = field(metadata=_tracked("test/accuracy"))
    val_loss: float | None = field(default=None, metadata=_tracked("val/loss"))
    val_accuracy: float | None = field(default=None, metadata=_tracked("val/accuracy"))
    val_samples: int | None = None
    test_samples: int | None = None
    train_samples: int | None = None
    train_seconds: float | None = field(default=None, metadata=_tracked("perf/train_seconds"))
    eval_seconds: float | None = field(default=None, metadata=_tracked("perf/eval_seconds"))
    train_samples_per_second: float | None = field(default=None, metadata=_tracked("perf/train_samples_per_second"))
    seconds_per_step: float | None = field(default=None, metadata=_tracked("perf/epoch_seconds_per_step"))
    data_wait_fraction: float | None = field(default=None, metadata=_tracked("perf/epoch_data_wait_fraction"))
    flops_per_image: int | None = field(default=None, metadata=_tracked("perf/flops_per_image"))
    tflops_per_second: float | None = field(default=None, metadata=_tracked("perf/epoch_tflops_per_second"))
    mfu: float | None = field(default=None, metadata=_tracked("perf/epoch_mfu"))
    peak_memory_mib: float | None = field(default=None, metadata=_tracked("perf/epoch_peak_memory_mib"))
    world_size: int | None = None
    global_batch_size: int | None = None
    mixed_precision: str | None = None
    cpu_threads: int | None = None
    confusion_matrix: ConfusionMatrix | None

    @classmethod
    def from_json(cls, record: Any) -> EpochRecord:
        """The record a parsed metrics.jsonl line (or progress.json entry) holds; keys it does not know are left out.

        Raises:
            ValueError: what keeps `record` from being an epoch record (`metrics_record_problem`).
        """
        if problem := metrics_record_problem(record):
            raise ValueError(problem)
        return cls(**{f.name: record[f.name] for f in fields(cls) if f.name in record})

    def as_json(self) -> dict[str, Any]:
        """The record as metrics.jsonl holds it, less the fields an older record lacks (non-finite floats stay
        floats: `strict_json` writes them as null)."""
        return {f.name: value for f in fields(self) if (value := getattr(self, f.name)) is not None or _required(f)}

    def tracker_values(self) -> dict[str, float]:
        """The values trackers show, under their names there ("train/epoch_loss", "test/accuracy", ...)."""
        return {
            f.metadata[TRACKER_KEY]: value
            for f in fields(self)
            if TRACKER_KEY in f.metadata and (value := getattr(self, f.name)) is not None
        }


def _required(f: Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


class MetricsLog:
    """`metrics.jsonl`: one strict JSON object per epoch (non-finite values as null), rewritten atomically."""

    def __init__(self, path: Path, records: Sequence[EpochRecord] = ()) -> None:
        self.path = Path(path)
        self.records = list(records)

    def append(self, record: EpochRecord) -> None:
        self.records.append(record)
        lines = "".join(strict_json.dumps(r.as_json()) + "\n" for r in self.records).encode()

        def write(file: IO[bytes]) -> None:
            file.write(lines)

        atomic_write(self.path, write)

    @staticmethod
    def read(path: Path) -> list[EpochRecord]:
        """The records of a metrics file (blank lines skipped).

        Raises:
            OSError, UnicodeDecodeError: the file cannot be read.
            UsageError: naming the line that is not a record, and what is wrong with it.
        """
        path = Path(path)
        lines = path.read_text().splitlines()
        return [_metrics_record(line, number, path) for number, line in enumerate(lines, 1) if line.strip()]


def records_for_plot(metrics_path: Path) -> list[EpochRecord]:
    """The records of a run's metrics.jsonl, refusing a missing or empty file and any line that is not a record.

    Raises:
        UsageError: naming the file, or the line of it, that cannot be plotted.
    """
    if problem := file_problem(metrics_path):
        raise UsageError(f"{metrics_path} {problem}; pass the --output-dir of a finished training run")
    try:
        records = MetricsLog.read(metrics_path)
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {metrics_path} ({first_line(error)}); pass a run's --output-dir") from error
    if not records:
        raise UsageError(f"{metrics_path} holds no epochs yet; plot after the first epoch has finished")
    return records


def _metrics_record(line: str, number: int, path: Path) -> EpochRecord:
    """Line `number` of `path` as a metrics record, or a UsageError naming the line and what is wrong with it."""
    try:
        return EpochRecord.from_json(json.loads(line))
    except json.JSONDecodeError as error:
        problem = f"not JSON: {first_line(error)}"
    except ValueError as error:
        problem = str(error)
    raise UsageError(
        f"line {number} of {path} is not an fmnist-dist metrics record ({problem}); "
        "pass the metrics.jsonl or --output-dir of a training run"
    )


def metrics_record_problem(record: Any) -> str | None:
    """What keeps a parsed metrics record (a line of metrics.jsonl) from being an `EpochRecord`, or None.

    Every field `EpochRecord` requires must be there; every field there must have its type (null standing for a
    non-finite number, or for a field older versions did not write). Keys it does not know are allowed.
    """
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if missing := [check.name for check in _FIELD_CHECKS if check.required and check.name not in record]:
        return f"no {', '.join(missing)}"
    for check in _FIELD_CHECKS:
        if check.name in record and (problem := check.problem(record[check.name])):
            return problem
    return None


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (which JSON keeps apart, and Python does not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_confusion_matrix(matrix: Any) -> bool:
    return (
        isinstance(matrix, list)
        and len(matrix) == len(CLASSES)
        and all(isinstance(row, list) and len(row) == len(CLASSES) and all(map(_is_count, row)) for row in matrix)
    )


def _is_count(value: Any) -> bool:
    return _is_whole(value) and value >= 0


# The check of a JSON value for each type an EpochRecord field has, and how a refusal names that type.
_TYPE_CHECKS: dict[object, tuple[Callable[[Any], bool], str]] = {
    int: (_is_whole, "a whole number"),
    float: (is_number, "a number"),
    str: (_is_text, "a string"),
    ConfusionMatrix: (_is_confusion_matrix, f"{len(CLASSES)} rows of {len(CLASSES)} counts"),
}


@dataclass(frozen=True)
class _FieldCheck:
    """How one EpochRecord field is checked in its JSON form."""

    name: str
    required: bool
    nullable: bool
    accepts: Callable[[Any], bool]
    expected: str

    @classmethod
    def of(cls, f: Field, hint: Any) -> _FieldCheck:
        nullable = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
        kind = next(arg for arg in typing.get_args(hint) if arg is not type(None)) if nullable else hint
        accepts, expected = _TYPE_CHECKS[kind]
        return cls(f.name, _required(f), nullable, accepts, expected)

    def problem(self, value: Any) -> str | None:
        if (value is None and self.nullable) or self.accepts(value):
            return None
        if isinstance(value, (list, dict)):  # a matrix says nothing in one line
            return f"{self.name} is not {self.expected}"
        return f"{self.name} is {value!r}, not {self.expected}"


_FIELD_CHECKS = tuple(_FieldCheck.of(f, typing.get_type_hints(EpochRecord)[f.name]) for f in fields(EpochRecord))
