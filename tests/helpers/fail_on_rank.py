"""Run the fmnist-dist CLI with one process made to fail mid-training, to test that its peers do not hang.

    accelerate launch --config_file launch/cpu.yaml tests/helpers/fail_on_rank.py train --cpu ...

FAIL_RANK (default 1) raises RuntimeError at its training step FAIL_AT_STEP (default 3). The fault is injected
here, by wrapping `Trainer._optimizer_step`, so the package carries no test hooks.
"""

from __future__ import annotations

import os

from fmnist_dist.cli import main
from fmnist_dist.training.trainer import Trainer

FAIL_RANK = int(os.environ.get("FAIL_RANK", "1"))
FAIL_AT_STEP = int(os.environ.get("FAIL_AT_STEP", "3"))
real_optimizer_step = Trainer._optimizer_step


def failing_optimizer_step(self: Trainer, batches, step_samples: int):
    if self.accelerator.process_index == FAIL_RANK and self.position.global_step == FAIL_AT_STEP:
        raise RuntimeError(f"injected failure on rank {FAIL_RANK} at step {FAIL_AT_STEP}")
    return real_optimizer_step(self, batches, step_samples)


Trainer._optimizer_step = failing_optimizer_step

if __name__ == "__main__":
    raise SystemExit(main())
