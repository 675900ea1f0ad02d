"""The training job's settings: one typed object, built once from the command line and logged whole.

Each field declares its setting (kind, help, bounds or choices, scope) in its metadata: the `train` flags,
their validation and what a resumed run takes from its state are all derived from these declarations.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from fmnist_dist.errors import UsageError
from fmnist_dist.settings.declaration import (
    NUMBER,
    PATH,
    SWITCH,
    TEXT,
    WHOLE,
    WORDS,
    Bounds,
    Refusal,
    Scope,
    Setting,
    setting,
    setting_of,
)

# Defaults that learn well in 5 epochs (with the TrainConfig defaults below: cosine schedule, half an epoch of
# warm-up; chosen on a real-image sample, README "Defaults, and reproducing the tutorial"). The quickstart is
# `--lr 1e-3 --momentum 0 --lr-schedule constant --warmup-epochs 0` exactly (batch 64, no weight decay).
DEFAULT_LR = 0.12
DEFAULT_DATA_DIR = Path("data")
DEFAULT_OUTPUT_DIR = Path("checkpoints")
DEFAULT_MOMENTUM = 0.9
DEFAULT_BATCH_SIZE = 64  # per process, when neither --batch-size nor --global-batch-size is given
DEFAULT_WARMUP_EPOCHS = 0.5  # when neither --warmup-steps nor --warmup-epochs is given
# --scale-lr's linear scaling rule (Goyal et al. 2017, arXiv:1706.02677): --lr is the rate for a global batch
# of this many images, and a global batch k times larger trains at k times the rate, after a warm-up.
REFERENCE_BATCH_SIZE = 64
LR_SCHEDULES = ("constant", "cosine", "onecycle")
MIXED_PRECISIONS = ("no", "fp16", "bf16")  # fp8 only from `accelerate config`/`accelerate launch`
# The validation metrics that --monitor may choose the best epoch by (EpochRecord's fields of the same names).
MONITORS = ("val_accuracy", "val_loss")
DEFAULT_MONITOR = "val_accuracy"
# The settings that choose by the validation split, and so need one (--val-size).
SELECTING = ("monitor", "early_stopping_patience")
RESUME_AUTO = "auto"  # continue from the newest state if there is one, else start fresh
RESUME_LATEST = "latest"  # continue from the newest state; refuse if there is none
# torch.Generator seeds are 64-bit; the shuffle seed is derived from (seed, epoch), so a seed fits in 32 bits.
MAX_SEED = 2**32 - 1

MAX_COUNT = 2**31 - 1  # batch sizes, epochs, step counts: beyond any real run, inside every index type
MAX_THREADS = 1024
# The largest float32: the model's weights are float32, and torch cannot apply a rate or decay beyond it.
MAX_FLOAT32 = 3.4028234663852886e38

COUNT = Bounds(0, MAX_COUNT, low_open=True)  # 1 or more
COUNT_OR_ZERO = Bounds(0, MAX_COUNT)
SEED = Bounds(0, MAX_SEED, requirement=f"between 0 and {MAX_SEED}", advice="pass a seed in range")


def _cpu_count() -> float:
    # PyTorch's DataLoader itself warns above the machine's CPU count; far above it, a machine stalls.
    return os.cpu_count() or 1


def _resume_refusal(value: str) -> Refusal | None:
    if value == "":
        return Refusal("got an empty value", "pass a state directory, `auto`, or --resume alone (the newest state)")
    return None


@dataclass(frozen=True)
class TrainConfig:
    """Everything `fmnist-dist train` needs; every field declares its flag (see `settings.declaration`).

    `batch_size` is per process and per micro-batch; `global_batch_size` is the images of one optimizer step
    across all processes and accumulation steps. At most one of them is set; with neither, the batch is
    DEFAULT_BATCH_SIZE per process.
    """

    data_dir: Path = setting(
        DEFAULT_DATA_DIR, "dataset root (torchvision's: FashionMNIST/raw holds the IDX files)", kind=PATH
    )
    download: bool = setting(
        True,
        "fail instead of downloading FashionMNIST when any of its files is missing",
        kind=SWITCH,
        flag="--no-download",
        scope=Scope.INVOCATION,
    )
    epochs: int = setting(5, "passes over the training set", kind=WHOLE, bounds=COUNT)
    batch_size: int | None = setting(
        None,
        f"images per process per micro-batch (default {DEFAULT_BATCH_SIZE}); the global batch grows with the "
        "number of processes",
        kind=WHOLE,
        bounds=COUNT,
        optional=True,
        excludes="global_batch_size",
    )
    global_batch_size: int | None = setting(
        None,
        "images per optimizer step across all processes and accumulation steps, split evenly: the same batches "
        "on any number of processes",
        kind=WHOLE,
        bounds=COUNT,
        optional=True,
    )
    eval_batch_size: int = setting(1000, "per process, for evaluation", kind=WHOLE, bounds=COUNT)
    val_size: int = setting(
        0,
        "training images held out as the validation split (chosen by --seed, never trained on): scored after every "
        "epoch, it chooses model-best.pth, and the test set is scored at the end of the run only; 0: no split, the "
        "test set after every epoch",
        kind=WHOLE,
        bounds=COUNT_OR_ZERO,
    )
    test_every_epoch: bool = setting(
        False,
        "with --val-size: score the test set after every epoch too, not only at the end of the run",
        kind=SWITCH,
    )
    monitor: str | None = setting(
        None,
        f"with --val-size: the validation metric that chooses the best epoch, kept as model-best.pth, and that "
        f"early stopping watches (default: {DEFAULT_MONITOR}); higher accuracy, lower loss is better",
        kind=TEXT,
        choices=MONITORS,
        optional=True,
    )
    early_stopping_patience: int | None = setting(
        None,
        "with --val-size: end the run after this many epochs in a row without a better value of --monitor (default: "
        "never)",
        kind=WHOLE,
        bounds=COUNT,
        optional=True,
    )
    lr: float = setting(
        DEFAULT_LR,
        "SGD learning rate (the tutorial's is 1e-3)",
        kind=NUMBER,
        bounds=Bounds(0, MAX_FLOAT32, low_open=True),
    )
    momentum: float = setting(
        DEFAULT_MOMENTUM,
        "SGD momentum (the tutorial's is 0)",
        kind=NUMBER,
        # At 1 or more the velocity never decays and training diverges.
        bounds=Bounds(
            0,
            1,
            high_open=True,
            requirement="at least 0 and below 1",
            advice="SGD momentum of 1 or more adds up every gradient without forgetting and diverges; pass a "
            "value such as 0.9",
        ),
    )
    weight_decay: float = setting(0.0, "SGD weight decay (L2)", kind=NUMBER, bounds=Bounds(0, MAX_FLOAT32))
    scale_lr: bool = setting(
        False,
        f"linear scaling rule: multiply --lr by global batch size / {REFERENCE_BATCH_SIZE} (with a warm-up)",
        kind=SWITCH,
    )
    lr_schedule: str = setting(
        "cosine",
        "after the warm-up: constant, cosine (CosineAnnealingLR to 0) or onecycle (OneCycleLR); the tutorial's is "
        "constant",
        kind=TEXT,
        choices=LR_SCHEDULES,
    )
    warmup_steps: int | None = setting(
        None,
        "optimizer steps of linear warm-up from lr/10 to lr",
        kind=WHOLE,
        bounds=COUNT_OR_ZERO,
        optional=True,
        excludes="warmup_epochs",
    )
    warmup_epochs: float | None = setting(
        None,
        f"linear warm-up over this many epochs (default: {DEFAULT_WARMUP_EPOCHS} unless --warmup-steps is given; "
        "fractions allowed; the tutorial's is 0)",
        kind=NUMBER,
        bounds=COUNT_OR_ZERO,
        optional=True,
    )
    seed: int = setting(0, "initial weights and the shuffling of every epoch", kind=WHOLE, bounds=SEED)
    threads: int | None = setting(
        None,
        "CPU threads per process (default: OMP_NUM_THREADS if set, as `accelerate launch` and torchrun set it for "
        "their processes; else the usable cores divided by the processes on this node)",
        kind=WHOLE,
        bounds=Bounds(0, MAX_THREADS, low_open=True),
        optional=True,
        scope=Scope.MACHINE,
    )
    num_workers: int = setting(
        0, "DataLoader worker processes", kind=WHOLE, bounds=Bounds(0, _cpu_count), scope=Scope.MACHINE
    )
    data_on_device: str = setting(
        "auto",
        "keep the dataset on the accelerator (auto: on for GPUs, off for the CPU)",
        kind=TEXT,
        choices=("auto", "on", "off"),
        scope=Scope.MACHINE,
    )
    output_dir: Path = setting(
        DEFAULT_OUTPUT_DIR, "model.pth, metrics.jsonl, plots, states", kind=PATH, scope=Scope.INVOCATION
    )
    overwrite: bool = setting(
        False,
        "start afresh in an --output-dir that holds an earlier run (its states, metrics and model are replaced)",
        kind=SWITCH,
        scope=Scope.INVOCATION,
        excludes="resume",
    )
    cpu: bool = setting(
        False, "train on the CPU (gloo across processes) even with a GPU", kind=SWITCH, scope=Scope.MACHINE
    )
    # What a device can run depends on the machine the run continues on.
    mixed_precision: str | None = setting(
        None,
        "default: what `accelerate config`/`accelerate launch` says",
        kind=TEXT,
        choices=MIXED_PRECISIONS,
        optional=True,
        scope=Scope.MACHINE,
    )
    gradient_accumulation_steps: int | None = setting(
        None, "default: what `accelerate launch` says, else 1", kind=WHOLE, bounds=COUNT, optional=True
    )
    log_every: int = setting(50, "log the train loss every N optimizer steps", kind=WHOLE, bounds=COUNT)
    checkpoint_every: int = setting(
        0,
        "also save a resumable state every N steps (0: only at the end of each epoch)",
        kind=WHOLE,
        bounds=COUNT_OR_ZERO,
    )
    keep_states: int = setting(2, "how many saved states to keep", kind=WHOLE, bounds=COUNT)
    resume: str | None = setting(
        None,
        "continue from the newest state in --output-dir, or from STATE_DIR; `--resume auto` also starts afresh when "
        "there is no state (the same command for the first start and every restart)",
        kind=TEXT,
        optional=True,
        scope=Scope.INVOCATION,
        nargs="?",
        const=RESUME_LATEST,
        metavar="auto|STATE_DIR",
        extra_check=_resume_refusal,
    )
    progress: bool = setting(
        True,
        "no progress bar (one line per epoch stays)",
        kind=SWITCH,
        flag="--no-progress",
        scope=Scope.INVOCATION,
    )
    tracker: str = setting("wandb", "where the run is tracked", kind=TEXT, choices=("wandb", "none"))
    wandb_project: str = setting("fmnist-dist", "W&B project", kind=TEXT)
    run_name: str | None = setting(None, "W&B run name (default: W&B picks one)", kind=TEXT, optional=True)
    run_group: str | None = setting(None, "W&B run group", kind=TEXT, optional=True)
    tags: tuple[str, ...] = setting((), "W&B run tags", kind=WORDS, nargs="+")
    log_samples_every_epoch: bool = setting(
        False,
        "log sample predictions and the confusion matrix after every epoch that scores the test set (with "
        "--val-size: the last, or every one with --test-every-epoch), not only at the end",
        kind=SWITCH,
    )
    log_model: bool = setting(False, "store the final model.pth as a W&B artifact", kind=SWITCH)
    profile_steps: int = setting(
        0,
        "profile N optimizer steps with torch.profiler, after a warm-up of 3: one trace per process under "
        "--output-dir/profile/, a table of the top operations, a W&B artifact (0: off; not carried over by "
        "--resume: give it again to profile a resumed run)",
        kind=WHOLE,
        bounds=COUNT_OR_ZERO,
        scope=Scope.INVOCATION,
    )

    def __post_init__(self) -> None:
        """Refuse any value its setting does not allow, then any two settings that exclude each other, then (for a
        new run) a choice by a validation split that is not there.

        Raises:
            UsageError: naming the flag, the value and what to pass instead.
        """
        for name, declared in SETTINGS.items():
            declared.check(flag_of(name), getattr(self, name))
        for one, other in EXCLUSIVE_PAIRS:
            # Both set (a zero warm-up beside the other warm-up flag says nothing and is allowed).
            if getattr(self, one) and getattr(self, other):
                raise UsageError(f"{flag_of(one)} and {flag_of(other)} exclude each other; pass only one of them")
        if self.resume is None:  # a resumed run may take its --val-size from its state: checked once it has
            self.check_choices_have_a_split()

    @classmethod
    def from_plain(cls, values: dict[str, Any]) -> TrainConfig:
        """The settings from plain values (argparse's, or JSON's: lists, path strings); the rest default.

        Raises:
            UsageError: a value its setting does not allow.
        """
        return cls(**{name: SETTINGS[name].kind.from_plain(value) for name, value in values.items()})

    @property
    def warmup_epochs_or_default(self) -> float:
        """`--warmup-epochs`; DEFAULT_WARMUP_EPOCHS when no warm-up flag is given; 0 beside `--warmup-steps`."""
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return 0.0 if self.warmup_steps is not None else DEFAULT_WARMUP_EPOCHS

    def check_choices_have_a_split(self) -> None:
        """Refuse `--monitor` or `--early-stopping-patience` without a validation split to choose by.

        A new run is checked as it is built; a resumed one once its settings are complete
        (`training.resume.plan_start`), since it takes its `--val-size` from its state.

        Raises:
            UsageError: naming the flag, and `--val-size` to pass.
        """
        for name in SELECTING:
            if getattr(self, name) is not None and not self.val_size:
                raise UsageError(
                    f"{flag_of(name)} needs a validation split to judge epochs by, and there is none; pass --val-size "
                    "N as well (N training images held out: the test set never chooses an epoch)"
                )

    @property
    def monitor_or_default(self) -> str:
        """`--monitor`, or DEFAULT_MONITOR when it is not given."""
        return self.monitor or DEFAULT_MONITOR

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (1 unless --gradient-accumulation-steps says otherwise)."""
        return self.gradient_accumulation_steps or 1

    def to_log(self) -> dict[str, Any]:
        """The settings as plain values, for W&B and the saved training state."""
        return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(self).items()}

    def resumed_from(self, saved: dict[str, Any], given: frozenset[str], state: Path) -> TrainConfig:
        """This invocation's settings for a resumed run: the state's run settings, except the flags given now.

        Every saved value of the run or of the machine not replaced by a flag passes the flags' checks first (on
        the machine that saved it, for the settings of that machine); the per-invocation ones are not used. Names
        that are not settings (another version's) are ignored.

        Args:
            saved: `to_log()` of the run being resumed, as its state holds it.
            given: the fields set explicitly on this command line.
            state: the state's directory, for the refusals.

        Raises:
            UsageError: a saved value no flag would take, or saved values that exclude each other; the message
                names the state and the setting.
        """
        values = {name: SETTINGS[name].kind.from_plain(value) for name, value in saved.items() if name in SETTINGS}
        for name, value in values.items():
            # Per-invocation settings are neither carried over nor compared: what the state says of them is unused
            # (and --overwrite, say, could not be passed with --resume to replace it).
            if name in given or SETTINGS[name].scope is Scope.INVOCATION:
                continue
            if refusal := SETTINGS[name].refusal(value, this_machine=SETTINGS[name].scope is Scope.RUN):
                raise UsageError(
                    f"--resume: the state {state} cannot be resumed: its saved setting {name} {refusal.problem}; "
                    f"pass {flag_of(name)} to replace it, or start afresh with --overwrite"
                )
        carried = {name: v for name, v in values.items() if name not in given and SETTINGS[name].scope is Scope.RUN}
        # A flag given now replaces the saved value of the flag it excludes (--global-batch-size a saved
        # --batch-size, say).
        for pair in EXCLUSIVE_PAIRS:
            for one, other in (pair, pair[::-1]):
                if one in given and getattr(self, one) is not None:
                    carried.pop(other, None)
        try:
            return replace(self, **carried)
        except UsageError as error:
            raise UsageError(
                f"--resume: the state {state} cannot be resumed with its saved settings: {error}"
            ) from None


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """`{name: (saved value, value now)}` for each setting of the run or of the machine that differs.

    Args:
        saved, now: `to_log()`-like records; a setting absent from `saved` (an older version's state) is skipped.
    """
    return {
        name: (saved[name], now[name])
        for name, declared in SETTINGS.items()
        if declared.scope is not Scope.INVOCATION
        and name in saved
        and declared.kind.from_plain(saved[name]) != declared.kind.from_plain(now[name])
    }


def flag_of(name: str) -> str:
    """The `train` flag of a TrainConfig field: its declared one, or `--` and the name with dashes."""
    return SETTINGS[name].flag or "--" + name.replace("_", "-")


SETTINGS: dict[str, Setting] = {f.name: setting_of(f) for f in fields(TrainConfig)}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(TrainConfig)}
# Settings given together are refused; on a resume, the one given now replaces the other's saved value.
EXCLUSIVE_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (name, declared.excludes) for name, declared in SETTINGS.items() if declared.excludes
)


def check_at_most(flag: str, value: float, limit: float) -> None:
    """Refuse a flag value above `limit`."""
    if value > limit:
        raise UsageError(f"{flag} must be at most {limit} (got {value}); pass a smaller value")
