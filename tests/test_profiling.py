"""`--profile-steps N`: the profiler only observes (the weights equal a run without it, bit for bit), profiles
what is left when fewer than N steps are, writes a trace per process that Chrome/Perfetto read, prints the top
operations once, and stores the traces with the W&B run."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator, PartialState
from conftest import TRAIN_SIZE, launch_cli, train_args
from test_tracking import TrackedJob

from fmnist_dist.recipe.model import plain_state_dict
from fmnist_dist.recipe.position import TrainingPosition
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.output_dir import remove_earlier_run
from fmnist_dist.storage.run_dir import RunDirectory
from fmnist_dist.tracking.null_tracker import NullTracker
from fmnist_dist.training.build import build_run
from fmnist_dist.training.profiling import StepProfiler, profiled_steps, steps_left
from fmnist_dist.training.resume import plan_start

BATCH = 32
STEPS = math.ceil(TRAIN_SIZE / BATCH)  # 32 per epoch
WARM_UP = 3  # the invocation's first step, then the profiler's 2 warm-up steps
TABLE_HEADER = "Self CPU %"


def trace_events(path: Path) -> list[dict]:
    """The events of a Chrome trace JSON file (what Perfetto and chrome://tracing open)."""
    return json.loads(path.read_text())["traceEvents"]


def profiler_steps(path: Path) -> list[str]:
    """The names of the optimizer steps a trace recorded: torch.profiler marks each as ProfilerStep#N, N counted
    from 0 at the invocation's first step."""
    return sorted({e["name"] for e in trace_events(path) if e.get("name", "").startswith("ProfilerStep#")})


@pytest.mark.parametrize(
    ("asked", "left", "profiled"),
    [(2, 100, 2), (10, 13, 10), (10, 12, 9), (10, 4, 1), (10, 3, 0), (1, 0, 0)],
)
def test_the_profiler_takes_the_steps_asked_or_those_left_after_its_warm_up(
    asked: int, left: int, profiled: int
) -> None:
    assert profiled_steps(asked, left) == profiled


def test_the_steps_left_count_the_rest_of_the_epoch_and_the_epochs_after_it() -> None:
    assert steps_left(TrainingPosition(), epochs=2, global_batch=BATCH, dataset_size=TRAIN_SIZE) == 2 * STEPS
    mid_epoch = TrainingPosition(epoch=0, samples_done=992, global_step=31)  # 11 images left: one short step
    assert steps_left(mid_epoch, epochs=2, global_batch=BATCH, dataset_size=TRAIN_SIZE) == 1 + STEPS
    assert steps_left(TrainingPosition(epoch=1, samples_done=TRAIN_SIZE), 2, BATCH, TRAIN_SIZE) == 0
    assert steps_left(TrainingPosition(epoch=3), 2, BATCH, TRAIN_SIZE) == 0  # resumed with fewer --epochs


def train_in_process(data_dir: Path, output_dir: Path, profile_steps: int) -> tuple[dict[str, torch.Tensor], str]:
    """One epoch trained in this process; its final weights and what it printed."""
    cfg = TrainConfig(
        data_dir=data_dir,
        download=False,
        output_dir=output_dir,
        epochs=1,
        batch_size=BATCH,
        cpu=True,
        tracker="none",
        progress=False,
        profile_steps=profile_steps,
    )
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        run = build_run(plan_start(cfg, given=frozenset()))
        run.trainer.fit()
    return plain_state_dict(run.accelerator, run.model), printed.getvalue()


def test_a_profiled_run_trains_the_same_weights_and_profiles_the_steps_that_are_left(
    data_dir: Path, tmp_path: Path
) -> None:
    plain, _ = train_in_process(data_dir, tmp_path, profile_steps=0)
    profiled, printed = train_in_process(data_dir, tmp_path / "profiled", profile_steps=100)

    assert plain.keys() == profiled.keys()
    assert all(torch.equal(plain[key], profiled[key]) for key in plain)
    left = STEPS - WARM_UP
    assert f"--profile-steps 100: profiling {left} optimizer step(s), all that are left in the run" in printed
    assert f"profiled optimizer steps {WARM_UP + 1}-{STEPS} on every process" in printed
    trace = RunDirectory(tmp_path / "profiled").profile_trace(first_step=WARM_UP + 1, process_index=0)
    assert len(profiler_steps(trace)) == left


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_each_write_a_trace_and_the_run_stores_them_on_wandb(data_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    flags = ["--cpu", "--epochs", "1", "--tracker", "wandb", "--no-progress", "--profile-steps", "2"]
    result = launch_cli(train_args(data_dir, output_dir, *flags), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    profile = RunDirectory(output_dir).profile(first_step=WARM_UP + 1)
    for rank in (0, 1):  # each process's own trace of the same two steps
        events = trace_events(RunDirectory(output_dir).profile_trace(WARM_UP + 1, rank))
        assert {e["name"] for e in events if e.get("name", "").startswith("aten::addmm")}
        assert profiler_steps(profile / f"rank{rank}.pt.trace.json") == ["ProfilerStep#3", "ProfilerStep#4"]
    assert result.stdout.count(TABLE_HEADER) == 1  # the main process's table only
    assert "profiled optimizer steps 4-5 on every process" in result.stdout
    (artifact,) = [a for a in TrackedJob(result, tmp_path, output_dir).artifacts() if a.type == "profile"]
    assert sorted(entry.path for entry in artifact.manifest.contents) == ["rank0.pt.trace.json", "rank1.pt.trace.json"]


def earlier_profile(output_dir: Path, first_step: int) -> list[Path]:
    """Traces an earlier 2-process profile from `first_step` left in `output_dir`."""
    traces = [RunDirectory(output_dir).profile_trace(first_step, rank) for rank in (0, 1)]
    for trace in traces:
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text('{"traceEvents": []}')
    return traces


def test_a_profile_that_is_never_written_leaves_the_earlier_one_from_its_step(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    profiler = StepProfiler(accelerator, NullTracker(accelerator), tmp_path, global_step=0, steps=5)
    traces = earlier_profile(tmp_path, profiler.first_step)

    with pytest.raises(RuntimeError, match="the run fails"), profiler:
        profiler.step()
        raise RuntimeError("the run fails before the profiled steps")

    assert [trace.read_text() for trace in traces] == ['{"traceEvents": []}'] * 2


def test_a_new_profile_replaces_every_trace_of_the_earlier_one_from_its_step(tmp_path: Path) -> None:
    accelerator = Accelerator(cpu=True)
    profiler = StepProfiler(accelerator, NullTracker(accelerator), tmp_path, global_step=0, steps=1)
    this_process, other_process = earlier_profile(tmp_path, profiler.first_step)

    with contextlib.redirect_stdout(io.StringIO()), profiler:
        for _ in range(WARM_UP + 1):
            torch.ones(2).sum()
            profiler.step()

    assert profiler_steps(this_process) == [f"ProfilerStep#{WARM_UP}"]
    assert not other_process.exists()  # one process now: no other's trace passes for this profile's


def test_overwrite_removes_the_earlier_runs_traces_and_keeps_a_users_file(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    traces = [run_dir.profile_trace(step, rank) for step in (4, 40) for rank in (0, 1)]
    for trace in traces:
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.write_text("{}")
    notes = run_dir.profile(40) / "my-notes.txt"
    notes.write_text("mine")

    remove_earlier_run(PartialState(cpu=True), tmp_path)

    assert run_dir.profile_traces() == [] and not run_dir.profile(4).exists()
    assert notes.read_text() == "mine"
