"""W&B sweeps, without the W&B server: the command of launch/sweep.yaml as `wandb agent` expands and runs it.

The agent is wandb's own code (`wandb.wandb_agent.Agent`), given the two answers the server would give (the sweep's
command, a trial's run id and parameters) by tests/helpers/sweep_agent.py; W&B runs offline. In this process: the
command and environment the agent starts a trial with, the settings its flags make, what the sweep searches, and
where a trial writes. With real processes, on 1 and 2 processes: each trial writes to its own directory named by
its run id, trains with the sweep's parameters on every process and is one offline W&B run of the sweep under that
id; a preempted trial is marked so on W&B and, run again under its run id, continues from its own state; and
launch/sweep.sbatch runs one trial per task of a SLURM job array on the test cluster.

What needs the server (creating the sweep, the agent asking for trials, W&B's choice of parameters and its requeue
of a preempted trial) is not run here: docs/how-to/sweeps.md says so.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import pytest
import torch
import wandb
import yaml
from conftest import CPU_LAUNCH_CONFIG, REPO, cli_env
from helpers.sweep_agent import start_trial
from processes import wait_until
from test_slurm import ENDED, SLURM_TESTS, cancel, job_fields, job_name, the_test_cluster
from test_tracking import read_wandb_log
from wandb import wandb_agent
from wandb.proto import wandb_internal_pb2
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args, load_sweep_config

from fmnist_dist.cli import build_parser, train_settings
from fmnist_dist.errors import UsageError
from fmnist_dist.runtime.stop_signals import PREEMPTED_EXIT_CODE
from fmnist_dist.settings.declaration import NUMBER, PATH, SWITCH, TEXT, WHOLE, WORDS
from fmnist_dist.settings.train_config import DEFAULTS, MONITORS, SETTINGS, TrainConfig, flag_of
from fmnist_dist.storage.metrics_log import TRACKER_KEY, EpochRecord, MetricsLog
from fmnist_dist.storage.run_dir import RunDirectory
from fmnist_dist.storage.training_state import complete_states, read_progress
from fmnist_dist.tracking.base import RunSpec
from fmnist_dist.tracking.sweep import RUN_ID_VARIABLE, SWEEP_ID_VARIABLE, SweepTrial, as_sweep_trial, sweep_trial
from fmnist_dist.tracking.wandb_tracker import init_kwargs
from fmnist_dist.training.model_selection import best_key

SWEEP_YAML = REPO / "launch" / "sweep.yaml"
SWEEP_SBATCH = REPO / "launch" / "sweep.sbatch"
AGENT = REPO / "tests" / "helpers" / "sweep_agent.py"
SWEEP_ID = "swp0test"
# As `wandb sweep` prints it: the agent sets the entity and project of the trials' runs from it.
SWEEP_PATH = f"test-entity/fmnist-dist/{SWEEP_ID}"
# The settings this sweep is for, as `train` flags without their dashes.
SETTINGS_THAT_MATTER = {"lr", "momentum", "lr-schedule", "warmup-epochs", "global-batch-size"}
# A value of each kind for a parameter, and the value its flag gives (switches: turned the other way).
SAMPLE_VALUES = {WHOLE: 1, NUMBER: 0.5, TEXT: "x", PATH: "runs/x", SWITCH: True}


def sweep_config() -> dict[str, Any]:
    """launch/sweep.yaml, read as `wandb sweep` reads it."""
    config = load_sweep_config(str(SWEEP_YAML))
    assert config is not None
    return config


def parameter_of(name: str) -> str:
    """The sweep parameter that sets the TrainConfig field `name`: its flag without the dashes."""
    return flag_of(name).removeprefix("--")


SETTING_OF_PARAMETER = {parameter_of(name): name for name in SETTINGS}


def command_settings(command: list[str]) -> TrainConfig:
    """The settings `fmnist-dist train` makes of the arguments after `-m fmnist_dist`."""
    return train_settings(build_parser().parse_args(command[command.index("fmnist_dist") + 1 :]))[0]


# ----------------------------------------------------------------------------------------------- in process


@dataclass(frozen=True)
class StartedTrial:
    """What the agent starts a trial with."""

    command: list[str]
    env: dict[str, str]


@pytest.fixture
def agent_trial(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., StartedTrial]:
    """The command and environment wandb's agent starts a trial of launch/sweep.yaml with, recorded in place of the
    process it would start."""
    started: list[StartedTrial] = []

    class RecordedProcess:
        def __init__(self, env: dict[str, str], command: list[str], **kwargs: object) -> None:
            started.append(StartedTrial(command, env))

    monkeypatch.setattr(wandb_agent, "AgentProcess", RecordedProcess)
    # The agent sets these in this process's environment: put back as they were afterwards.
    for name in ("SWEEP_ID", "RUN_ID", "SWEEP_PARAM_PATH", "ENTITY", "PROJECT"):
        monkeypatch.setenv(f"WANDB_{name}", "")
    monkeypatch.setenv(wandb.env.DIR, str(tmp_path))

    def start(parameters: dict[str, Any], run_id: str = "trial001") -> StartedTrial:
        start_trial(SWEEP_PATH, run_id, parameters, None, None)
        return started[-1]

    return start


# Every kind of value the sweep passes, a false switch included.
PARAMETERS = {
    "lr": 0.05,
    "momentum": 0.5,
    "lr-schedule": "onecycle",
    "warmup-epochs": 0.25,
    "global-batch-size": 128,
    "scale-lr": True,
    "overwrite": False,
}


def test_the_agent_runs_the_sweep_command_with_the_parameters_as_flags(agent_trial) -> None:
    trial = agent_trial(PARAMETERS)

    assert trial.command == [
        "/usr/bin/env",
        "accelerate",
        "launch",
        "--config_file",
        "launch/multi-gpu.yaml",
        "--main_process_port=0",
        "-m",
        "fmnist_dist",
        "train",
        "--resume=auto",
        "--no-progress",
        "--lr=0.05",
        "--momentum=0.5",
        "--lr-schedule=onecycle",
        "--warmup-epochs=0.25",
        "--global-batch-size=128",
        "--scale-lr",
    ]


def test_the_trials_flags_are_its_settings(agent_trial) -> None:
    cfg = command_settings(agent_trial(PARAMETERS).command)

    assert (cfg.lr, cfg.momentum, cfg.lr_schedule, cfg.warmup_epochs, cfg.global_batch_size) == (
        0.05,
        0.5,
        "onecycle",
        0.25,
        128,
    )
    assert (cfg.scale_lr, cfg.overwrite, cfg.resume, cfg.progress) == (True, False, "auto", False)


def test_the_agents_environment_names_the_trial(agent_trial) -> None:
    trial = agent_trial({"lr": 0.05}, run_id="trial001")

    assert sweep_trial(trial.env) == SweepTrial(SWEEP_ID, "trial001")
    # The parameter file wandb.init reads the sweep's parameters from.
    assert yaml.safe_load(Path(trial.env[wandb.env.SWEEP_PARAM_PATH]).read_text())["lr"] == {"value": 0.05}


@pytest.mark.parametrize("name", [name for name, declared in SETTINGS.items() if declared.kind is not WORDS])
def test_every_train_setting_but_a_list_can_be_a_sweep_parameter(name: str) -> None:
    declared = SETTINGS[name]
    value = declared.choices[-1] if declared.choices else SAMPLE_VALUES[declared.kind]
    # The agent's ${args_no_boolean_flags}: `--name=value`, or a switch's name alone for true.
    (flag,) = create_sweep_command_args({"args": {parameter_of(name): {"value": value}}})["args_no_boolean_flags"]

    parsed = getattr(build_parser().parse_args(["train", flag]), name)

    assert parsed == (not DEFAULTS[name] if declared.kind is SWITCH else declared.kind.parse(str(value)))


def test_the_sweep_searches_the_settings_that_matter_within_their_bounds() -> None:
    config = sweep_config()

    assert config["method"] in ("bayes", "random")
    assert set(config["parameters"]) >= SETTINGS_THAT_MATTER
    for parameter, spec in config["parameters"].items():
        declared = SETTINGS[SETTING_OF_PARAMETER[parameter]]  # a KeyError: no train flag of that name
        for value in [*spec.get("values", []), *(spec[key] for key in ("value", "min", "max") if key in spec)]:
            assert declared.refusal(declared.kind.from_plain(value)) is None, (parameter, value)


def test_the_sweep_optimizes_a_metric_the_tracker_logs() -> None:
    metric = sweep_config()["metric"]
    tracked = {field.metadata[TRACKER_KEY] for field in fields(EpochRecord) if TRACKER_KEY in field.metadata}
    tracked |= {best_key(monitor) for monitor in MONITORS}

    assert metric["name"] in tracked
    assert metric["goal"] == ("maximize" if metric["name"].endswith("accuracy") else "minimize")


def test_a_trial_writes_to_its_own_directory_named_by_its_run_id(tmp_path: Path) -> None:
    cfg = TrainConfig(output_dir=tmp_path / "runs")
    environment = {SWEEP_ID_VARIABLE: "swp1", RUN_ID_VARIABLE: "abc"}

    trial_cfg, trial = as_sweep_trial(cfg, environment)
    other_trial_cfg, _ = as_sweep_trial(cfg, {**environment, RUN_ID_VARIABLE: "def"})
    requeued_cfg, _ = as_sweep_trial(cfg, environment)

    assert trial == SweepTrial("swp1", "abc")
    assert trial_cfg == replace(cfg, output_dir=tmp_path / "runs" / "sweep-swp1" / "abc")
    assert other_trial_cfg.output_dir == tmp_path / "runs" / "sweep-swp1" / "def"
    assert requeued_cfg == trial_cfg


@pytest.mark.parametrize(
    "environment", [{}, {RUN_ID_VARIABLE: "abc"}, {SWEEP_ID_VARIABLE: "swp1"}], ids=["none", "run-id", "sweep-id"]
)
def test_outside_a_sweep_agent_nothing_changes(environment: dict[str, str]) -> None:
    cfg = TrainConfig()

    assert as_sweep_trial(cfg, environment) == (cfg, None)


def test_a_trial_that_would_not_report_to_wandb_is_refused() -> None:
    with pytest.raises(UsageError, match=r"trial abc of the W&B sweep swp1 .* drop --tracker none"):
        as_sweep_trial(TrainConfig(tracker="none"), {SWEEP_ID_VARIABLE: "swp1", RUN_ID_VARIABLE: "abc"})


@pytest.mark.parametrize("run_id", ["", "..", "a/b"])
def test_a_run_id_that_cannot_name_a_directory_is_refused(run_id: str) -> None:
    with pytest.raises(UsageError, match=f"{RUN_ID_VARIABLE}=.* cannot name a trial's directory"):
        sweep_trial({SWEEP_ID_VARIABLE: "swp1", RUN_ID_VARIABLE: run_id})


def test_the_trial_is_found_by_the_variables_wandb_reads() -> None:
    assert (SWEEP_ID_VARIABLE, RUN_ID_VARIABLE) == (wandb.env.SWEEP_ID, wandb.env.RUN_ID)


def test_a_resumed_trial_leaves_its_run_id_to_the_agent() -> None:
    # wandb.init ignores another id (and a project) in a sweep, with a warning: the agent's is the trial's own.
    assert init_kwargs(RunSpec(project="p", config={}, resume_id="abc", sweep_id="swp1")) == {"resume": "allow"}
    assert init_kwargs(RunSpec(project="p", config={}, resume_id="abc")) == {"id": "abc", "resume": "allow"}


# ------------------------------------------------------------------------------------------ real processes

# The trials' parameters: those of the sweep, and the fixed ones of a quick run on this machine.
TRIAL_PARAMETERS = {
    "lr": 0.05,
    "momentum": 0.5,
    "lr-schedule": "constant",
    "warmup-epochs": 0,
    "global-batch-size": 32,
    "epochs": 1,
    "eval-batch-size": 64,
    "no-download": True,
    "cpu": True,
}
# Their values as the settings hold them (a constant schedule without warm-up trains at lr throughout).
TRIAL_SETTINGS = {
    "lr": 0.05,
    "momentum": 0.5,
    "lr_schedule": "constant",
    "warmup_epochs": 0.0,
    "global_batch_size": 32,
    "epochs": 1,
}


@dataclass(frozen=True)
class Trial:
    """A trial the stand-in agent ran to its end."""

    result: subprocess.CompletedProcess
    run_id: str
    processes: int
    output_dir: Path  # the sweep's --output-dir (a parameter here)
    wandb_dir: Path  # WANDB_DIR: the offline runs are under wandb/ in it

    @property
    def run_dir(self) -> Path:
        return self.output_dir / f"sweep-{SWEEP_ID}" / self.run_id

    def wandb_runs(self) -> list[Path]:
        return [run for run in (self.wandb_dir / "wandb").glob("offline-run-*") if run.name.endswith(self.run_id)]

    def run_record(self) -> wandb_internal_pb2.RunRecord:
        (run,) = self.wandb_runs()
        (log,) = run.glob("run-*.wandb")
        (record,) = [r.run for r in read_wandb_log(log) if r.WhichOneof("record_type") == "run"]
        return record


def agent_env(wandb_dir: Path, **extra: str) -> dict[str, str]:
    """The CLI's test environment, with W&B's warnings shown and this venv's `accelerate` on PATH (the sweep's
    command finds it there, through /usr/bin/env)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return cli_env(**{"WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "false", "PATH": path, **extra})


def agent_command(parameters_file: Path, run_id: str | None, processes: int) -> list[str]:
    """The stand-in agent for one trial of `processes` gloo processes on this machine (launch/cpu.yaml)."""
    run = ["--run-id", run_id] if run_id is not None else []
    return [
        sys.executable,
        str(AGENT),
        "--parameters",
        str(parameters_file),
        *run,
        "--accelerate-config",
        str(CPU_LAUNCH_CONFIG),
        "--num-processes",
        str(processes),
    ]


def write_parameters(path: Path, parameters: dict[str, Any]) -> Path:
    path.write_text(json.dumps(parameters))
    return path


def run_trial(work: Path, data_dir: Path, run_id: str, processes: int) -> Trial:
    """The stand-in agent runs one trial from the repository root, as a user runs agents, into work/out."""
    output_dir = work / "out"
    parameters = write_parameters(
        work / f"{run_id}.json", {**TRIAL_PARAMETERS, "data-dir": str(data_dir), "output-dir": str(output_dir)}
    )
    result = subprocess.run(
        [*agent_command(parameters, run_id, processes), SWEEP_PATH],
        cwd=REPO,
        env=agent_env(work),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return Trial(result, run_id, processes, output_dir, work)


@pytest.fixture(scope="module")
def trials(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Trial]:
    """Two trials of one sweep with the same parameters, on 1 and on 2 processes, into the same --output-dir."""
    work = tmp_path_factory.mktemp("sweep")
    return {processes: run_trial(work, data_dir, f"trial{processes}p", processes) for processes in (1, 2)}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(RunDirectory(run_dir).model, map_location="cpu", weights_only=True)


@pytest.mark.integration
def test_each_trial_writes_to_its_own_directory_named_by_its_run_id(trials: dict[int, Trial]) -> None:
    output_dir = trials[1].output_dir

    assert [path.name for path in output_dir.iterdir()] == [f"sweep-{SWEEP_ID}"]
    assert sorted(path.name for path in (output_dir / f"sweep-{SWEEP_ID}").iterdir()) == ["trial1p", "trial2p"]
    for trial in trials.values():
        run_dir = RunDirectory(trial.run_dir)
        assert run_dir.model.is_file() and len(MetricsLog.read(run_dir.metrics)) == 1
        assert len(complete_states(run_dir.states)) == 1


@pytest.mark.integration
def test_a_trial_says_once_that_it_is_one_and_where_it_writes(trials: dict[int, Trial]) -> None:
    for trial in trials.values():
        line = f"fmnist-dist: W&B sweep {SWEEP_ID}, trial {trial.run_id}: writing to {trial.run_dir}\n"
        assert trial.result.stdout.count(line) == 1, trial.result.stdout


@pytest.mark.integration
def test_a_trial_trains_with_the_sweeps_parameters(trials: dict[int, Trial]) -> None:
    for processes, trial in trials.items():
        run_dir = RunDirectory(trial.run_dir)
        (state,) = complete_states(run_dir.states)
        saved = read_progress(state).config
        assert {name: saved[name] for name in TRIAL_SETTINGS} == TRIAL_SETTINGS
        (record,) = MetricsLog.read(run_dir.metrics)
        assert (record.lr, record.global_batch_size, record.world_size) == (0.05, 32, processes)


@pytest.mark.integration
def test_every_process_of_a_trial_trains_with_the_sweeps_parameters(trials: dict[int, Trial]) -> None:
    """The 2-process trial ends with the weights of the 1-process one (up to the rounding of another summation
    order, 1e-5 as in tests/test_global_position.py). Had process 1 trained with other values (the defaults: a
    batch of 64 per process, lr 0.12), its steps would not pair with process 0's, or its replica would move
    otherwise and, through the averaged gradients, process 0's too."""
    one, two = weights(trials[1].run_dir), weights(trials[2].run_dir)

    assert max((one[key] - two[key]).abs().max().item() for key in one) < 1e-5


@pytest.mark.integration
def test_each_trial_is_one_offline_wandb_run_of_the_sweep_under_its_run_id(trials: dict[int, Trial]) -> None:
    for trial in trials.values():
        assert len(trial.wandb_runs()) == 1, [run.name for run in trial.wandb_runs()]
        run = trial.run_record()
        # The project is the sweep's, which the agent took from the sweep's path (not --wandb-project).
        assert (run.run_id, run.sweep_id, run.project) == (trial.run_id, SWEEP_ID, "fmnist-dist")


@pytest.mark.integration
def test_the_runs_config_holds_the_sweeps_parameters_and_settings_that_agree_with_them(
    trials: dict[int, Trial],
) -> None:
    for trial in trials.values():
        config = {item.key: json.loads(item.value_json) for item in trial.run_record().config.update}
        for parameter, value in TRIAL_PARAMETERS.items():
            name = SETTING_OF_PARAMETER[parameter]
            assert config[parameter] == value
            # The setting under its own name: the same value (a switch's is what its flag turns it to).
            expected = not DEFAULTS[name] if SETTINGS[name].kind is SWITCH else value
            assert config[name] == expected, (name, config[name], expected)
        assert config["output_dir"] == str(trial.run_dir)  # where the trial wrote, not the sweep's --output-dir
        # Neither a second project or run id nor an update of the sweep's locked values.
        assert "Ignoring" not in trial.result.stderr and "locked by 'sweep'" not in trial.result.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_a_preempted_trial_is_marked_so_and_run_again_continues_from_its_own_state(
    long_run_data_dir: Path, uninterrupted_long_runs: dict[int, Path], tmp_path: Path
) -> None:
    parameters = long_run_parameters(long_run_data_dir, tmp_path)
    command = [*agent_command(parameters, "preempt1", 1), SWEEP_PATH]
    env = agent_env(tmp_path, WANDB_SILENT="true")
    run_dir = tmp_path / "out" / f"sweep-{SWEEP_ID}" / "preempt1"
    agent = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = stop_after_first_epoch(agent)
    finally:
        agent.kill()
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    # SIGTERM to the agent, as launch/sweep.sbatch sends it at a time limit: passed on to the trial, which stops.
    assert "fmnist-dist: stopped by SIGTERM" in output, output[-3000:]
    # Marked preempting, and ended with a non-zero exit code: what makes W&B requeue a sweep's trial.
    first, _again = sorted((tmp_path / "wandb").glob("offline-run-*-preempt1"))  # named by start time, then id
    (log,) = first.glob("run-*.wandb")
    records = {record.WhichOneof("record_type"): record for record in read_wandb_log(log)}
    assert "preempting" in records and records["exit"].exit.exit_code == PREEMPTED_EXIT_CODE
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from {run_dir / 'state'}/step-" in again.stdout and "epoch 1/2:" not in again.stdout
    assert_continued_to_the_uninterrupted_weights(run_dir, uninterrupted_long_runs[1])


def long_run_parameters(data_dir: Path, work: Path) -> Path:
    """The settings of the uninterrupted long run (tests/conftest.py's long_run_args) as the parameters of a trial
    into work/out, written to a file for the stand-in agent."""
    parameters = {
        "data-dir": str(data_dir),
        "no-download": True,
        "output-dir": str(work / "out"),
        "epochs": 2,
        "batch-size": 32,
        "eval-batch-size": 64,
        "cpu": True,
    }
    return write_parameters(work / "parameters.json", parameters)


def assert_continued_to_the_uninterrupted_weights(run_dir: Path, uninterrupted: Path) -> None:
    assert [record.epoch for record in MetricsLog.read(RunDirectory(run_dir).metrics)] == [1, 2]
    expected = weights(uninterrupted)
    assert all(torch.equal(tensor, expected[key]) for key, tensor in weights(run_dir).items())


def stop_after_first_epoch(agent: subprocess.Popen) -> str:
    """Send SIGTERM to the agent once the trial has finished its first epoch; return all it printed."""
    assert agent.stdout is not None
    lines = []
    for line in agent.stdout:
        lines.append(line)
        if line.startswith("epoch 1/2:"):
            agent.send_signal(signal.SIGTERM)
            break
    lines += agent.stdout.readlines()
    agent.wait(timeout=120)
    return "".join(lines)


# ------------------------------------------------------------------------------------------ SLURM job array


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    with the_test_cluster() as env:
        yield env


def sweep_sbatch(name: str, log_dir: Path, *options: str) -> list[str]:
    """`sbatch OPTIONS launch/sweep.sbatch SWEEP` on CPU-only nodes, one CPU a task, logs in `log_dir`."""
    return [
        "sbatch",
        *options,
        f"--job-name={name}",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={log_dir}/slurm-%A_%a.out",
        str(SWEEP_SBATCH),
        SWEEP_PATH,
    ]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.cluster
@SLURM_TESTS
def test_a_slurm_job_array_runs_one_trial_per_task_each_in_its_own_directory(
    slurm_env: dict[str, str], data_dir: Path, tmp_path: Path
) -> None:
    parameters = write_parameters(
        tmp_path / "parameters.json",
        {**TRIAL_PARAMETERS, "data-dir": str(data_dir), "output-dir": str(tmp_path / "out")},
    )
    # The stand-in for `wandb agent --count 1 --forward-signals`: a new run id for each task, as W&B gives.
    stand_in = " ".join(agent_command(parameters, None, 1))
    env = {**slurm_env, "WANDB_DIR": str(tmp_path), "FMNIST_DIST_SWEEP_AGENT": stand_in}
    name = job_name("sweep")
    try:
        result = subprocess.run(
            sweep_sbatch(name, tmp_path, "--wait", "--array=0-1"),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        cancel(name, slurm_env)

    logs = {log.name.rsplit("_", 1)[1]: log.read_text() for log in tmp_path.glob("slurm-*_*.out")}
    assert result.returncode == 0, logs
    assert sorted(logs) == ["0.out", "1.out"]
    for task, log in logs.items():
        assert f"array task {task.removesuffix('.out')} " in log and "one agent, one trial" in log, log
    run_dirs = sorted((tmp_path / "out" / f"sweep-{SWEEP_ID}").iterdir())
    assert len(run_dirs) == 2, logs
    for run_dir in run_dirs:
        assert RunDirectory(run_dir).model.is_file(), logs
        runs = [run for run in (tmp_path / "wandb").glob("offline-run-*") if run.name.endswith(run_dir.name)]
        assert len(runs) == 1, logs


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.cluster
@SLURM_TESTS
def test_a_preempted_array_task_requeues_itself_and_its_trial_continues_from_its_state(
    slurm_env: dict[str, str], long_run_data_dir: Path, uninterrupted_long_runs: dict[int, Path], tmp_path: Path
) -> None:
    # One task; W&B would give the preempted run to the next agent that asks: here the restarted task's, whose
    # stand-in runs the trial under the same run id again.
    stand_in = " ".join(agent_command(long_run_parameters(long_run_data_dir, tmp_path), "preempt2", 1))
    env = {**slurm_env, "WANDB_DIR": str(tmp_path), "FMNIST_DIST_SWEEP_AGENT": stand_in}
    name = job_name("sweep-preempt")
    # Not `sbatch --wait`: it returns as soon as the job is requeued (SLURM reports it as ended for a moment).
    submitted = subprocess.run(
        sweep_sbatch(name, tmp_path, "--parsable", "--array=0"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    task = f"{submitted.stdout.strip().split(';')[0]}_0"
    log = tmp_path / f"slurm-{task}.out"
    try:
        wait_until(lambda: log.exists() and "epoch 1/2:" in log.read_text(), 180, "no first epoch in time")
        # What `#SBATCH --signal=B:USR1@120` does ahead of the time limit: USR1 to the batch shell only.
        subprocess.run(["scancel", "--signal=USR1", "--batch", task], env=env, check=True)
        wait_until(lambda: job_fields(task, env).get("Restarts") == "1", 90, f"not requeued:\n{log.read_text()}")
        wait_until(lambda: job_fields(task, env).get("JobState") in ENDED, 240, f"did not end:\n{log.read_text()}")
        ended = job_fields(task, env)
    finally:
        cancel(name, slurm_env)

    first, _, second = log.read_text().partition("restart 1)")
    run_dir = tmp_path / "out" / f"sweep-{SWEEP_ID}" / "preempt2"
    assert (ended["JobState"], ended["ExitCode"]) == ("COMPLETED", "0:0"), second[-3000:]
    assert "fmnist-dist: stopped by SIGTERM" in first and "requeueing job" in first, first[-3000:]
    assert f"resuming from {run_dir / 'state'}/step-" in second and "epoch 1/2:" not in second, second[-3000:]
    assert_continued_to_the_uninterrupted_weights(run_dir, uninterrupted_long_runs[1])
