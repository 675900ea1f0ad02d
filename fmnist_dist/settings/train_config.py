"""The training job's settings: one typed object, built once from the command line and logged whole."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fmnist_dist.errors import UsageError

# Defaults that learn well in 5 epochs (with the TrainConfig defaults below: cosine schedule, half an epoch of
# warm-up; chosen on a real-image sample, README "Defaults, and reproducing the tutorial"). The quickstart is
# `--lr 1e-3 --momentum 0 --lr-schedule constant --warmup-epochs 0` exactly (batch 64, no weight decay).
DEFAULT_LR = 0.12
DEFAULT_MOMENTUM = 0.9
DEFAULT_BATCH_SIZE = 64  # per process, when neither --batch-size nor --global-batch-size is given
DEFAULT_WARMUP_EPOCHS = 0.5  # when neither --warmup-steps nor --warmup-epochs is given
# --scale-lr's linear scaling rule (Goyal et al. 2017, arXiv:1706.02677): --lr is the rate for a global batch
# of this many images, and a global batch k times larger trains at k times the rate, after a warm-up.
REFERENCE_BATCH_SIZE = 64
LR_SCHEDULES = ("constant", "cosine", "onecycle")
RESUME_AUTO = "auto"  # continue from the newest state if there is one, else start fresh
RESUME_LATEST = "latest"  # continue from the newest state; refuse if there is none
# torch.Generator seeds are 64-bit; the shuffle seed is derived from (seed, epoch), so a seed fits in 32 bits.
MAX_SEED = 2**32 - 1

MAX_COUNT = 2**31 - 1  # batch sizes, epochs, step counts: beyond any real run, inside every index type
MAX_THREADS = 1024
# The largest float32: the model's weights are float32, and torch cannot apply a rate or decay beyond it.
MAX_FLOAT32 = 3.4028234663852886e38

# Settings of one invocation, never carried over from a saved state to a resumed run.
# Mixed precision is among them because what a device can run depends on the machine the run continues on.
PER_INVOCATION = frozenset(
    {
        "resume",
        "overwrite",
        "output_dir",
        "progress",
        "cpu",
        "num_workers",
        "data_on_device",
        "download",
        "threads",
        "mixed_precision",
    }
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything `fmnist-dist train` needs.

    `batch_size` is per process and per micro-batch; `global_batch_size` is the images of one optimizer step
    across all processes and accumulation steps. At most one of them is set; with neither, the batch is
    DEFAULT_BATCH_SIZE per process.
    """

    data_dir: Path = Path("data")
    download: bool = True
    epochs: int = 5
    batch_size: int | None = None
    global_batch_size: int | None = None
    eval_batch_size: int = 1000
    lr: float = DEFAULT_LR
    momentum: float = DEFAULT_MOMENTUM
    weight_decay: float = 0.0
    scale_lr: bool = False
    lr_schedule: str = "cosine"
    warmup_steps: int | None = None
    warmup_epochs: float | None = None
    seed: int = 0
    num_workers: int = 0
    data_on_device: str = "auto"
    output_dir: Path = Path("checkpoints")
    overwrite: bool = False
    cpu: bool = False
    threads: int | None = None
    mixed_precision: str | None = None
    gradient_accumulation_steps: int | None = None
    log_every: int = 50
    checkpoint_every: int = 0
    keep_states: int = 2
    resume: str | None = None
    progress: bool = True
    tracker: str = "wandb"
    wandb_project: str = "fmnist-dist"
    run_name: str | None = None
    run_group: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    log_samples_every_epoch: bool = False
    log_model: bool = False

    def __post_init__(self) -> None:
        self._check_upper_bounds()
        check_positive("--epochs", self.epochs)
        for flag, value in (
            ("--batch-size", self.batch_size),
            ("--global-batch-size", self.global_batch_size),
            ("--gradient-accumulation-steps", self.gradient_accumulation_steps),
        ):
            if value is not None:
                check_positive(flag, value)
        if self.batch_size is not None and self.global_batch_size is not None:
            raise UsageError(
                "--batch-size (per process) and --global-batch-size (all processes) exclude each "
                "other; pass only one of them"
            )
        check_positive("--eval-batch-size", self.eval_batch_size)
        check_positive("--lr", self.lr)
        check_positive("--log-every", self.log_every)
        check_positive("--keep-states", self.keep_states)
        check_momentum(self.momentum)
        check_at_least_zero("--weight-decay", self.weight_decay)
        check_at_least_zero("--num-workers", self.num_workers)
        if self.threads is not None:
            check_positive("--threads", self.threads)
        check_at_least_zero("--checkpoint-every", self.checkpoint_every)
        for flag, value in (("--warmup-steps", self.warmup_steps), ("--warmup-epochs", self.warmup_epochs)):
            if value is not None:
                check_at_least_zero(flag, value)
        if self.warmup_steps and self.warmup_epochs:
            raise UsageError("--warmup-steps and --warmup-epochs exclude each other; pass only one of them")
        if self.resume == "":
            raise UsageError(
                "--resume got an empty value; pass a state directory, `auto`, or --resume alone (the newest state)"
            )
        if self.overwrite and self.resume is not None:
            raise UsageError("--overwrite (start afresh) and --resume (continue) exclude each other; pass only one")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UsageError(f"--lr-schedule {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        check_seed("--seed", self.seed)

    def _check_upper_bounds(self) -> None:
        counts = {
            "--epochs": self.epochs,
            "--batch-size": self.batch_size,
            "--eval-batch-size": self.eval_batch_size,
            "--global-batch-size": self.global_batch_size,
            "--log-every": self.log_every,
            "--gradient-accumulation-steps": self.gradient_accumulation_steps,
            "--checkpoint-every": self.checkpoint_every,
            "--keep-states": self.keep_states,
            "--warmup-steps": self.warmup_steps,
        }
        for flag, value in counts.items():
            if value is not None:
                check_at_most(flag, value, MAX_COUNT)
        if self.warmup_epochs is not None:
            check_at_most("--warmup-epochs", self.warmup_epochs, MAX_COUNT)
        for flag, value in (("--lr", self.lr), ("--weight-decay", self.weight_decay)):
            check_at_most(flag, value, MAX_FLOAT32)
        if self.threads is not None:
            check_at_most("--threads", self.threads, MAX_THREADS)
        # PyTorch's DataLoader itself warns above the machine's CPU count; far above it, a machine stalls.
        check_at_most("--num-workers", self.num_workers, os.cpu_count() or 1)

    @property
    def warmup_epochs_or_default(self) -> float:
        """`--warmup-epochs`; DEFAULT_WARMUP_EPOCHS when no warm-up flag is given; 0 beside `--warmup-steps`."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return 0.0 if self.warmup_steps is not None else DEFAULT_WARMUP_EPOCHS

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (1 unless --gradient-accumulation-steps says otherwise)."""
        return self.gradient_accumulation_steps or 1

    def to_log(self) -> dict[str, Any]:
        """The settings as plain values, for W&B and the saved training state."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}

    def resumed_from(self, saved: dict[str, Any], given: frozenset[str]) -> tuple[TrainConfig, dict[str, tuple]]:
        """This invocation's settings for a resumed run: the saved ones, except the flags given now.

        Args:
            saved: `to_log()` of the run being resumed.
            given: the fields set explicitly on this command line.

        Returns:
            The merged settings, and `{field: (saved value, new value)}` for every saved setting that changes.
        """
        names = {f.name for f in fields(self)}
        carried = {k: v for k, v in saved.items() if k in names and k not in given and k not in PER_INVOCATION}
        # The two batch flags exclude each other, and so do the two warm-up flags: the one given now replaces the
        # saved one.
        for one, other in (
            ("batch_size", "global_batch_size"),
            ("global_batch_size", "batch_size"),
            ("warmup_steps", "warmup_epochs"),
            ("warmup_epochs", "warmup_steps"),
        ):
            if one in given and getattr(self, one) is not None:
                carried.pop(other, None)
        carried = {k: _from_log(k, v) for k, v in carried.items()}
        merged = replace(self, **carried)
        changed = {
            k: (saved[k], v)
            for k, v in merged.to_log().items()
            if k in saved and k not in PER_INVOCATION and _from_log(k, saved[k]) != getattr(merged, k)
        }
        return merged, changed


def _from_log(name: str, value: Any) -> Any:
    """A saved (JSON) setting back in its field's type."""
    if name == "data_dir":
        return Path(value)
    if name == "tags":
        return tuple(value)
    return value


def check_positive(flag: str, value: float) -> None:
    """Refuse a flag value that must be above zero (and finite)."""
    if not 0 < value < math.inf:
        raise UsageError(f"{flag} must be greater than 0 (got {value}); pass a positive value")


def check_at_least_zero(flag: str, value: float) -> None:
    """Refuse a flag value that must not be negative (and finite)."""
    if not 0 <= value < math.inf:
        raise UsageError(f"{flag} must be 0 or more (got {value}); pass a value of at least 0")


def check_count(flag: str, value: int) -> None:
    """Refuse a count (a batch size, a number of steps) below 1 or above MAX_COUNT."""
    check_positive(flag, value)
    check_at_most(flag, value, MAX_COUNT)


def check_momentum(momentum: float) -> None:
    """Refuse an SGD momentum outside [0, 1): at 1 or more the velocity never decays and training diverges."""
    if not 0 <= momentum < 1:
        raise UsageError(
            f"--momentum must be at least 0 and below 1 (got {momentum}); SGD momentum of 1 or more "
            "adds up every gradient without forgetting and diverges; pass a value such as 0.9"
        )


def check_at_most(flag: str, value: float, limit: float) -> None:
    """Refuse a flag value above `limit`."""
    if value > limit:
        raise UsageError(f"{flag} must be at most {limit} (got {value}); pass a smaller value")


def check_seed(flag: str, seed: int) -> None:
    """Refuse a seed outside 0..MAX_SEED (what torch and numpy generators take)."""
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"{flag} must be between 0 and {MAX_SEED} (got {seed}); pass a seed in range")
