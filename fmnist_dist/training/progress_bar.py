"""Console output that only the main process produces."""

from __future__ import annotations

from accelerate import Accelerator
from tqdm.auto import tqdm


class _NoBar:
    """Stands in for a bar where none is shown (other processes, --no-progress, no terminal)."""

    def update(self, images: int) -> None:
        pass

    def set_postfix(self, **values: float) -> None:
        pass

    def close(self) -> None:
        pass


class _ImageBar:
    def __init__(self, bar: tqdm) -> None:
        self._bar = bar

    def update(self, images: int) -> None:
        self._bar.update(images)

    def set_postfix(self, **values: float) -> None:
        self._bar.set_postfix({key: f"{value:.4f}" for key, value in values.items()}, refresh=False)

    def close(self) -> None:
        self._bar.close()


def progress_bar(accelerator: Accelerator, enabled: bool, desc: str, total_images: int) -> _ImageBar | _NoBar:
    """A bar counting trained images (and images/s) on the main process of an interactive terminal.

    Args:
        enabled: False for `--no-progress`.
        total_images: the real images still to train this epoch (Accelerate's padding is not counted).
    """
    if not (enabled and accelerator.is_main_process):
        return _NoBar()
    # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs, files, pipes).
    bar = tqdm(desc=desc, total=total_images, disable=None, unit="img", unit_scale=True, leave=False)
    return _NoBar() if bar.disable else _ImageBar(bar)
