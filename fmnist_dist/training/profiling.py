"""`--profile-steps N`: torch.profiler over N optimizer steps after a short warm-up, on every process.

The shape is Composer's profiler (`composer/profiler/`: `cyclic_schedule(skip_first, wait, warmup, active,
repeat)`, a trace per rank) and torchtitan's (`torchtitan/tools/profiling.py`: `maybe_enable_profiling`, a
`torch.profiler.profile` with a schedule around the training loop, `rank{N}_trace.json` per rank): one
`torch.profiler.profile` whose `schedule` skips PROFILE_WAIT_STEPS steps, traces PROFILE_WARMUP_STEPS more and
discards them (the profiler's own start-up costs, as torch.profiler's documentation advises), then records N.
Each process writes its trace as Chrome trace JSON, which Perfetto (ui.perfetto.dev), chrome://tracing and
TensorBoard's profiler plugin open; the main process prints the top operations and stores the traces with the
tracker. The run then goes on: the profiler only observes, and the weights are those of a run without it
(tests/test_profiling.py checks them bit for bit).

`--profile-steps` is a setting of the invocation: a resumed run profiles only when it is given again, from
where that run continues. When fewer steps than N are left after the warm-up, the profile covers those left
(and says so); when none are, nothing is profiled (and it says so).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.profiler import ProfilerActivity, profile, schedule

from fmnist_dist.recipe.position import TrainingPosition, steps_per_epoch
from fmnist_dist.runtime.collective_errors import fail_together
from fmnist_dist.storage.atomic_files import atomic_write
from fmnist_dist.storage.run_dir import PROFILE_TRACE, RunDirectory
from fmnist_dist.tracking.base import Tracker

PROFILE_WAIT_STEPS = 1  # an invocation's first step: lazy initialisation and first allocations, not typical
PROFILE_WARMUP_STEPS = 2  # traced and discarded: the profiler's own start-up would skew the first recorded step
TABLE_ROWS = 15  # the top operations the main process prints: one screen
# The device activities torch.profiler traces besides the CPU's, by device type.
DEVICE_ACTIVITIES = {"cuda": ProfilerActivity.CUDA, "xpu": ProfilerActivity.XPU}


def steps_left(position: TrainingPosition, epochs: int, global_batch: int, dataset_size: int) -> int:
    """Optimizer steps from `position` to the end of a run of `epochs` epochs (0 past its end)."""
    if position.epoch >= epochs:
        return 0
    this_epoch = steps_per_epoch(global_batch, dataset_size - position.samples_done)
    return this_epoch + (epochs - position.epoch - 1) * steps_per_epoch(global_batch, dataset_size)


def profiled_steps(asked: int, left: int) -> int:
    """How many of the `asked` steps are profiled when `left` optimizer steps are left in the run (the warm-up
    comes first)."""
    return max(0, min(asked, left - PROFILE_WAIT_STEPS - PROFILE_WARMUP_STEPS))


class StepProfiler:
    """torch.profiler over `steps` optimizer steps after the warm-up, from where the run stands now; a context
    around the training loop (every process enters it), whose `step()` follows every optimizer step.

    Args:
        accelerator: the job's Accelerator.
        tracker: where the traces are stored, as a "profile" artifact.
        output_dir: the run directory; the traces go to `RunDirectory.profile(first profiled step)`.
        global_step: optimizer steps trained before this invocation.
        steps: optimizer steps to record (after the warm-up), 1 or more.
    """

    def __init__(self, accelerator: Accelerator, tracker: Tracker, output_dir: Path, global_step: int, steps: int):
        self.accelerator = accelerator
        self.tracker = tracker
        self.run_dir = RunDirectory(output_dir)
        self.first_step = global_step + PROFILE_WAIT_STEPS + PROFILE_WARMUP_STEPS + 1
        self.steps = steps
        self._traced = self._saved = False
        self._steps_done = 0  # optimizer steps since the profiler started
        self._profile = profile(
            activities=[ProfilerActivity.CPU, *self._device_activities()],
            schedule=schedule(wait=PROFILE_WAIT_STEPS, warmup=PROFILE_WARMUP_STEPS, active=steps, repeat=1),
            on_trace_ready=self._trace_ready,
            record_shapes=True,
        )

    @property
    def directory(self) -> Path:
        """Where every process writes its trace."""
        return self.run_dir.profile(self.first_step)

    def __enter__(self) -> StepProfiler:
        """Start profiling (an earlier profile from the same step stays until this one is written)."""
        self._profile.start()
        return self

    def step(self) -> None:
        """Mark the end of an optimizer step; after the last recorded one, save and report the profile."""
        if self._saved:
            return
        self._steps_done += 1
        self._profile.step()  # past the last recorded step, the schedule calls `_trace_ready`
        if self._traced:
            self._profile.stop()
            self._save()

    def __exit__(self, error_type: type[BaseException] | None, *_: object) -> None:
        """Stop the profiler if it still runs. A run that ends normally while steps are recorded (say, by early
        stopping) saves what there is; one that ends by an error (a stop signal, divergence) saves nothing, as
        the processes may not all be here."""
        if self._saved:
            return
        self._profile.stop()
        if self._traced and error_type is None:
            self._save()

    def _trace_ready(self, _: profile) -> None:
        self._traced = True

    def _save(self) -> None:
        """Write this process's trace, then (main process) print the top operations and store the traces."""
        self._saved = True
        trace = self.run_dir.profile_trace(self.first_step, self.accelerator.process_index)
        with fail_together(self.accelerator):  # every process has written its trace after this
            _export_trace(self._profile, trace)
        with fail_together(self.accelerator):
            if self.accelerator.is_main_process:
                self._remove_earlier_traces()
        self.accelerator.print(self._report())
        self.tracker.log_artifact(self.directory, "profile")

    def _remove_earlier_traces(self) -> None:
        """Delete the traces an earlier profile from the same step left for processes this job does not have
        (each process's own trace has replaced its earlier one, atomically), so that every trace in the
        directory is this profile's; nothing is deleted before the new traces are written."""
        ours = {self.run_dir.profile_trace(self.first_step, rank) for rank in range(self.accelerator.num_processes)}
        for earlier in set(self.directory.glob(PROFILE_TRACE.format(rank="*"))) - ours:
            earlier.unlink()

    def _report(self) -> str:
        device = self.accelerator.device.type
        recorded = min(self.steps, self._steps_done - PROFILE_WAIT_STEPS - PROFILE_WARMUP_STEPS)
        sort_by = f"self_{device}_time_total" if device in DEVICE_ACTIVITIES else "self_cpu_time_total"
        table = self._profile.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS, max_name_column_width=40)
        last = self.first_step + recorded - 1
        steps = f"step {last}" if recorded == 1 else f"steps {self.first_step}-{last}"
        return (
            f"fmnist-dist: profiled optimizer {steps} on every "
            f"process; one trace per process in {self.directory} (open it in https://ui.perfetto.dev); the main "
            f"process's top {TABLE_ROWS} operations by {sort_by}:\n{table}"
        )

    def _device_activities(self) -> list[ProfilerActivity]:
        activity = DEVICE_ACTIVITIES.get(self.accelerator.device.type)
        return [activity] if activity is not None and activity in torch.profiler.supported_activities() else []


def _export_trace(recorded: profile, path: Path) -> None:
    """The recorded steps as Chrome trace JSON at `path`, written atomically (torch writes to a path of its own
    choosing, so the trace is exported to a temporary file first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fmnist-dist-profile-") as tmp:
        exported = Path(tmp) / path.name
        recorded.export_chrome_trace(str(exported))
        with exported.open("rb") as source:
            atomic_write(path, lambda target: shutil.copyfileobj(source, target))


def step_profiler(
    accelerator: Accelerator, tracker: Tracker, output_dir: Path, asked: int, global_step: int, left: int
) -> StepProfiler | None:
    """The profiler `--profile-steps asked` wants with `left` optimizer steps left in the run; None when it is 0
    or nothing is left to profile after the warm-up (said in one line). Says so when fewer steps are profiled."""
    if not asked:
        return None
    steps = profiled_steps(asked, left)
    warm_up = PROFILE_WAIT_STEPS + PROFILE_WARMUP_STEPS
    if steps == 0:
        accelerator.print(
            f"fmnist-dist: --profile-steps {asked}: nothing profiled: {left} optimizer step(s) are left in the run, "
            f"and the profiler's warm-up takes the first {warm_up}"
        )
        return None
    if steps < asked:
        accelerator.print(
            f"fmnist-dist: --profile-steps {asked}: profiling {steps} optimizer step(s), all that are left in the "
            f"run after the profiler's warm-up of {warm_up}"
        )
    return StepProfiler(accelerator, tracker, output_dir, global_step, steps)
