"""Run the fmnist-dist CLI with one process made to fail mid-training, to test that its peers do not hang.

    accelerate launch --config_file launch/cpu.yaml tests/helpers/fail_on_rank.py train --cpu ...

FAIL_RANK (default 1) raises RuntimeError at its training step FAIL_AT_STEP (default 3) of a fresh run, when
that many optimizer steps are done. The fault is injected here, by wrapping the recipe's `TrainStep`, so the
package carries no test hooks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from fmnist_dist.cli import main
from fmnist_dist.recipe.data import Batch
from fmnist_dist.recipe.train_step import TrainStep

FAIL_RANK = int(os.environ.get("FAIL_RANK", "1"))
FAIL_AT_STEP = int(os.environ.get("FAIL_AT_STEP", "3"))
real_train_step = TrainStep.__call__
steps_done = 0  # the Trainer takes one TrainStep per optimizer step


def failing_train_step(self: TrainStep, batches: Iterator[Batch], step_samples: int) -> tuple[torch.Tensor, int]:
    global steps_done
    if self.accelerator.process_index == FAIL_RANK and steps_done == FAIL_AT_STEP:
        raise RuntimeError(f"injected failure on rank {FAIL_RANK} at step {FAIL_AT_STEP}")
    steps_done += 1
    return real_train_step(self, batches, step_samples)


TrainStep.__call__ = failing_train_step  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(main())
