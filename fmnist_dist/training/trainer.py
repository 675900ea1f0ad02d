"""The training loop: one Trainer that runs epochs, evaluates, records metrics and saves resumable state.

Each optimizer step trains the next global batch of the epoch's order (the recipe's `TrainStep`). Every few
steps the processes check in together: whether training diverged on any of them, and whether any was asked to
stop (a signal), so a stop happens at the same step everywhere and nothing non-finite is ever saved.
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.evaluation import EvalResult
from fmnist_dist.recipe.position import BatchPlan
from fmnist_dist.recipe.sampling import GlobalOrderBatchSampler
from fmnist_dist.recipe.train_step import TrainStep
from fmnist_dist.runtime.devices import precision_in_effect
from fmnist_dist.runtime.stop_signals import StopRequest, TrainingStopped
from fmnist_dist.runtime.throughput import ComputeSpec, Throughput, ThroughputMeter
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.metrics_log import EpochRecord, MetricsLog
from fmnist_dist.storage.training_state import Progress, save_training_state
from fmnist_dist.tracking.base import Tracker
from fmnist_dist.training.model_selection import EpochEvaluation, EpochScores
from fmnist_dist.training.profiling import step_profiler, steps_left

# Optimizer steps between the processes' check-ins (one tiny gather): a signal is acted on, and a divergence
# caught, within this many steps, and a fast run pays for one collective per this many steps, not per step.
STOP_CHECK_EVERY = 20


@dataclass(frozen=True)
class EpochStats:
    """One epoch's training pass, totalled over all processes."""

    loss: float
    samples: int
    # The part trained in this invocation (all of it, but in a resumed epoch): its wall time, images per second,
    # data wait, FLOPs and memory.
    perf: Throughput

    @property
    def seconds(self) -> float:
        return self.perf.seconds


class EpochTotals:
    """The epoch's summed training loss and image count: this process's since the last fold, and the job's.

    Folding (a sum over processes) happens only where a state is saved, so an uninterrupted run and one
    resumed from any of its states add up the same numbers in the same order.
    """

    def __init__(self, device: torch.device, job_loss: float = 0.0, job_samples: int = 0) -> None:
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.samples = 0
        # int(): states saved before the count was kept whole hold it as a float (480.0).
        self.job_loss, self.job_samples = job_loss, int(job_samples)

    def add(self, loss: torch.Tensor, samples: int) -> None:
        self.loss += loss
        self.samples += samples

    def fold(self, accelerator: Accelerator) -> tuple[float, int]:
        """Add every process's totals to the job's (all processes call this); return the job's."""
        # One reduction for both: the image count travels as a float64, exact for any count of images.
        local = torch.stack([self.loss, torch.tensor(float(self.samples), device=self.loss.device).double()])
        loss, samples = accelerator.reduce(local, "sum").tolist()
        self.job_loss, self.job_samples = self.job_loss + loss, self.job_samples + round(samples)
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


@dataclass(frozen=True)
class FitResult:
    """What a run produced: every epoch's record, and the last evaluation (on every process).

    Attributes:
        metrics: the record of every epoch of the run, those of the runs it resumed included, in order.
        last_eval: the test set's evaluation after the last epoch trained now; None when a resumed run had
            nothing left to train.
    """

    metrics: list[EpochRecord]
    last_eval: EvalResult | None

    @property
    def final_record(self) -> EpochRecord:
        """The record of the run's last epoch."""
        return self.metrics[-1]


class Trainer:
    """Trains the prepared model for `cfg.epochs` epochs from `progress`, evaluating after each epoch (early
    stopping may end it sooner).

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
        val_loader: the prepared validation split (`--val-size`); None without one.
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
        val_loader: DataLoader | None = None,
    ) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.model = model
        self.train_step = TrainStep(accelerator, model, optimizer, scheduler, train.plan)
        self.train = train
        self.evaluation = EpochEvaluation(cfg, accelerator, test_loader, val_loader, progress)
        self.progress = progress
        self.position = progress.position
        self.metrics_log = metrics_log
        self.sample_images = sample_images
        self.stop = stop
        self.tracker = tracker
        self._last_agreed_step = self.position.global_step
        self._stop_signal: str | None = None
        self.meter = ThroughputMeter(ComputeSpec.of(accelerator, model), accelerator.device)
        left = steps_left(self.position, cfg.epochs, train.plan.global_batch, train.size)
        self.profiler = step_profiler(
            accelerator, tracker, cfg.output_dir, cfg.profile_steps, self.position.global_step, left
        )

    def fit(self) -> FitResult:
        """Run the remaining epochs.

        Raises:
            TrainingStopped: a stop signal arrived; a state was saved at the step where every process stopped.
            UsageError: the loss or the weights became non-finite (nothing of that is saved).
        """
        if self._check_in(torch.zeros(())):  # a stop asked for during start-up: no step is trained
            self._save_state()
            raise self._stop_error()
        last_eval = None
        with self.profiler or contextlib.nullcontext():
            while self.position.epoch < self.cfg.epochs and not self.evaluation.stopped_early:
                last_eval = self._run_epoch()
        return FitResult(self.progress.metrics, last_eval)

    def _run_epoch(self) -> EvalResult | None:
        """Train the rest of the epoch under way, score it, record the epoch, and stop there if asked to.

        Returns:
            The test set's evaluation, if the epoch scored it.
        """
        stats = self.train_epoch()
        eval_start = time.perf_counter()
        scores = self.evaluation.score(self.model, last_epoch=self.position.epoch + 1 == self.cfg.epochs)
        stop = self._check_in(torch.tensor(stats.loss + scores.loss))
        eval_seconds = time.perf_counter() - eval_start
        self.evaluation.keep_best(self.model, scores)  # before the record and the state that name the best epoch
        self._finish_epoch(stats, scores, eval_seconds)
        if self.evaluation.stopped_early:
            self.accelerator.print(self.evaluation.early_stop_line())
        if stop:
            self._stop_unless_finished()
            self.accelerator.print(
                f"fmnist-dist: {self._stop_signal} arrived after the last optimizer step; finishing the run"
            )
        return scores.test

    def train_epoch(self) -> EpochStats:
        """Train the epoch under way from the position on, to its end (`fit` calls this for every epoch).

        Raises:
            TrainingStopped, UsageError: as `fit`, at a check-in during the epoch.
        """
        position, size = self.position, self.train.size
        first_sample = position.samples_done
        self.model.train()
        self.train.sampler.set_position(position.epoch, first_sample)
        batches = self.meter.timed(iter(self.train.loader))
        totals = EpochTotals(self.accelerator.device, self.progress.epoch_loss_sum, self.progress.epoch_samples)
        self.meter.start_epoch()
        with self._progress_bar(size - first_sample) as bar:
            while not position.epoch_finished(size):
                step_samples = position.step_samples(self.train.plan.global_batch, size)
                step_loss, step_count = self.train_step(batches, step_samples)
                totals.add(step_loss, step_count)
                position.advance(step_samples)
                bar.update(step_samples)
                self._after_step(bar, step_loss, step_samples, totals)
        total_loss, total_samples = totals.fold(self.accelerator)
        perf = self.meter.epoch(self.accelerator)
        return EpochStats(total_loss / total_samples, total_samples, perf)

    def _progress_bar(self, images: int) -> tqdm:
        """A bar counting the epoch's trained images (and images/s), shown only by the main process.

        Args:
            images: the real images still to train this epoch (Accelerate's padding is not counted).
        """
        shown = self.cfg.progress and self.accelerator.is_main_process
        return tqdm(
            desc=f"epoch {self.position.epoch + 1}/{self.cfg.epochs}",
            total=images,
            # None: tqdm turns itself off when stderr is not a terminal (CI logs, files, pipes).
            disable=None if shown else True,
            unit="img",
            unit_scale=True,
            leave=False,
        )

    def _after_step(self, bar: tqdm, step_loss: torch.Tensor, step_samples: int, totals: EpochTotals) -> None:
        self.meter.count_step(step_samples)
        if self.profiler is not None:
            self.profiler.step()
        step = self.position.global_step
        if step % self.cfg.log_every == 0:
            self._log_step(bar, step_loss, step_samples)
        checkpoint_due = bool(self.cfg.checkpoint_every) and step % self.cfg.checkpoint_every == 0
        if not (checkpoint_due or step % STOP_CHECK_EVERY == 0):
            return
        stop = self._check_in(totals.loss)
        if checkpoint_due or stop:
            self.progress.epoch_loss_sum, self.progress.epoch_samples = totals.fold(self.accelerator)
            self._save_state()
        if stop:
            self._stop_unless_finished()

    def _log_step(self, bar: tqdm, step_loss: torch.Tensor, step_samples: int) -> None:
        # Reading a loss synchronises with the device, so it happens only on logged steps.
        loss = self.accelerator.reduce(step_loss, "sum").item() / step_samples
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.tracker.log_values(
            {
                "train/loss": loss,
                "train/lr": self.current_lr(),
                "train/epoch": self.position.epoch_fraction(self.train.size),
                # After the loss is read, so the window's time includes the device's work on its steps.
                **self.meter.window().tracker_values(),
            },
            self.position.global_step,
        )

    def _stop_unless_finished(self) -> None:
        """Stop here, unless no optimizer step is left (or early stopping has ended the run): then the run
        finishes (its last evaluation, the model and the plots take a second or so)."""
        if not (self.position.run_finished(self.cfg.epochs, self.train.size) or self.evaluation.stopped_early):
            raise self._stop_error()

    def _check_in(self, loss: torch.Tensor) -> bool:
        """The processes' check-in (all call this at the same step): one gather of every process's stop signal
        and of whether its loss and weights are finite, then the divergence check, then the stop decision.

        Returns:
            Whether any process was asked to stop.

        Raises:
            UsageError: on any process the loss or a weight is not finite (so no state with them is saved).
        """
        finite = torch.isfinite(loss.to(self.accelerator.device)) & _weights_finite(self.model)
        signal_number = torch.tensor(float(self.stop.signal_number), device=finite.device)
        flags = self.accelerator.gather(torch.stack([signal_number, (~finite).float()]).unsqueeze(0))
        self._check_finite(flags[:, 1])
        return self._agree_on_stop(flags[:, 0])

    def _check_finite(self, diverged: torch.Tensor) -> None:
        """Stop the run if training diverged on any process (`diverged`: one flag per process)."""
        if diverged.any():
            raise self._divergence_error()
        self._last_agreed_step = self.position.global_step

    def _agree_on_stop(self, signals: torch.Tensor) -> bool:
        """Whether any process received a stop signal (`signals`: each process's, 0 for none); every process
        names the signal that one of them received."""
        received = signals[signals > 0]
        self._stop_signal = signal.Signals(int(received[0])).name if len(received) else None
        return self._stop_signal is not None

    def _divergence_error(self) -> UsageError:
        return UsageError(
            f"training diverged: the loss became non-finite (NaN or infinite) at or before optimizer step "
            f"{self.position.global_step} (it was finite at step {self._last_agreed_step}); no state or model with "
            f"non-finite values was saved ({self._what_is_from_before()}); "
            f"lower --lr (now {self.cfg.lr:g}) or lengthen the warm-up (--warmup-epochs)"
        )

    def _stop_error(self) -> TrainingStopped:
        position = self.position
        return TrainingStopped(
            f"stopped by {self._stop_signal} at optimizer step {position.global_step} (epoch "
            f"{position.epoch + 1}, {position.samples_done}/{self.train.size} images); its state is saved in "
            f"{self.cfg.output_dir}; run the same command {self._resume_advice()} to continue"
        )

    def _what_is_from_before(self) -> str:
        output_dir = self.cfg.output_dir
        if self.cfg.overwrite:  # the earlier run's states were removed before this one started
            return f"model.pth in {output_dir} is the earlier run's, and its states, if any, this run's from before"
        return f"model.pth and the states in {output_dir} are from before"

    def _resume_advice(self) -> str:
        # The same command with --overwrite again would remove the state just saved (and --resume excludes it).
        return "without --overwrite, with --resume auto," if self.cfg.overwrite else "with --resume auto"

    def _save_state(self) -> Path:
        return save_training_state(self.accelerator, self.cfg.output_dir, self.progress, self.cfg.keep_states)

    def _finish_epoch(self, stats: EpochStats, scores: EpochScores, eval_seconds: float) -> None:
        position = self.position
        record = EpochRecord(
            epoch=position.epoch + 1,
            global_step=position.global_step,
            lr=self.current_lr(),
            train_loss=stats.loss,
            **scores.record_fields(),
            train_samples=stats.samples,
            train_seconds=stats.seconds,
            eval_seconds=eval_seconds,
            train_samples_per_second=stats.perf.samples_per_second,
            seconds_per_step=stats.perf.seconds_per_step,
            data_wait_fraction=stats.perf.data_wait_fraction,
            flops_per_image=self.meter.compute.flops_per_image,
            tflops_per_second=stats.perf.tflops_per_second,
            mfu=stats.perf.mfu,
            peak_memory_mib=stats.perf.peak_memory_mib,
            world_size=self.accelerator.num_processes,
            global_batch_size=self.train.plan.global_batch,
            mixed_precision=precision_in_effect(self.accelerator),
            cpu_threads=torch.get_num_threads(),
        )
        self.progress.finish_epoch(record)
        if self.accelerator.is_main_process:
            self.metrics_log.append(record)
        self.accelerator.print(
            f"epoch {record.epoch}/{self.cfg.epochs}: train loss {stats.loss:.4f}, {scores.summary()}, "
            f"{record.train_samples_per_second:.0f} train images/s"
        )
        self.tracker.log_values({**record.tracker_values(), **self.evaluation.best_values()}, position.global_step)
        if self.cfg.log_samples_every_epoch and scores.test is not None:
            self.log_predictions(scores.test)
        self._save_state()

    def log_predictions(self, result: EvalResult) -> None:
        """Log the confusion matrix and the sample images with their predictions to the tracker."""
        self.tracker.log_predictions(self.sample_images, result.predictions, result.targets, self.position.global_step)

    def current_lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return self.train_step.current_lr()


def _weights_finite(model: nn.Module) -> torch.Tensor:
    """Whether every weight is finite, as a bool tensor on the model's device (no synchronisation).

    A tensor's minimum and maximum are finite exactly when all its values are (both are NaN when any value is
    NaN): one reduction pass per tensor, where `isfinite().all()` would first write a boolean copy of every
    weight at every check-in (benchmarks/README.md has the measurement).
    """
    extremes = torch.stack([bound for p in model.parameters() if p.numel() for bound in torch.aminmax(p.detach())])
    return torch.isfinite(extremes).all()
