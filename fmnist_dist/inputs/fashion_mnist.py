"""FashionMNIST from disk, checked first: missing or damaged files are named in one line before torchvision reads them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fmnist_dist.inputs.dataset_checks import check_dataset
from fmnist_dist.recipe.data import Split, fashion_mnist


def load_split(
    data_dir: Path,
    train: bool,
    download: bool,
    transform: Callable | None = None,
    target_transform: Callable | None = None,
) -> Split:
    """One FashionMNIST split (`recipe.data.fashion_mnist`) after `check_dataset` (downloading when allowed).

    Raises:
        UsageError: the files are missing (and `download` is False, or the download failed) or damaged.
    """
    check_dataset(data_dir, download)
    return fashion_mnist(data_dir, train, transform, target_transform)
