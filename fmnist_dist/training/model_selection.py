"""Choosing an epoch by the validation split: each epoch's scores, the best epoch by `--monitor` kept as
model-best.pth, and early stopping.

It does what Lightning's `ModelCheckpoint(monitor=..., save_top_k=1)` and `EarlyStopping(monitor=..., patience=K)`
do, and the Hugging Face Trainer's `load_best_model_at_end` with its `EarlyStoppingCallback`: an epoch improves when
its value of the monitored metric is strictly better than the best so far (a higher accuracy, a lower loss; a tie
is no improvement, as with their `min_delta=0`), and a run ends after K epochs in a row without one. The test set
never chooses: with `--val-size` it is scored at the end of the run only (and after every epoch with
`--test-every-epoch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from fmnist_dist.recipe.evaluation import EvalResult, evaluate
from fmnist_dist.recipe.model import plain_state_dict
from fmnist_dist.runtime.collective_errors import fail_together
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.run_dir import BEST_MODEL_FILE, RunDirectory
from fmnist_dist.storage.training_state import Progress
from fmnist_dist.storage.weights import save_state_dict

# Whether a higher value of each metric `--monitor` offers (settings.train_config.MONITORS) is the better one.
HIGHER_IS_BETTER = {"val_accuracy": True, "val_loss": False}


def improves(monitor: str, value: float, best: float | None) -> bool:
    """Whether `value` of the metric `monitor` is strictly better than `best` (None: no epoch yet); NaN never is."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if HIGHER_IS_BETTER[monitor] else value < best


def judge_epoch(progress: Progress, monitor: str, epoch: int, value: float) -> bool:
    """Record `epoch`'s value of `monitor` in `progress`: the new best, or one more epoch without improvement.

    Args:
        epoch: the epoch just scored, from 1.
        value: its `monitor` on the validation split.

    Returns:
        Whether it improved: its weights are the new best model.
    """
    if improves(monitor, value, progress.best_value):
        progress.best_value, progress.best_epoch, progress.epochs_without_improvement = value, epoch, 0
        return True
    progress.epochs_without_improvement += 1
    return False


def stopped_early(progress: Progress, patience: int | None) -> bool:
    """Whether `patience` epochs in a row have passed without improvement (never with no patience: None)."""
    return patience is not None and progress.epochs_without_improvement >= patience


def early_stop_reason(progress: Progress, monitor: str) -> str:
    """Why the run stops: "val_accuracy has not improved for 2 epoch(s) (best 0.8712 at epoch 3)"."""
    return (
        f"{monitor} has not improved for {progress.epochs_without_improvement} epoch(s) "
        f"(best {progress.best_value:.4f} at epoch {progress.best_epoch})"
    )


def best_key(monitor: str) -> str:
    """The tracker's name for the best value so far of `monitor`: "val/best_accuracy", "val/best_loss".

    Logged after every epoch, its last value is the run's best, and a W&B sweep scores a trial by the last value
    of its metric (the run summary's): with this as the sweep's metric, a trial is scored by its best epoch, the
    one model-best.pth holds, as Lightning's `ModelCheckpoint.best_model_score` reports it.
    """
    return "val/best_" + monitor.removeprefix("val_")


def best_values(progress: Progress, monitor: str) -> dict[str, float]:
    """`{best_key(monitor): the best value so far}` for the tracker; empty before any epoch was judged."""
    return {} if progress.best_value is None else {best_key(monitor): progress.best_value}


def monitored(monitor: str, validation: EvalResult) -> float:
    """The value of `monitor` ("val_accuracy", "val_loss") in the validation split's evaluation."""
    return validation.accuracy if monitor == "val_accuracy" else validation.loss


@dataclass(frozen=True)
class EpochScores:
    """What an epoch was scored on: the validation split (with `--val-size`) and the test set (when due).

    Attributes:
        validation: the validation split's evaluation; None without one.
        test: the test set's evaluation; None in an epoch that does not score it.
        improved: the validation split's `--monitor` is the best so far (model-best.pth is this epoch's).
    """

    validation: EvalResult | None
    test: EvalResult | None
    improved: bool = False

    @property
    def loss(self) -> float:
        """The sum of the evaluated losses (non-finite when any is: the divergence check reads it)."""
        return sum(result.loss for result in (self.validation, self.test) if result is not None)

    def record_fields(self) -> dict[str, Any]:
        """The epoch record's test and validation fields (None for a set not scored)."""
        confusion = None if self.test is None else self.test.confusion_matrix().tolist()
        return {
            **_result_fields("test", self.test),
            **_result_fields("val", self.validation),
            "confusion_matrix": confusion,
        }

    def summary(self) -> str:
        """The scores in the epoch's line: "val loss 0.4321, val accuracy 84.00% (100 images, best so far), test
        loss ..."."""
        parts = []
        if self.validation is not None:
            best = ", best so far" if self.improved else ""
            parts.append(_described("val", self.validation, best))
        if self.test is not None:
            parts.append(_described("test", self.test))
        return ", ".join(parts)


def _result_fields(name: str, result: EvalResult | None) -> dict[str, float | int | None]:
    """`{name}_loss`, `{name}_accuracy` and `{name}_samples` of an evaluation (None for one not made)."""
    keys = (f"{name}_loss", f"{name}_accuracy", f"{name}_samples")
    if result is None:
        return dict.fromkeys(keys)
    return dict(zip(keys, (result.loss, result.accuracy, result.samples), strict=True))


def _described(name: str, result: EvalResult, note: str = "") -> str:
    return (
        f"{name} loss {result.loss:.4f}, {name} accuracy {100 * result.accuracy:.2f}% ({result.samples} images{note})"
    )


class EpochEvaluation:
    """What the Trainer scores after each epoch, and the best epoch it keeps (every process holds one).

    Args:
        cfg: the job's settings (`--monitor`, `--early-stopping-patience`, `--test-every-epoch`, `--output-dir`).
        accelerator: the Accelerator that prepared the loaders.
        test_loader: the prepared test set.
        val_loader: the prepared validation split; None without `--val-size`.
        progress: the run's progress, which holds the best epoch and the epochs since.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator: Accelerator,
        test_loader: DataLoader,
        val_loader: DataLoader | None,
        progress: Progress,
    ) -> None:
        self.accelerator = accelerator
        self.test_loader = test_loader
        self.val_loader = val_loader
        self.progress = progress
        self.monitor = cfg.monitor_or_default
        self.patience = cfg.early_stopping_patience
        self.test_every_epoch = cfg.test_every_epoch
        self.best_model = RunDirectory(cfg.output_dir).best_model

    @property
    def stopped_early(self) -> bool:
        """Whether early stopping has ended the run (after the epoch just scored, or before this invocation)."""
        return stopped_early(self.progress, self.patience)

    def score(self, model: nn.Module, last_epoch: bool) -> EpochScores:
        """Score the epoch just trained (all processes call this: it gathers). The validation split, if any, is
        judged by `--monitor`; then the test set is scored if due: without a validation split, with
        `--test-every-epoch`, in the run's last epoch, or in the epoch after which early stopping ends the run.

        The gathered results are the same on every process, so every process takes the same decisions.

        Args:
            last_epoch: the epoch is the last one `--epochs` asks for.
        """
        validation, improved = None, False
        if self.val_loader is not None:
            validation = evaluate(model, self.val_loader, self.accelerator)
            epoch = self.progress.position.epoch + 1
            improved = judge_epoch(self.progress, self.monitor, epoch, monitored(self.monitor, validation))
        test_due = validation is None or self.test_every_epoch or last_epoch or self.stopped_early
        test = evaluate(model, self.test_loader, self.accelerator) if test_due else None
        return EpochScores(validation, test, improved)

    def keep_best(self, model: nn.Module, scores: EpochScores) -> None:
        """Write model-best.pth when the epoch improved (all processes call this; the main process writes).

        Call it before the epoch's record and state are saved: a state then never names a best epoch whose
        weights model-best.pth does not hold.

        Raises:
            UsageError: on every process, when model-best.pth could not be written.
        """
        if not scores.improved:
            return
        with fail_together(self.accelerator):
            if self.accelerator.is_main_process:
                save_state_dict(plain_state_dict(self.accelerator, model), self.best_model)

    def best_values(self) -> dict[str, float]:
        """The best value so far of `--monitor`, for the tracker (`best_values`); empty without a split."""
        return best_values(self.progress, self.monitor)

    def early_stop_line(self) -> str:
        """The line that says the run stops early: after which epoch, the metric, its best value and epoch."""
        return (
            f"fmnist-dist: early stopping after epoch {self.progress.position.epoch}: "
            f"{early_stop_reason(self.progress, self.monitor)}, kept in {BEST_MODEL_FILE}"
        )
