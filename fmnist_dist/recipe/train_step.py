"""The quickstart's loss, optimizer and train step, made distributed with Accelerate.

The quickstart trains each batch with `loss_fn(model(X), y)`, `loss.backward()`, `optimizer.step()` and
`optimizer.zero_grad()`, cross-entropy loss and SGD. Here one optimizer step trains a global batch: its images
are split over the processes and over accumulation micro-batches (`position.BatchPlan`), and its gradient is
the mean over exactly those images, also for the short last step of an epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedType
from torch import nn

from fmnist_dist.recipe.data import Batch
from fmnist_dist.recipe.position import BatchPlan


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """The quickstart's optimizer, SGD, over the model's parameters (its rate is then set by the schedule)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def step_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The quickstart's cross-entropy loss, summed over the images (in float32, also under mixed precision)."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


class TrainStep:
    """One optimizer step over a global batch: forward, loss, backward through Accelerate, then the optimizer's
    step, the schedule's step and `zero_grad()`.

    Args:
        accelerator: the Accelerator that prepared the objects below.
        model, optimizer, scheduler: as `accelerator.prepare` returned them.
        plan: how a step's images are split over processes and micro-batches.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: AcceleratedScheduler,
        plan: BatchPlan,
    ) -> None:
        self.accelerator = accelerator
        self.model = model
        self.scheduler = scheduler
        self.plan = plan
        self.optimizer = _without_idle_wrapper(optimizer, accelerator)

    def __call__(self, batches: Iterator[Batch], step_samples: int) -> tuple[torch.Tensor, int]:
        """Train the next `step_samples` images of `batches`; return this process's summed loss and image count.

        Args:
            batches: the prepared training loader's batches, each process's slice of each global micro-batch.
            step_samples: the real images of this step over all processes (a global batch, or an epoch's rest).
        """
        acc, plan = self.accelerator, self.plan
        sizes = plan.micro_batch_sizes(step_samples)
        # DDP averages gradients over processes; scaling each summed loss by processes / the step's images makes
        # the gradient the mean over exactly this step's images, however they were split.
        scale = acc.num_processes / step_samples
        loss_sum, samples = None, 0
        for i, micro_samples in enumerate(sizes):
            images, targets = next(batches)
            real = plan.process_share(micro_samples, acc.process_index)
            if real < len(targets):  # drop Accelerate's padding of the epoch's last micro-batch
                images, targets = images[:real], targets[:real]
            syncing = i == len(sizes) - 1  # gradients are exchanged once per step, on its last micro-batch
            with contextlib.nullcontext() if syncing else acc.no_sync(self.model):
                loss = step_loss(self.model(images), targets)
                acc.backward(loss * scale)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            samples += real
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        assert loss_sum is not None  # a step trains at least one image
        return loss_sum, samples

    def current_lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return self.scheduler.get_last_lr()[0]


def _without_idle_wrapper(optimizer: torch.optim.Optimizer, accelerator: Accelerator) -> torch.optim.Optimizer:
    """The optimizer Accelerate wrapped, where its wrapper would add nothing but host work at every step.

    The wrapper looks for an optional package (lomo_optim) on the filesystem at every step and inspects
    zero_grad's signature; it adds something only with an fp16 gradient scaler or on XLA. DeepSpeed's and
    Megatron's wrappers subclass it and step differently, hence the exact type.
    """
    if not isinstance(optimizer, AcceleratedOptimizer) or type(optimizer) is not AcceleratedOptimizer:
        return optimizer
    adds_nothing = optimizer.scaler is None and accelerator.distributed_type != DistributedType.XLA
    return optimizer.optimizer if adds_nothing else optimizer
