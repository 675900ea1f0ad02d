"""Each epoch's global order of the training images, and the batches of it that are still to be trained."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


def epoch_order(dataset_size: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of the training images in `epoch` (int64, shape [dataset_size]).

    The generator's seed is derived from (seed, epoch) together by NumPy's SeedSequence (a hash designed for
    exactly this), so no two (seed, epoch) pairs share a stream: `--seed 1` never replays `--seed 0`'s orders,
    as seeding with seed + epoch would. The order does not depend on the number of processes.
    """
    (derived,) = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)
    generator = torch.Generator().manual_seed(int(derived))
    return torch.randperm(dataset_size, generator=generator)


class GlobalOrderBatchSampler(Sampler[list[int]]):
    """Global micro-batches of one epoch's order, from a given position onwards.

    Accelerate's `split_batches` mode hands each process its slice of every batch this yields, so the images
    an optimizer step trains are the same on any number of processes. `batch_size` is the global micro-batch.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int) -> None:
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, samples_done: int) -> None:
        """Yield `epoch`'s order from image number `samples_done` on, at the next iteration."""
        self.epoch = epoch
        self.start = samples_done

    def __iter__(self) -> Iterator[list[int]]:
        remaining = epoch_order(self.dataset_size, self.seed, self.epoch)[self.start :].tolist()
        for first in range(0, len(remaining), self.batch_size):
            yield remaining[first : first + self.batch_size]

    def __len__(self) -> int:
        return math.ceil((self.dataset_size - self.start) / self.batch_size)
