"""The trackers `--tracker` chooses from, by name. A new tracker is one module with a `Tracker` subclass and one
line here (and its name among the settings' choices, which tests/test_tracker_registry.py compares with these)."""

from __future__ import annotations

from accelerate import Accelerator

from fmnist_dist.errors import UsageError
from fmnist_dist.tracking.base import Tracker
from fmnist_dist.tracking.null_tracker import NullTracker
from fmnist_dist.tracking.wandb_tracker import WandbTracker

TRACKERS: dict[str, type[Tracker]] = {
    "wandb": WandbTracker,
    "none": NullTracker,
}


def tracker_type(name: str) -> type[Tracker]:
    """The tracker class `--tracker name` selects.

    Raises:
        UsageError: no tracker has that name.
    """
    try:
        return TRACKERS[name]
    except KeyError:
        raise UsageError(f"--tracker {name!r} is not one of {', '.join(TRACKERS)}") from None


def make_tracker(name: str, accelerator: Accelerator) -> Tracker:
    """The job's tracker `name`, for `accelerator` (built with `log_with=tracker_type(name).log_with`)."""
    return tracker_type(name)(accelerator)
