"""FashionMNIST datasets and DataLoaders.

The default path keeps each split in memory as uint8 tensors (torchvision's `FashionMNIST.data`/`.targets`)
and builds whole batches from index lists through `Dataset.__getitems__`, converting to float once per batch.
It gives exactly the tensors `ToTensor()` gives per sample, without a Python call per image
(benchmarks/README.md has the measurement). A user's own `transform`/`target_transform` falls back to
torchvision's per-sample dataset.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets
from torchvision.transforms import ToTensor

Batch = tuple[torch.Tensor, torch.Tensor]


class InMemoryFashionMNIST(Dataset):
    """A FashionMNIST split held as uint8 images and int64 labels, served a batch at a time."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, target = self.__getitems__([index])
        return image[0], int(target[0])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        # The index list is built on the CPU; a non-blocking copy does not wait for the device's queued work
        # (as_tensor(list, device=cuda) would synchronise the stream at every batch).
        index = torch.as_tensor(indices).to(self.images.device, non_blocking=True)
        # ToTensor's arithmetic for a whole batch: a channel dimension, then uint8 / 255 as a true division in
        # the default float dtype (bit-identical to `.float().div(255)`, in one pass). index_select gathers
        # whole rows, where `images[index]` takes advanced indexing's general path.
        images = self.images.index_select(0, index).unsqueeze(1).div(255)
        return images, self.targets.index_select(0, index)

    def to(self, device: torch.device) -> InMemoryFashionMNIST:
        """The same split with its tensors on `device`, so batches need no host-to-device copy."""
        return InMemoryFashionMNIST(self.images.to(device), self.targets.to(device))


# A FashionMNIST split: the fast in-memory one, or torchvision's applying the user's own transforms.
Split: TypeAlias = InMemoryFashionMNIST | datasets.FashionMNIST


def subset(split: Split, indices: torch.Tensor) -> Split:
    """The images of `split` at `indices` (int64, in that order) as a split of its own kind, on its device.

    A copy, not a view (`torch.utils.data.Subset`): the fast path keeps building whole batches from its tensors,
    and torchvision's dataset keeps its transforms.
    """
    if isinstance(split, InMemoryFashionMNIST):
        index = indices.to(split.images.device)
        return InMemoryFashionMNIST(split.images.index_select(0, index), split.targets.index_select(0, index))
    part = copy.copy(split)
    part.data, part.targets = split.data[indices], split.targets[indices]
    return part


def keep_batch(batch: Batch) -> Batch:
    """collate_fn for `__getitems__` datasets: the batch is already stacked."""
    return batch


def fashion_mnist(
    data_dir: Path,
    train: bool,
    transform: Callable | None = None,
    target_transform: Callable | None = None,
) -> Split:
    """One FashionMNIST split as the quickstart reads it (`datasets.FashionMNIST`, `ToTensor()`), held in memory.

    Args:
        data_dir: the torchvision root (`<data_dir>/FashionMNIST/raw` holds the IDX files, already there).
        train: the training split, else the test split.
        transform: a per-sample image transform; None keeps the fast path (equivalent to `ToTensor()`).
        target_transform: a per-sample label transform; None keeps the fast path.

    Returns:
        The fast in-memory dataset, or torchvision's own when a transform is given.
    """
    dataset = datasets.FashionMNIST(
        root=str(data_dir),
        train=train,
        download=False,
        transform=transform or ToTensor(),
        target_transform=target_transform,
    )
    if transform is None and target_transform is None:
        return InMemoryFashionMNIST(dataset.data, dataset.targets)
    return dataset


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader for `dataset`; stacked batches come straight from `__getitems__` when it has one."""
    return _loader(dataset, num_workers, pin_memory, batch_size=batch_size, shuffle=shuffle)


def ordered_loader(
    dataset: Dataset, batch_sampler: Sampler[list[int]], num_workers: int, pin_memory: bool
) -> DataLoader:
    """A DataLoader over `dataset` in the batches of indices that `batch_sampler` yields."""
    return _loader(dataset, num_workers, pin_memory, batch_sampler=batch_sampler)


def _loader(dataset: Dataset, num_workers: int, pin_memory: bool, **batching: Any) -> DataLoader:
    collate_fn: Callable[[Any], Any] | None = keep_batch if hasattr(dataset, "__getitems__") else None
    return DataLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
        **batching,
    )


def place_on_device(dataset: Split, accelerator: Accelerator, data_on_device: str) -> Split:
    """Move an in-memory split onto the accelerator when asked ("on"), or by default ("auto") off the CPU."""
    wanted = data_on_device == "on" or (data_on_device == "auto" and accelerator.device.type != "cpu")
    if wanted and isinstance(dataset, InMemoryFashionMNIST):
        return dataset.to(accelerator.device)
    return dataset


def is_on_device(dataset: Dataset) -> bool:
    """Whether the split's tensors already live off the CPU (then workers and pinned memory would only hurt)."""
    return isinstance(dataset, InMemoryFashionMNIST) and dataset.images.device.type != "cpu"


def first_images(dataset: Split, count: int) -> torch.Tensor:
    """The first `count` images of a split, as one CPU batch (for showing predictions)."""
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))]).cpu()
