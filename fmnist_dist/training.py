"""The training loop: one Trainer that runs epochs, evaluates, records metrics and saves resumable state."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader

from fmnist_dist.config import TrainConfig
from fmnist_dist.data import real_batch_size
from fmnist_dist.evaluation import EvalResult, evaluate
from fmnist_dist.progress import progress_bar, set_postfix
from fmnist_dist.state import Progress, save_training_state
from fmnist_dist.tracking import MetricsLog, log_predictions, log_values


@dataclass(frozen=True)
class EpochStats:
    """One epoch's training pass, totalled over all processes."""

    loss: float
    samples: int
    seconds: float


class Trainer:
    """Trains the prepared model for `cfg.epochs` epochs from `progress`, evaluating after each epoch.

    Args:
        cfg: the job's settings.
        accelerator: the Accelerator that prepared the objects below.
        model, optimizer, train_loader, test_loader: returned by `accelerator.prepare`.
        train_size: images in the training set (to tell real samples from Accelerate's padding).
        progress: where to start (a fresh Progress, or one restored by `--resume`).
        metrics_log: the metrics file, written by the main process.
        sample_images: a few test images (the first ones) to show with their predictions on W&B.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator: Accelerator,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        train_loader: DataLoader,
        test_loader: DataLoader,
        train_size: int,
        progress: Progress,
        metrics_log: MetricsLog,
        sample_images: torch.Tensor,
    ) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.model = model
        self.optimizer = optimizer
        self.train_loader = train_loader
        self.test_loader = test_loader
        self.train_size = train_size
        self.progress = progress
        self.metrics_log = metrics_log
        self.sample_images = sample_images
        # DeepSpeed's and Megatron's wrappers subclass AcceleratedOptimizer and step differently: exact type only.
        self._optimizer_wrapper_is_plain = (
            type(optimizer) is AcceleratedOptimizer
            and optimizer.scaler is None
            and accelerator.distributed_type != DistributedType.XLA
        )
        self.last_eval: EvalResult | None = None

    def fit(self) -> None:
        """Run the remaining epochs."""
        while self.progress.epoch < self.cfg.epochs:
            stats = self._train_epoch(self.progress.epoch)
            eval_start = time.perf_counter()
            self.last_eval = evaluate(self.model, self.test_loader, self.accelerator)
            self._finish_epoch(stats, self.last_eval, time.perf_counter() - eval_start)

    def _train_epoch(self, epoch: int) -> EpochStats:
        self.model.train()
        self.train_loader.set_epoch(epoch)  # the epoch, not a counter, seeds the shuffle: resumes replay it exactly
        first_step = self.progress.step_in_epoch
        batches = self.train_loader
        if first_step:
            batches = self.accelerator.skip_first_batches(self.train_loader, first_step)
        loss_sum = torch.tensor(self.progress.epoch_loss_sum, device=self.accelerator.device)
        samples = self.progress.epoch_samples
        start = time.perf_counter()
        bar = progress_bar(
            batches, self.accelerator, self.cfg.progress, f"epoch {epoch + 1}/{self.cfg.epochs}",
            total=len(self.train_loader) - first_step, images_per_batch=self._images_per_round(),
        )
        for step, (images, targets) in enumerate(bar, start=first_step):
            batch_loss_sum, batch_samples = self._train_step(images, targets, step)
            loss_sum += batch_loss_sum
            samples += batch_samples
            self._after_step(bar, batch_loss_sum, loss_sum, samples)
        totals = self.accelerator.reduce(torch.stack([loss_sum, torch.tensor(float(samples), device=loss_sum.device)]))
        total_loss, total_samples = totals.tolist()
        return EpochStats(total_loss / total_samples, round(total_samples), time.perf_counter() - start)

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> tuple[torch.Tensor, int]:
        """One optimizer step (or accumulation micro-step); returns this process's summed loss and sample count."""
        acc = self.accelerator
        real = real_batch_size(step, self.cfg.batch_size, self.train_size, acc.num_processes, acc.process_index)
        images, targets = images[:real], targets[:real]  # drop the padding other processes train on for real
        with acc.accumulate(self.model):
            loss_sum = F.cross_entropy(self.model(images).float(), targets, reduction="sum")
            # DDP averages gradients over processes; scaling by processes / real samples this round makes the
            # gradient the mean over the round's real samples, also when the last round is short.
            acc.backward(loss_sum * (acc.num_processes / self._real_samples_in_round(step)))
            self._step_optimizer()
        return loss_sum.detach(), real

    def _step_optimizer(self) -> None:
        """`optimizer.step()` and `zero_grad()` as Accelerate runs them, without its per-call lookups.

        Accelerate's wrapper searches the filesystem for an optional package (lomo_optim) twice per step and
        inspects zero_grad's signature: about 0.1 ms a step, several percent of an MLP step on a CPU. Where
        the wrapper adds nothing else (no fp16 gradient scaler, no XLA), its step and zero_grad are the wrapped
        optimizer's on steps that sync gradients and no-ops on accumulation steps, which is what this does.
        """
        optimizer = self.optimizer
        if not self._optimizer_wrapper_is_plain:
            optimizer.step()
            optimizer.zero_grad()
        elif self.accelerator.sync_gradients:
            optimizer.optimizer.step()
            optimizer.optimizer.zero_grad()

    def _after_step(self, bar, batch_loss_sum: torch.Tensor, loss_sum: torch.Tensor, samples: int) -> None:
        progress = self.progress
        progress.step_in_epoch += 1
        progress.global_step += 1
        if progress.global_step % self.cfg.log_every == 0:
            # Reading a loss synchronises with the device, so it happens only on logged steps.
            step_loss = self.accelerator.reduce(batch_loss_sum, "sum").item() / self._real_samples_in_round(
                progress.step_in_epoch - 1
            )
            set_postfix(bar, loss=step_loss)
            log_values(self.accelerator, {"train/loss": step_loss, "train/epoch": self._epoch_fraction()},
                       progress.global_step)
        if self.cfg.checkpoint_every and progress.global_step % self.cfg.checkpoint_every == 0:
            progress.epoch_loss_sum, progress.epoch_samples = loss_sum.item(), samples
            save_training_state(self.accelerator, self.cfg.output_dir, progress, self.cfg.keep_states)

    def _finish_epoch(self, stats: EpochStats, result: EvalResult, eval_seconds: float) -> None:
        record = {
            "epoch": self.progress.epoch + 1,
            "global_step": self.progress.global_step,
            "train_loss": stats.loss,
            "test_loss": result.loss,
            "test_accuracy": result.accuracy,
            "test_samples": result.samples,
            "train_samples": stats.samples,
            "train_seconds": stats.seconds,
            "eval_seconds": eval_seconds,
            "train_samples_per_second": stats.samples / stats.seconds,
            "world_size": self.accelerator.num_processes,
            "confusion_matrix": result.confusion_matrix().tolist(),
        }
        self.progress.finish_epoch(record)
        if self.accelerator.is_main_process:
            self.metrics_log.append(record)
        self.accelerator.print(
            f"epoch {record['epoch']}/{self.cfg.epochs}: train loss {stats.loss:.4f}, test loss {result.loss:.4f}, "
            f"test accuracy {100 * result.accuracy:.2f}% ({result.samples} images), "
            f"{record['train_samples_per_second']:.0f} train images/s"
        )
        log_values(self.accelerator, _epoch_scalars(record), self.progress.global_step)
        if self.cfg.log_samples_every_epoch:
            self.log_predictions(result)
        save_training_state(self.accelerator, self.cfg.output_dir, self.progress, self.cfg.keep_states)

    def log_predictions(self, result: EvalResult) -> None:
        """Log the confusion matrix and the sample images with their predictions to W&B."""
        log_predictions(self.accelerator, self.sample_images, result.predictions, result.targets,
                        self.progress.global_step)

    def _images_per_round(self) -> int:
        return self.cfg.batch_size * self.accelerator.num_processes

    def _real_samples_in_round(self, step: int) -> int:
        return min(self._images_per_round(), self.train_size - step * self._images_per_round())

    def _epoch_fraction(self) -> float:
        return self.progress.epoch + self.progress.step_in_epoch / len(self.train_loader)


def _epoch_scalars(record: dict) -> dict[str, float]:
    return {
        "epoch": record["epoch"],
        "train/epoch_loss": record["train_loss"],
        "test/loss": record["test_loss"],
        "test/accuracy": record["test_accuracy"],
        "perf/train_seconds": record["train_seconds"],
        "perf/eval_seconds": record["eval_seconds"],
        "perf/train_samples_per_second": record["train_samples_per_second"],
    }


def output_paths(output_dir: Path) -> dict[str, Path]:
    """Where a job writes its results."""
    return {
        "model": output_dir / "model.pth",
        "metrics": output_dir / "metrics.jsonl",
        "curves": output_dir / "curves.png",
        "confusion": output_dir / "confusion.png",
    }
