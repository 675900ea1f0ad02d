"""The validation split (`--val-size`): training images held out by the seed, never trained on, scored every epoch.

Which images are held out depends only on (seed, training set size, N), never on the number of processes, so
every process of a job, and a run resumed on any number of them, holds out the same images.
"""

from __future__ import annotations

import numpy as np
import torch

from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.data import Split, subset

# The SeedSequence spawn key of the split's stream. The epochs' orders (`sampling.epoch_order`) hash (seed, epoch)
# without one, so the split never shares a stream with any epoch's order.
SPLIT_STREAM = 1


def validation_indices(dataset_size: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set's indices to train on and those held out, each ascending (int64).

    The held-out images are the first `val_size` of a permutation drawn from NumPy's SeedSequence of `seed`
    (spawn key SPLIT_STREAM), so a smaller split of the same seed is part of a larger one.

    Args:
        dataset_size: images in the training set.
        val_size: images to hold out (0 holds out none).
        seed: `--seed`.

    Returns:
        (train indices, validation indices): `dataset_size - val_size` and `val_size` indices, disjoint, together
        every index once.

    Raises:
        UsageError: `val_size` leaves no image to train on.
    """
    if val_size >= dataset_size:
        raise UsageError(
            f"--val-size {val_size} would hold out the whole training set ({dataset_size} images) and leave nothing "
            f"to train on; pass a --val-size below {dataset_size}"
        )
    (derived,) = np.random.SeedSequence(seed, spawn_key=(SPLIT_STREAM,)).generate_state(1, dtype=np.uint64)
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(int(derived)))
    return order[val_size:].sort().values, order[:val_size].sort().values


def hold_out(train_set: Split, val_size: int, seed: int) -> tuple[Split, Split | None]:
    """The training set less its validation split, and the split (None for `val_size` 0: the set unchanged).

    Both keep the training set's order, and live where it lives (the accelerator or the CPU).

    Raises:
        UsageError: `val_size` leaves no image to train on.
    """
    if val_size == 0:
        return train_set, None
    trained, held_out = validation_indices(len(train_set), val_size, seed)
    return subset(train_set, trained), subset(train_set, held_out)
