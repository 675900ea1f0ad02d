"""metrics.jsonl: one epoch record per line, written by the training run and read back by `plot` and resume."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.recipe.model import CLASSES
from fmnist_dist.storage import strict_json
from fmnist_dist.storage.atomic_files import atomic_write, file_problem

PLOTTED_VALUES = ("train_loss", "test_loss", "test_accuracy")  # besides the epoch and the confusion matrix


class MetricsLog:
    """`metrics.jsonl`: one strict JSON object per epoch (non-finite values as null), rewritten atomically."""

    def __init__(self, path: Path, records: Sequence[dict[str, Any]] = ()) -> None:
        self.path = Path(path)
        self.records = list(records)

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        lines = "".join(strict_json.dumps(r) + "\n" for r in self.records)
        atomic_write(self.path, lambda f: f.write(lines.encode()))

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The records of an existing metrics file."""
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def records_for_plot(metrics_path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl, refusing a missing or empty file and any line that is not a record.

    Raises:
        UsageError: naming the file, or the line of it, that cannot be plotted.
    """
    if problem := file_problem(metrics_path):
        raise UsageError(f"{metrics_path} {problem}; pass the --output-dir of a finished training run")
    try:
        lines = metrics_path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read {metrics_path} ({first_line(error)}); pass a run's --output-dir") from error
    records = [_metrics_record(line, number, metrics_path) for number, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise UsageError(f"{metrics_path} holds no epochs yet; plot after the first epoch has finished")
    return records


def _metrics_record(line: str, number: int, path: Path) -> dict[str, Any]:
    """Line `number` of `path` as a metrics record, or a UsageError naming the line and what is wrong with it."""
    try:
        record = json.loads(line)
    except ValueError as error:
        problem = f"not JSON: {first_line(error)}"
    else:
        problem = metrics_record_problem(record)
    if problem:
        raise UsageError(
            f"line {number} of {path} is not an fmnist-dist metrics record ({problem}); "
            "pass the metrics.jsonl or --output-dir of a training run"
        )
    return record


def metrics_record_problem(record: Any) -> str | None:
    """What keeps a parsed metrics record (a line of metrics.jsonl) from being plotted, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if missing := [key for key in ("epoch", *PLOTTED_VALUES, "confusion_matrix") if key not in record]:
        return f"no {', '.join(missing)}"
    if not is_number(record["epoch"]):
        return f"epoch is {record['epoch']!r}, not a number"
    # null is what the training writes for a non-finite loss or accuracy (strict JSON); matplotlib leaves a gap.
    if wrong := [key for key in PLOTTED_VALUES if record[key] is not None and not is_number(record[key])]:
        return f"{wrong[0]} is {record[wrong[0]]!r}, not a number"
    if not _is_confusion_matrix(record["confusion_matrix"]):
        return f"confusion_matrix is not {len(CLASSES)} rows of {len(CLASSES)} counts"
    return None


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (which JSON keeps apart, and Python does not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_confusion_matrix(matrix: Any) -> bool:
    return (
        isinstance(matrix, list)
        and len(matrix) == len(CLASSES)
        and all(isinstance(row, list) and len(row) == len(CLASSES) and all(map(_is_count, row)) for row in matrix)
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
