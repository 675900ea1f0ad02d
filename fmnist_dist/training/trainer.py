"""The training loop: one Trainer that runs epochs, evaluates, records metrics and saves resumable state.

Each optimizer step trains the next global batch of the epoch's order (`position.BatchPlan` splits it over
processes and accumulation micro-batches); its gradient is the mean over exactly those images, also for the
short last step of an epoch. Every few steps the processes agree on whether to stop (a signal) or whether
training diverged, so a stop happens at the same step everywhere and nothing non-finite is ever saved.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader

from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.evaluation import EvalResult, evaluate
from fmnist_dist.recipe.position import BatchPlan
from fmnist_dist.recipe.sampling import GlobalOrderBatchSampler
from fmnist_dist.runtime.devices import precision_in_effect
from fmnist_dist.runtime.stop_signals import StopRequest, TrainingStopped
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.metrics_log import EpochRecord, MetricsLog
from fmnist_dist.storage.training_state import Progress, save_training_state
from fmnist_dist.tracking.base import Tracker
from fmnist_dist.training.progress_bar import progress_bar

# Optimizer steps between the processes' agreement on stopping (one tiny gather): a signal is acted on
# within this many steps, and a fast run pays for one collective per this many steps, not per step.
STOP_CHECK_EVERY = 20


@dataclass(frozen=True)
class EpochStats:
    """One epoch's training pass, totalled over all processes."""

    loss: float
    samples: int
    seconds: float
    trained_now: int  # images this process group trained in `seconds` (fewer than `samples` in a resumed epoch)


class EpochTotals:
    """The epoch's summed training loss and image count: this process's since the last fold, and the job's.

    Folding (a sum over processes) happens only where a state is saved, so an uninterrupted run and one
    resumed from any of its states add up the same numbers in the same order.
    """

    def __init__(self, device: torch.device, job_loss: float = 0.0, job_samples: float = 0) -> None:
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.samples = 0
        self.job_loss, self.job_samples = job_loss, job_samples

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss += loss
        self.samples += samples

    def fold(self, accelerator: Accelerator) -> tuple[float, float]:
        """Add every process's totals to the job's (all processes call this); return the job's."""
        local = torch.stack([self.loss, torch.tensor(float(self.samples), device=self.loss.device).double()])
        loss, samples = accelerator.reduce(local, "sum").tolist()
        self.job_loss, self.job_samples = self.job_loss + loss, self.job_samples + samples
        self.loss.zero_()
        self.samples = 0
        return self.job_loss, self.job_samples


@dataclass(frozen=True)
class TrainingData:
    """The prepared training loader, the sampler that orders it, and its plan and size."""

    loader: DataLoader
    sampler: GlobalOrderBatchSampler
    plan: BatchPlan
    size: int


class Trainer:
    """Trains the prepared model for `cfg.epochs` epochs from `progress`, evaluating after each epoch.

    Args:
        cfg: the job's settings.
        accelerator: the Accelerator that prepared the objects below.
        model, optimizer, scheduler, test_loader: returned by `accelerator.prepare`.
        train: the prepared training loader with its sampler, batch plan and dataset size.
        progress: where to start (fresh, or restored by `--resume`); updated as training goes.
        metrics_log: the metrics file, written by the main process.
        sample_images: a few test images (the first ones) to show with their predictions on the tracker.
        stop: the stop signals' record.
        tracker: where the run's values and predictions are recorded (started by the job).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: AcceleratedScheduler,
        train: TrainingData,
        test_loader: DataLoader,
        progress: Progress,
        metrics_log: MetricsLog,
        sample_images: torch.Tensor,
        stop: StopRequest,
        tracker: Tracker,
    ) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train = train
        self.test_loader = test_loader
        self.progress = progress
        self.position = progress.position
        self.metrics_log = metrics_log
        self.sample_images = sample_images
        self.stop = stop
        self.tracker = tracker
        # DeepSpeed's and Megatron's wrappers subclass AcceleratedOptimizer and step differently: exact type only.
        self._optimizer_wrapper_is_plain = (
            type(optimizer) is AcceleratedOptimizer
            and optimizer.scaler is None
            and accelerator.distributed_type != DistributedType.XLA
        )
        self._last_agreed_step = self.position.global_step
        self._stop_signal: str | None = None
        self.last_eval: EvalResult | None = None

    def fit(self) -> None:
        """Run the remaining epochs.

        Raises:
            TrainingStopped: a stop signal arrived; a state was saved at the step where every process stopped.
            UsageError: the loss or the weights became non-finite (nothing of that is saved).
        """
        if self._agree_on_stop(torch.zeros(())):  # a stop asked for during start-up: no step is trained
            self._save_state()
            self._stopped()
        while self.position.epoch < self.cfg.epochs:
            stats = self._train_epoch()
            eval_start = time.perf_counter()
            self.last_eval = evaluate(self.model, self.test_loader, self.accelerator)
            stop = self._agree_on_stop(torch.tensor(stats.loss + self.last_eval.loss))
            self._finish_epoch(stats, self.last_eval, time.perf_counter() - eval_start)
            if stop and not self._run_finished():
                self._stopped()
            if stop:  # after the last epoch only the model and the plots are left: a second or so
                self.accelerator.print(
                    f"fmnist-dist: {self._stop_signal} arrived after the last optimizer step; finishing the run"
                )

    def _train_epoch(self) -> EpochStats:
        position, size = self.position, self.train.size
        first_sample = position.samples_done
        self.model.train()
        self.train.sampler.set_position(position.epoch, first_sample)
        batches = iter(self.train.loader)
        totals = EpochTotals(self.accelerator.device, self.progress.epoch_loss_sum, self.progress.epoch_samples)
        start = time.perf_counter()
        bar = progress_bar(
            self.accelerator, self.cfg.progress, f"epoch {position.epoch + 1}/{self.cfg.epochs}", size - first_sample
        )
        try:
            while not position.epoch_finished(size):
                step_samples = position.step_samples(self.train.plan.global_batch, size)
                step_loss, step_count = self._optimizer_step(batches, step_samples)
                totals.add(step_loss, step_count)
                position.advance(step_samples)
                bar.update(step_samples)
                self._after_step(bar, step_loss, step_samples, totals)
        finally:
            bar.close()
        total_loss, total_samples = totals.fold(self.accelerator)
        return EpochStats(
            total_loss / total_samples, round(total_samples), time.perf_counter() - start, size - first_sample
        )

    def _optimizer_step(self, batches, step_samples: int) -> tuple[torch.Tensor, int]:
        """One optimizer step over the next `step_samples` images; returns this process's loss sum and images."""
        acc, plan = self.accelerator, self.train.plan
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
                loss = F.cross_entropy(self.model(images).float(), targets, reduction="sum")
                acc.backward(loss * scale)
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            samples += real
        self._step_optimizer()
        return loss_sum, samples

    def _step_optimizer(self) -> None:
        """`optimizer.step()`, the schedule's step and `zero_grad()`, as Accelerate runs them.

        Accelerate's optimizer wrapper searches the filesystem for an optional package (lomo_optim) twice per
        step and inspects zero_grad's signature: about 0.1 ms a step, several percent of an MLP step on a CPU.
        Where the wrapper adds nothing else (no fp16 gradient scaler, no XLA) this calls the wrapped optimizer.
        """
        optimizer = self.optimizer.optimizer if self._optimizer_wrapper_is_plain else self.optimizer
        optimizer.step()
        self.scheduler.step()
        optimizer.zero_grad()

    def _after_step(self, bar, step_loss: torch.Tensor, step_samples: int, totals: EpochTotals) -> None:
        step = self.position.global_step
        if step % self.cfg.log_every == 0:
            # Reading a loss synchronises with the device, so it happens only on logged steps.
            loss = self.accelerator.reduce(step_loss, "sum").item() / step_samples
            bar.set_postfix(loss=loss)
            self.tracker.log_values(
                {
                    "train/loss": loss,
                    "train/lr": self.current_lr(),
                    "train/epoch": self.position.epoch_fraction(self.train.size),
                },
                step,
            )
        checkpoint_due = bool(self.cfg.checkpoint_every) and step % self.cfg.checkpoint_every == 0
        if not (checkpoint_due or step % STOP_CHECK_EVERY == 0):
            return
        stop = self._agree_on_stop(totals.loss)
        if checkpoint_due or stop:
            self.progress.epoch_loss_sum, self.progress.epoch_samples = totals.fold(self.accelerator)
            self._save_state()
        if stop and not self._run_finished():  # else fit() finishes the run: evaluation, model and plots
            self._stopped()

    def _run_finished(self) -> bool:
        return self.position.run_finished(self.cfg.epochs, self.train.size)

    def _agree_on_stop(self, loss: torch.Tensor) -> bool:
        """Whether any process was asked to stop (all processes call this at the same step).

        Raises:
            UsageError: on any process the loss or a weight is not finite (so no state with them is saved).
        """
        finite = torch.isfinite(loss.to(self.accelerator.device)) & _weights_finite(self.model)
        signal_number = torch.tensor(float(self.stop.signal_number), device=finite.device)
        # Every process's (signal, diverged) pair, so that all name the signal that one of them received.
        flags = self.accelerator.gather(torch.stack([signal_number, (~finite).float()]).unsqueeze(0))
        if flags[:, 1].any():
            self._diverged()
        self._last_agreed_step = self.position.global_step
        received = flags[:, 0][flags[:, 0] > 0]
        self._stop_signal = signal.Signals(int(received[0])).name if len(received) else None
        return self._stop_signal is not None

    def _diverged(self) -> None:
        raise UsageError(
            f"training diverged: the loss became non-finite (NaN or infinite) at or before optimizer step "
            f"{self.position.global_step} (it was finite at step {self._last_agreed_step}); no state or model with "
            f"non-finite values was saved (model.pth and the states in {self.cfg.output_dir} are from before); "
            f"lower --lr (now {self.cfg.lr:g}) or lengthen the warm-up (--warmup-epochs)"
        )

    def _stopped(self) -> None:
        position = self.position
        raise TrainingStopped(
            f"stopped by {self._stop_signal} at optimizer step {position.global_step} (epoch "
            f"{position.epoch + 1}, {position.samples_done}/{self.train.size} images); its state is saved in "
            f"{self.cfg.output_dir}; run the same command with --resume auto to continue"
        )

    def _save_state(self) -> Path:
        return save_training_state(self.accelerator, self.cfg.output_dir, self.progress, self.cfg.keep_states)

    def _finish_epoch(self, stats: EpochStats, result: EvalResult, eval_seconds: float) -> None:
        position = self.position
        record = EpochRecord(
            epoch=position.epoch + 1,
            global_step=position.global_step,
            lr=self.current_lr(),
            train_loss=stats.loss,
            test_loss=result.loss,
            test_accuracy=result.accuracy,
            test_samples=result.samples,
            train_samples=stats.samples,
            train_seconds=stats.seconds,
            eval_seconds=eval_seconds,
            train_samples_per_second=stats.trained_now / stats.seconds,
            world_size=self.accelerator.num_processes,
            global_batch_size=self.train.plan.global_batch,
            mixed_precision=precision_in_effect(self.accelerator),
            cpu_threads=torch.get_num_threads(),
            confusion_matrix=result.confusion_matrix().tolist(),
        )
        self.progress.finish_epoch(record)
        if self.accelerator.is_main_process:
            self.metrics_log.append(record)
        self.accelerator.print(
            f"epoch {record.epoch}/{self.cfg.epochs}: train loss {stats.loss:.4f}, test loss {result.loss:.4f}, "
            f"test accuracy {100 * result.accuracy:.2f}% ({result.samples} images), "
            f"{record.train_samples_per_second:.0f} train images/s"
        )
        self.tracker.log_values(record.tracker_values(), position.global_step)
        if self.cfg.log_samples_every_epoch:
            self.log_predictions(result)
        self._save_state()

    def log_predictions(self, result: EvalResult) -> None:
        """Log the confusion matrix and the sample images with their predictions to the tracker."""
        self.tracker.log_predictions(self.sample_images, result.predictions, result.targets, self.position.global_step)

    def current_lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return self.scheduler.get_last_lr()[0]


def _weights_finite(model: nn.Module) -> torch.Tensor:
    """Whether every weight is finite, as a bool tensor on the model's device (no synchronisation).

    A tensor's minimum and maximum are finite exactly when all its values are (both are NaN when any value is
    NaN): one reduction pass per tensor, about 8x cheaper on a CPU than `isfinite().all()`, which writes a
    boolean copy of every weight. At every stop check that copy cost about 50 µs per optimizer step.
    """
    extremes = torch.stack([bound for p in model.parameters() if p.numel() for bound in torch.aminmax(p.detach())])
    return torch.isfinite(extremes).all()
