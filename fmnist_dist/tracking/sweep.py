"""A training job that a W&B sweep agent started: one trial of the sweep (launch/sweep.yaml).

`wandb agent SWEEP` asks the W&B server for a trial, then runs the sweep's command with the trial's parameters as
flags (`--lr=0.05`) and, in its environment, the sweep's id and the trial's W&B run id (WANDB_SWEEP_ID,
WANDB_RUN_ID; also WANDB_SWEEP_PARAM_PATH and WANDB_DIR). `accelerate launch` passes that environment to every
process it starts, so every process finds the same trial here, and with it the same run directory:
`<--output-dir>/sweep-<sweep id>/<run id>/` (`storage.run_dir.sweep_trial_dir`). Trials of one sweep never share a
directory; a trial the agent runs again under its run id (W&B requeues a preempted trial) finds its own states
there, which `--resume auto` in the sweep's command continues. The trial's W&B run is the one the agent named:
wandb.init takes its id, project and sweep from the same environment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from fmnist_dist.errors import UsageError
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.run_dir import sweep_trial_dir
from fmnist_dist.tracking.wandb_tracker import WANDB

# wandb.env.SWEEP_ID and wandb.env.RUN_ID, named here so that a job outside a sweep need not import wandb to look.
SWEEP_ID_VARIABLE = "WANDB_SWEEP_ID"
RUN_ID_VARIABLE = "WANDB_RUN_ID"
# What an id may hold to name a directory: W&B's ids are 8 lowercase letters and digits.
DIRECTORY_NAME = re.compile(r"[\w.-]+")


@dataclass(frozen=True)
class SweepTrial:
    """One trial of a W&B sweep.

    Attributes:
        sweep_id: the sweep's id (WANDB_SWEEP_ID, as `wandb agent` sets it: without entity and project).
        run_id: the trial's W&B run id (WANDB_RUN_ID).
    """

    sweep_id: str
    run_id: str

    def run_directory(self, output_dir: Path) -> Path:
        """Where this trial writes: its own directory under `output_dir` (`--output-dir`)."""
        return sweep_trial_dir(output_dir, self.sweep_id, self.run_id)


def sweep_trial(environ: Mapping[str, str]) -> SweepTrial | None:
    """The sweep trial the environment of a `wandb agent` names; None outside one (WANDB_RUN_ID alone, which a
    user may set to name a run, is no sweep).

    Raises:
        UsageError: an id that cannot name a directory.
    """
    sweep_id, run_id = environ.get(SWEEP_ID_VARIABLE), environ.get(RUN_ID_VARIABLE)
    if sweep_id is None or run_id is None:
        return None
    for variable, value in ((SWEEP_ID_VARIABLE, sweep_id), (RUN_ID_VARIABLE, run_id)):
        if not DIRECTORY_NAME.fullmatch(value) or value in (".", ".."):
            raise UsageError(
                f"{variable}={value!r} cannot name a trial's directory under --output-dir (letters, digits, '_', "
                "'-' and '.' only); `wandb agent` sets it to a W&B id: unset it outside a sweep agent"
            )
    return SweepTrial(sweep_id, run_id)


def as_sweep_trial(cfg: TrainConfig, environ: Mapping[str, str]) -> tuple[TrainConfig, SweepTrial | None]:
    """The settings of this job as the sweep trial the environment names: writing to the trial's own directory
    under `--output-dir`; unchanged outside a sweep agent.

    Raises:
        UsageError: a trial that would not be tracked on W&B (`--tracker none`: the sweep would never see its
            result), or an id that cannot name a directory.
    """
    trial = sweep_trial(environ)
    if trial is None:
        return cfg, None
    if cfg.tracker != WANDB:
        raise UsageError(
            f"this job is trial {trial.run_id} of the W&B sweep {trial.sweep_id} ({SWEEP_ID_VARIABLE} is set, as "
            f"`wandb agent` sets it), whose result only W&B can report to the sweep: drop --tracker {cfg.tracker} "
            "from the sweep's command"
        )
    return replace(cfg, output_dir=trial.run_directory(cfg.output_dir)), trial


def describe_trial(trial: SweepTrial, run_directory: Path) -> str:
    """The line the main process prints as a trial starts."""
    return f"fmnist-dist: W&B sweep {trial.sweep_id}, trial {trial.run_id}: writing to {run_directory}"
