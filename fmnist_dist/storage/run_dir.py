"""The files of a training run's output directory (`--output-dir`): every name under it is declared here once.

<output-dir>/
    model.pth                   final weights (plain state_dict)
    model-best.pth              with --val-size: the weights of the best epoch by --monitor (plain state_dict)
    metrics.jsonl               one epoch record per line
    curves.png, confusion.png   plots drawn from metrics.jsonl
    .fmnist-dist.lock           flock-ed by the job that owns the directory, which it names while it holds it
    .fmnist-dist.lock-gate      flock-ed briefly while a job takes the lock or reads who holds it
    state/
        step-000000120/         a complete resumable state (Accelerate's files + progress.json; with --val-size,
                                model-best.pth as it stood: a hard link, or a copy where links are not possible)
        .tmp-step-000000140/    a state being written (renamed to .complete-step-... once complete)
        .complete-step-000000140/  a complete state about to take its step-... name (replacing an older state of
                                the same step): resumable, and newer than that older state
        .trash-step-000000100/  a state being deleted (renamed first, so no part of it keeps a state's name)
    profile/
        step-000000004/         --profile-steps: the profile of the optimizer steps from this one on
            rank0.pt.trace.json     one trace per process (Chrome trace JSON: Perfetto, chrome://tracing, TensorBoard)
    sweep-<sweep id>/
        <run id>/               a W&B sweep trial's own run directory (all of the above), named by its W&B run id
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_OUTPUT_DIR = Path("checkpoints")
MODEL_FILE = "model.pth"
BEST_MODEL_FILE = "model-best.pth"
METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion.png"
LOCK_FILE = ".fmnist-dist.lock"
LOCK_GATE_FILE = ".fmnist-dist.lock-gate"
STATES_DIR = "state"
PROGRESS_FILE = "progress.json"  # in each state: the loop's own progress beside Accelerate's files
# The model's weights in a state that Accelerate's save_state wrote (its SAFE_WEIGHTS_NAME; accelerate is not
# imported here, to keep `plot` quick).
STATE_WEIGHTS_FILE = "model.safetensors"
STATE_PREFIX = "step-"
TMP_PREFIX = ".tmp-"  # a state being written
COMPLETE_PREFIX = ".complete-"  # a complete state not yet under its final name
TRASH_PREFIX = ".trash-"  # a state being deleted
PROFILES_DIR = "profile"
PROFILE_TRACE = "rank{rank}.pt.trace.json"  # TensorBoard's profiler plugin reads files ending in .pt.trace.json
STATE_NAME = re.compile(rf"{STATE_PREFIX}\d{{9,}}")  # the step, zero-padded to 9 digits
SWEEP_PREFIX = "sweep-"  # the trials of one W&B sweep, each in its own run directory


@dataclass(frozen=True)
class RunDirectory:
    """The paths of one run's output directory; nothing is created or read by building one."""

    root: Path

    @property
    def model(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def best_model(self) -> Path:
        return self.root / BEST_MODEL_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def curves(self) -> Path:
        return self.root / CURVES_FILE

    @property
    def confusion(self) -> Path:
        return self.root / CONFUSION_FILE

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def lock_gate(self) -> Path:
        return self.root / LOCK_GATE_FILE

    @property
    def states(self) -> Path:
        return self.root / STATES_DIR

    def state(self, global_step: int) -> Path:
        """The complete state saved at optimizer step `global_step`."""
        return self.states / f"{STATE_PREFIX}{global_step:09d}"

    @property
    def profiles(self) -> Path:
        return self.root / PROFILES_DIR

    def profile(self, first_step: int) -> Path:
        """The traces of a profile whose first profiled optimizer step is `first_step`."""
        return self.profiles / f"{STATE_PREFIX}{first_step:09d}"

    def profile_traces(self) -> list[Path]:
        """Every process's trace of every profile (`--profile-steps`) in the directory, in step order."""
        return sorted(self.profiles.glob(f"{STATE_PREFIX}*/{PROFILE_TRACE.format(rank='*')}"))

    def profile_trace(self, first_step: int, process_index: int) -> Path:
        """Process `process_index`'s trace of the profile from optimizer step `first_step`."""
        return self.profile(first_step) / PROFILE_TRACE.format(rank=process_index)

    def results(self) -> tuple[Path, ...]:
        """The files that show a finished or running run is here (besides its states)."""
        return (self.metrics, self.model, self.best_model)


def sweep_trial_dir(output_dir: Path, sweep_id: str, run_id: str) -> Path:
    """The run directory of a W&B sweep's trial: `<output_dir>/sweep-<sweep_id>/<run_id>`."""
    return output_dir / f"{SWEEP_PREFIX}{sweep_id}" / run_id


def is_state_name(name: str) -> bool:
    """Whether `name` is one fmnist-dist gives a complete state (`step-` and at least 9 digits)."""
    return STATE_NAME.fullmatch(name) is not None


def tmp_state(state: Path) -> Path:
    """Where the state `state` is written before it is renamed into place."""
    return state.with_name(f"{TMP_PREFIX}{state.name}")


def complete_state(state: Path) -> Path:
    """Where the state `state` waits, complete, to be renamed into place."""
    return state.with_name(f"{COMPLETE_PREFIX}{state.name}")


def trash_state(state: Path) -> Path:
    """Where the state `state` (or its `.complete-` form) is renamed to be deleted."""
    return state.with_name(f"{TRASH_PREFIX}{final_state(state).name}")


def final_state(path: Path) -> Path:
    """The `step-N` path of a state under any of its names (`step-N`, `.tmp-step-N`, `.complete-step-N`, ...)."""
    return path.with_name(path.name[path.name.index(STATE_PREFIX) :])


def is_complete_state_name(name: str) -> bool:
    """Whether `name` is one a complete state has: `step-N`, or `.complete-step-N` before it takes that name."""
    return is_state_name(name.removeprefix(COMPLETE_PREFIX))


def is_unfinished_state_name(name: str) -> bool:
    """Whether `name` is a `.tmp-step-*` or `.trash-step-*` directory that an interrupted save or deletion left."""
    return any(
        name.startswith(prefix) and is_state_name(name.removeprefix(prefix)) for prefix in (TMP_PREFIX, TRASH_PREFIX)
    )
