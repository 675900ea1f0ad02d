"""The tracker interface, in-process: `--tracker` offers exactly the registered trackers, each implements the
whole interface, the null tracker records nothing, and only the W&B tracker's module imports wandb."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import fmnist_dist
from fmnist_dist.cli import build_parser
from fmnist_dist.errors import UsageError
from fmnist_dist.tracking.base import RunSpec, Tracker
from fmnist_dist.tracking.registry import TRACKERS, make_tracker, tracker_type
from fmnist_dist.tracking.wandb_tracker import WandbTracker

PACKAGE = Path(fmnist_dist.__file__).parent
RUN = RunSpec(project="fmnist-dist", config={"epochs": 1}, name="a run", tags=("ci",))


def train_flag_choices(flag: str) -> list[str]:
    """The choices `fmnist-dist train` offers for `flag` (argparse keeps its actions in `_actions`)."""
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    (action,) = [a for a in commands.choices["train"]._actions if flag in a.option_strings]
    return list(action.choices)


def imports_of(path: Path) -> set[str]:
    """The top-level packages `path` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    return {name.split(".")[0] for name in names}


def test_the_tracker_flag_offers_exactly_the_registered_trackers() -> None:
    assert sorted(train_flag_choices("--tracker")) == sorted(TRACKERS)


@pytest.mark.parametrize("name", sorted(TRACKERS))
def test_every_registered_tracker_implements_the_whole_interface(name: str) -> None:
    tracker = make_tracker(name, Accelerator(cpu=True))  # a class missing a method cannot be instantiated
    assert isinstance(tracker, Tracker)


def test_an_unknown_tracker_is_named_in_one_line() -> None:
    with pytest.raises(UsageError, match=r"^--tracker 'mlflow' is not one of wandb, none$"):
        tracker_type("mlflow")


def test_the_null_tracker_starts_no_run_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    exercise(make_tracker("none", Accelerator(cpu=True)), tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / "model.pth"]
    assert capsys.readouterr() == ("", "")


def test_a_wandb_tracker_without_wandb_in_the_accelerator_does_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Accelerate's `log_with` decides, as before the interface: no W&B run is started, nothing fails."""
    exercise(WandbTracker(Accelerator(cpu=True)), tmp_path)
    assert list(tmp_path.iterdir()) == [tmp_path / "model.pth"]
    assert capsys.readouterr() == ("", "")


def exercise(tracker: Tracker, tmp_path: Path) -> None:
    """Every call a job makes, in a job's order; `start` must return no run id."""
    (tmp_path / "model.pth").write_bytes(b"weights")
    assert tracker.start(RUN) is None
    tracker.log_values({"train/loss": 0.5}, step=1)
    images, classes = torch.zeros(2, 1, 28, 28), torch.tensor([0, 1, 2])
    tracker.log_predictions(images, classes, classes.flip(0), step=1)
    tracker.log_artifact(tmp_path / "model.pth", "model")
    tracker.mark_preempted()
    tracker.finish()


def test_only_the_wandb_tracker_imports_wandb() -> None:
    importers = sorted(path.relative_to(PACKAGE) for path in PACKAGE.rglob("*.py") if "wandb" in imports_of(path))
    assert importers == [Path("tracking", "wandb_tracker.py")]
