"""Console output that only the main process produces."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from accelerate import Accelerator
from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(
    iterable: Iterable[T], accelerator: Accelerator, enabled: bool, desc: str, total: int, images_per_batch: int
) -> Iterable[T]:
    """A tqdm bar over `iterable` on the main process of an interactive terminal; the bare iterable elsewhere.

    Args:
        enabled: False for `--no-progress`.
        images_per_batch: images one step trains across all processes, so the bar counts images and shows images/s.
    """
    if not (enabled and accelerator.is_main_process):
        return iterable
    # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs, files, pipes).
    return tqdm(
        iterable, desc=desc, total=total, disable=None, unit="img", unit_scale=images_per_batch, leave=False
    )


def set_postfix(bar: Iterable, **values: float) -> None:
    """Show values (the latest loss, say) on a bar; a no-op when no bar is shown."""
    if isinstance(bar, tqdm) and not bar.disable:
        bar.set_postfix({key: f"{value:.4f}" for key, value in values.items()}, refresh=False)
