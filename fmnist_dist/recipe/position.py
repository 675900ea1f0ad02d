"""Where training stands, counted in the global order of each epoch's images, never in per-process batches.

The position is the same whatever the number of processes, the per-process batch or the accumulation, so a
state saved by N processes resumes exactly on M: the next optimizer step trains the next untrained images of
the same epoch order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TrainingPosition:
    """The epoch under way, the images of its global order already trained, and the optimizer steps taken.

    Attributes:
        epoch: the epoch under way, from 0.
        samples_done: images of this epoch's global order trained so far (0 .. dataset size).
        global_step: optimizer steps since the run began (what --log-every, --checkpoint-every and W&B count).
    """

    epoch: int = 0
    samples_done: int = 0
    global_step: int = 0

    def step_samples(self, global_batch_size: int, dataset_size: int) -> int:
        """Images the next optimizer step trains: a global batch, or what is left of the epoch."""
        return min(global_batch_size, dataset_size - self.samples_done)

    def advance(self, samples: int) -> None:
        """Record one optimizer step over `samples` images."""
        self.samples_done += samples
        self.global_step += 1

    def epoch_finished(self, dataset_size: int) -> bool:
        return self.samples_done >= dataset_size

    def run_finished(self, epochs: int, dataset_size: int) -> bool:
        """Whether no optimizer step is left of a run of `epochs`: its last epoch trained, evaluated or not."""
        return self.epoch >= epochs or (self.epoch == epochs - 1 and self.epoch_finished(dataset_size))

    def next_epoch(self) -> None:
        self.epoch += 1
        self.samples_done = 0

    def epoch_fraction(self, dataset_size: int) -> float:
        """Epochs trained, as a real number (2.5 is half-way through the third epoch)."""
        return self.epoch + self.samples_done / dataset_size

    def schedule_step(self, global_batch_size: int, dataset_size: int) -> int:
        """Optimizer steps a run at `global_batch_size` would have taken to get here (for the LR schedule).

        Rounded down, so that the rest of the run never steps a schedule past its planned total.
        """
        return self.epoch * steps_per_epoch(global_batch_size, dataset_size) + self.samples_done // global_batch_size


def steps_per_epoch(global_batch_size: int, dataset_size: int) -> int:
    """Optimizer steps in one epoch; the last one trains the remainder."""
    return math.ceil(dataset_size / global_batch_size)


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's images are split: over processes, then over accumulation micro-batches.

    Attributes:
        per_process: images per process per micro-batch.
        processes: the world size.
        accumulation: micro-batches per optimizer step.
    """

    per_process: int
    processes: int
    accumulation: int

    @property
    def micro_batch(self) -> int:
        """Images of one micro-batch across all processes."""
        return self.per_process * self.processes

    @property
    def global_batch(self) -> int:
        """Images of one optimizer step across all processes and micro-batches."""
        return self.micro_batch * self.accumulation

    def micro_batch_sizes(self, step_samples: int) -> list[int]:
        """The real images of each micro-batch of a step over `step_samples` images (only the last is short)."""
        full, rest = divmod(step_samples, self.micro_batch)
        return [self.micro_batch] * full + ([rest] if rest else [])

    def process_share(self, micro_batch_samples: int, process_index: int) -> int:
        """Real images of one micro-batch that process `process_index` trains.

        Accelerate (with `split_batches`) gives process p the p-th slice of every global micro-batch and pads a
        short last one from the start of the epoch; the real images are the first ones, so they go to the
        lowest process indices.
        """
        return max(0, min(self.per_process, micro_batch_samples - process_index * self.per_process))
