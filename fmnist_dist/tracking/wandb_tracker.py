"""Run tracking on Weights & Biases, through Accelerate's tracker API.

Tracking must never stop training: without W&B credentials (found the way wandb itself finds them), or when
the W&B server cannot be reached within INIT_TIMEOUT_SECONDS, the run is recorded offline (upload it later with
`wandb sync`); a tracker that fails to start or to log is reported once and then left out. A setting wandb
rejects (a W&B flag, or a WANDB_* variable) is named in that one line; an unusable WANDB_INIT_TIMEOUT is ignored
with a warning. wandb never prompts for a key here: the credentials are looked up before `wandb.init`, which then
runs online only with them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from fmnist_dist.errors import first_line
from fmnist_dist.recipe.model import CLASSES
from fmnist_dist.runtime.stop_signals import PREEMPTED_EXIT_CODE
from fmnist_dist.tracking.base import RunSpec, Tracker, warn

WANDB = "wandb"
OFFLINE = "offline"
# WANDB_MODE values that need the W&B server (unset means online too).
ONLINE_MODES = frozenset({"online", "run", "shared"})
# How long wandb.init may wait for the W&B server (wandb's own default is 90 s) before the run is recorded offline
# instead. A working connection starts a run in a few seconds; WANDB_INIT_TIMEOUT (wandb's variable) overrides it.
INIT_TIMEOUT_SECONDS = 10.0
# The wandb.init arguments our flags set: the flag, and the wandb setting each one becomes.
FLAG_SETTINGS = {
    "project": ("--wandb-project", "project"),
    "name": ("--run-name", "run_name"),
    "group": ("--run-group", "run_group"),
    "tags": ("--tags", "run_tags"),
}


def choose_wandb_mode() -> str:
    """The mode to start the W&B run in (after `prepare_wandb`): offline unless online was asked for (or left
    unset) and wandb finds credentials; the user's own WANDB_MODE otherwise. Says so when a mode asked for cannot
    be had."""
    asked = os.environ.get("WANDB_MODE") or None  # empty counts as unset
    if asked is not None and asked not in ONLINE_MODES:
        return asked
    try:
        if has_wandb_credentials():
            return asked or "online"
    except Exception as error:
        warn(f"W&B credentials are unusable ({first_line(error)}); recording the run offline")
        return OFFLINE
    if asked is not None:
        warn(
            f"WANDB_MODE={asked} but no W&B credentials were found (run `wandb login` or set WANDB_API_KEY); "
            "recording the run offline"
        )
    return OFFLINE


def prepare_wandb() -> None:
    """Bound how long starting an online run can take, before wandb is first used in this process.

    `init_timeout` bounds wandb.init's wait for the server (unless WANDB_INIT_TIMEOUT says otherwise).
    `x_disable_viewer` skips the account lookup wandb makes to greet a logged-in user: it is bounded by a fixed
    5 s per try, tried twice, whatever init_timeout says, and changes nothing about the run (an experimental
    setting, so tests/test_wandb_credentials.py times the whole start).
    """
    import wandb

    ignore_unusable_init_timeout()
    settings: dict[str, Any] = {"x_disable_viewer": True}
    if wandb.env.INIT_TIMEOUT not in os.environ:
        settings["init_timeout"] = INIT_TIMEOUT_SECONDS
    wandb.setup(settings=wandb.Settings(**settings))


def ignore_unusable_init_timeout() -> None:
    """Drop a WANDB_INIT_TIMEOUT that is not a positive, finite number of seconds, with one warning, so that
    INIT_TIMEOUT_SECONDS applies: wandb rejects a non-number at every setup, and takes 0 or less without a word,
    after which its service never gives up on the server and the job hangs at exit, deaf to SIGTERM."""
    import wandb

    value = os.environ.get(wandb.env.INIT_TIMEOUT)
    if value is None or _is_positive_seconds(value):
        return
    warn(
        f"{wandb.env.INIT_TIMEOUT}={value!r} is not a positive number of seconds; ignoring it "
        f"(W&B waits up to {INIT_TIMEOUT_SECONDS:g} s for its server)"
    )
    del os.environ[wandb.env.INIT_TIMEOUT]  # wandb reads the environment again at each setup


def _is_positive_seconds(value: str) -> bool:
    import wandb

    try:
        seconds = wandb.Settings.model_validate({"init_timeout": value}).init_timeout  # as wandb parses the variable
    except ValueError:  # pydantic's ValidationError
        return False
    return 0 < seconds < math.inf


def has_wandb_credentials() -> bool:
    """Whether wandb finds credentials for its server, as `wandb.init` would, without asking or going online.

    wandb looks in WANDB_API_KEY, its settings files and the .netrc entry `wandb login` wrote (for the host it
    uses now), in that order. `prompt=False` never asks; `verify=False` does not contact the server.

    Raises:
        wandb.errors.AuthenticationError: a key is there but malformed.
    """
    import wandb

    return wandb.login(prompt=False, verify=False)


def rejected_setting(init_args: dict[str, Any]) -> str | None:
    """Which setting wandb rejects, and why: one of our flags (given as `wandb.init` arguments) or a WANDB_*
    environment variable; None when wandb takes them all."""
    return rejected_flag(init_args) or rejected_variable()


def rejected_flag(init_args: dict[str, Any]) -> str | None:
    """Which of our W&B flags wandb rejects, and why, by the checks of wandb.Settings that wandb.init runs."""
    import wandb

    for arg, (flag, setting) in FLAG_SETTINGS.items():
        if init_args.get(arg) is not None:
            reason = _rejection(wandb.Settings, **{setting: init_args[arg]})
            if reason is not None:
                return f"{flag} is invalid: {reason}"
    return None


def rejected_variable() -> str | None:
    """Which WANDB_* environment variable wandb rejects, and why, read one by one as wandb's setup reads them."""
    import wandb

    for name, value in sorted(os.environ.items()):
        if name.startswith("WANDB_"):
            reason = _rejection(wandb.Settings().update_from_env_vars, {name: value})
            if reason is not None:
                return f"{name}={value!r} is invalid: {reason}"
    return None


def _rejection(check: Callable[..., object], *args: Any, **kwargs: Any) -> str | None:
    try:
        check(*args, **kwargs)
    except Exception as error:
        return wandb_error_reason(error)
    return None


def wandb_error_reason(error: BaseException) -> str:
    """One line on why wandb failed; for a pydantic ValidationError its first error, since its first line only
    counts them ("1 validation error for Settings")."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        detail = error.errors()[0]
        return f"{'.'.join(map(str, detail['loc']))}: {detail['msg']}"
    return first_line(error)


class WandbTracker(Tracker):
    """The run on W&B, through Accelerate's tracker API (which starts and logs it on the main process only)."""

    log_with = WANDB

    def __init__(self, accelerator: Accelerator) -> None:
        super().__init__(accelerator)
        self._exit_code: int | None = None  # the run's exit code: wandb's own (0) unless it was preempted

    def start(self, run: RunSpec) -> str | None:
        """Start the job's one W&B run; return its id (None where no run started, and off the main process).

        An online run that cannot start (a wrong key, no network: wandb gives up after its init timeout) is
        recorded offline instead; one that cannot start for a setting wandb rejects is not tracked.
        """
        if not self.accelerator.log_with:
            return None
        kwargs = init_kwargs(run)
        mode = OFFLINE  # wandb starts on the main process only
        try:  # everything wandb does to start, its reading of the settings included
            if self.accelerator.is_main_process:
                prepare_wandb()
                mode = choose_wandb_mode()
            self._init(run, {**kwargs, "mode": mode})
        except Exception as error:
            rejected = rejected_setting({"project": run.project, **kwargs})
            if rejected is None and mode in ONLINE_MODES:
                warn(
                    f"W&B could not start {mode} ({wandb_error_reason(error)}); recording the run offline instead "
                    "(`wandb sync` uploads it later)"
                )
                return self._start_offline(run, kwargs)
            # Offline, a mode of the user's own, or a setting offline would reject too: nothing else to try.
            self._drop(f"W&B could not start ({rejected or wandb_error_reason(error)})")
            return None
        return self._run_id()

    def _start_offline(self, run: RunSpec, kwargs: dict[str, Any]) -> str | None:
        """Start the run offline after an online start failed; return its id."""
        try:
            self._init(run, {**kwargs, "mode": OFFLINE})
        except Exception as error:
            self._drop(f"W&B could not start offline either ({wandb_error_reason(error)})")
            return None
        return self._run_id()

    def _init(self, run: RunSpec, kwargs: dict[str, Any]) -> None:
        self._close()  # a failed start leaves its tracker in the list
        if run.sweep_id is None:
            self.accelerator.init_trackers(run.project, config=run.config, init_kwargs={WANDB: kwargs})
            return
        # A sweep's trial. Its agent's environment names the run and the sweep's project, and wandb.init ignores
        # others with a warning: hence None for the project, which Accelerate passes on as wandb.init's. wandb.init
        # also puts the sweep's parameters in the run's config, locked: a later update of one is ignored, with a
        # warning. So the settings go to wandb.init, as the defaults the parameters override (W&B's way for
        # sweeps); they agree anyway, the parameters being the trial's flags.
        self.accelerator.init_trackers(None, init_kwargs={WANDB: {**kwargs, "config": run.config}})

    def _run_id(self) -> str | None:
        run = self._run()
        return run.id if run is not None else None

    def _run(self) -> Any | None:
        """The live wandb run on the main process, else None."""
        if not self.accelerator.is_main_process or not self.accelerator.trackers:
            return None
        return self.accelerator.get_tracker(WANDB, unwrap=True)

    def log_values(self, values: Mapping[str, Any], step: int) -> None:
        """Log scalars or media at `step`; a failing tracker is dropped instead of failing the job."""
        if not self.accelerator.trackers:
            return
        try:
            self.accelerator.log(dict(values), step=step)
        except Exception as error:
            self._drop(f"W&B logging failed ({first_line(error)})")

    def log_predictions(
        self, images: torch.Tensor, predictions: torch.Tensor, targets: torch.Tensor, step: int
    ) -> None:
        """A W&B table of the sample images with predicted and true labels, and W&B's confusion matrix plot."""
        if self._run() is None:
            return
        import wandb

        table = wandb.Table(columns=["image", "predicted", "true"])
        # The images are the test set's first few: the predictions and targets of the rest have no row.
        for image, predicted, true in zip(images, predictions, targets, strict=False):
            table.add_data(wandb.Image(image.squeeze(0).cpu().numpy()), CLASSES[predicted], CLASSES[true])
        confusion = wandb.plot.confusion_matrix(
            y_true=targets.tolist(), preds=predictions.tolist(), class_names=list(CLASSES)
        )
        self.log_values({"test/predictions": table, "test/confusion_matrix": confusion}, step)

    def log_artifact(self, path: Path, kind: str) -> None:
        """Attach the file, or the directory's files, to the run as one W&B artifact of type `kind`, named after
        the run (W&B numbers the versions of a name: a second profile of the run is version v1)."""
        run = self._run()
        if run is None:
            return
        import wandb

        try:
            # Artifact names allow letters, digits, '-', '_' and '.'; run names (from --run-name) allow anything.
            name = re.sub(r"[^\w.-]", "-", f"{run.name or run.id}-{kind}")
            artifact = wandb.Artifact(name, type=kind)
            if path.is_dir():
                artifact.add_dir(str(path))
            else:
                artifact.add_file(str(path))
            run.log_artifact(artifact)
        except Exception as error:
            warn(f"W&B could not store {path} as an artifact ({first_line(error)})")

    def mark_preempted(self) -> None:
        """The run shows as preempted on W&B, not as failed or finished: marked preempting now, and ended by
        `finish` with the job's exit code, 75. W&B takes a run that ends with 0 for a finished one, and requeues a
        preempted sweep trial only after a non-zero code ("Signal handling and sweep runs", W&B's docs)."""
        run = self._run()
        if run is not None:
            with contextlib.suppress(Exception):  # tracking never fails training; the run is closed next anyway
                run.mark_preempting()
            self._exit_code = PREEMPTED_EXIT_CODE

    def finish(self) -> None:
        """Close the run, as `Accelerator.end_training` would (a no-op where no tracker runs), with exit code 75
        after `mark_preempted`; the process group is closed as the process leaves the job
        (`runtime.job_exit.leave_job`)."""
        try:
            run = self._run()
            if run is not None:  # Accelerate's own finish passes no exit code; a finished run ignores it
                run.finish(exit_code=self._exit_code)
            for tracker in self.accelerator.trackers:
                tracker.finish()
        except Exception as error:
            warn(f"W&B did not close cleanly ({first_line(error)})")
        self.accelerator.trackers = []

    def _drop(self, reason: str) -> None:
        self._close()
        warn(f"{reason}; training goes on without W&B tracking")

    def _close(self) -> None:
        for tracker in self.accelerator.trackers:
            with contextlib.suppress(Exception):  # close a half-started run; there may be none to close
                tracker.finish()
        self.accelerator.trackers = []


def init_kwargs(run: RunSpec) -> dict[str, Any]:
    """wandb.init arguments: the run's name, group and tags, and the saved run id so a resumed job continues the
    same run (a sweep's trial continues the run its agent names, which is the one its state saved)."""
    kwargs: dict[str, Any] = {"name": run.name, "group": run.group, "tags": list(run.tags) or None}
    if run.resume_id:
        kwargs.update(id=run.resume_id if run.sweep_id is None else None, resume="allow")
    return {key: value for key, value in kwargs.items() if value is not None}
