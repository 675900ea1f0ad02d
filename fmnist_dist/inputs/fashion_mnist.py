"""FashionMNIST from disk, checked first: missing or damaged files are named in one line before torchvision reads them;
and the fingerprint of a loaded split, which tells one training set from another of the same size."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision import datasets

from fmnist_dist.inputs.dataset_checks import check_dataset
from fmnist_dist.recipe.data import InMemoryFashionMNIST, Split, fashion_mnist

# 128 bits: two different training sets never share a fingerprint by chance, and it still reads in one line.
FINGERPRINT_BYTES = 16


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


def fingerprint(split: Split) -> str:
    """A digest of a loaded split's images and labels (BLAKE2b over their bytes, in order).

    It is the same wherever the split comes from (IDX files or torchvision's old cache, in memory or on a device,
    the fast path or torchvision's per-sample dataset) and differs as soon as one pixel or label, or their order,
    differs: a state saved on one training set is never continued on another of the same size.

    Raises:
        TypeError: `split` is not a FashionMNIST split that `load_split` returns.
    """
    if isinstance(split, InMemoryFashionMNIST):
        images, labels = split.images, split.targets
    elif isinstance(split, datasets.FashionMNIST):
        images, labels = split.data, split.targets
    else:
        raise TypeError(f"no FashionMNIST split: {type(split).__name__}")
    digest = hashlib.blake2b(digest_size=FINGERPRINT_BYTES)
    # Labels as uint8 (all are 0-9): torchvision's old cache may hold them as uint8, the IDX reader gives int64.
    for tensor in (images, labels.to(torch.uint8)):
        digest.update(tensor.cpu().contiguous().numpy().data)
    return digest.hexdigest()
