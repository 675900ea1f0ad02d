"""Shared fixtures: a small synthetic FashionMNIST on disk, and the CLI run as a user runs it (real processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import preloaded
import pytest
import torch
from filelock import FileLock
from processes import free_port

from fmnist_dist.inputs.synthetic import write_synthetic_dataset
from fmnist_dist.storage.metrics_log import EpochRecord

REPO = Path(__file__).resolve().parent.parent
CPU_LAUNCH_CONFIG = REPO / "launch" / "cpu.yaml"
# Sizes that do not divide evenly by 2 processes x any batch size the tests use, so padding is exercised.
TRAIN_SIZE = 1003
TEST_SIZE = 301


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """`-n auto` (pyproject's addopts): no workers for the in-process tier alone (`-m "not integration"`), which
    runs in this one process in less time than workers take to start; else pytest-xdist's own choice, one worker
    per CPU core."""
    return 0 if config.option.markexpr == "not integration" else None


def session_directory(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The directory `name`, filled by `make(directory)` once per test session and shared from then on.

    Under pytest-xdist the first worker to ask makes it while the others wait, so that an expensive reference
    (a training run, say) is made once for the whole session, not once per worker. A directory that `make` left
    unfinished (it raised) is made again by the next one to ask.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's base is a folder of the session's own
    directory = root / f"session-{name}"
    with FileLock(f"{directory}.lock"):
        made = directory.with_name(f"{directory.name}.made")
        if not made.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            make(directory)
            made.touch()
    return directory


@contextmanager
def one_at_a_time(resource: str) -> Iterator[None]:
    """Hold `resource` (a machine-wide one, such as the SLURM test cluster) against every other test process on
    this machine, xdist workers and other pytest sessions included."""
    with FileLock(Path(tempfile.gettempdir()) / f"fmnist-dist-tests-{resource}.lock"):
        yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic FashionMNIST root (TRAIN_SIZE / TEST_SIZE images), read by torchvision's real loader; the same
    directory for every worker (the runs shared below record it)."""
    return session_directory(
        tmp_path_factory, "fmnist", lambda root: write_synthetic_dataset(root, TRAIN_SIZE, TEST_SIZE, seed=0)
    )


@pytest.fixture
def corrupt_data_dir(data_dir: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic dataset, for a test to damage."""
    return Path(shutil.copytree(data_dir, tmp_path / "data"))


def synthetic_data(
    tmp_path_factory: pytest.TempPathFactory, name: str, train_size: int, test_size: int, seed: int
) -> Path:
    """A synthetic FashionMNIST root of the given sizes in a new temporary directory (torchvision reads it)."""
    root = tmp_path_factory.mktemp(name)
    write_synthetic_dataset(root, train_size, test_size, seed=seed)
    return root


def epoch_record(**changes: Any) -> EpochRecord:
    """An epoch's record as the Trainer makes one (2 processes, 480 images, 20 validation and 100 test images),
    with `changes`."""
    values: dict[str, Any] = {
        "epoch": 1,
        "global_step": 15,
        "lr": 0.1,
        "train_loss": 1.5,
        "test_loss": 1.25,
        "test_accuracy": 0.5,
        "val_loss": 1.0,
        "val_accuracy": 0.6,
        "val_samples": 20,
        "test_samples": 100,
        "train_samples": 480,
        "train_seconds": 2.0,
        "eval_seconds": 0.5,
        "train_samples_per_second": 240.0,
        "seconds_per_step": 0.125,
        "data_wait_fraction": 0.25,
        "flops_per_image": 3_209_216,
        "tflops_per_second": 0.00077,
        "mfu": 0.5,
        "peak_memory_mib": 512.5,
        "world_size": 2,
        "global_batch_size": 32,
        "mixed_precision": "no",
        "cpu_threads": 1,
        "confusion_matrix": [[10 if true == predicted else 0 for predicted in range(10)] for true in range(10)],
    }
    return EpochRecord(**{**values, **changes})


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for CLI subprocesses: W&B offline, no GPU, quiet Accelerate. Without PYTHONUNBUFFERED,
    as a user's job runs: the tests that act on a line while the job runs rely on the CLI's own line buffering."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("WANDB_", "ACCELERATE_", "RANK", "LOCAL_RANK")) and k != "PYTHONUNBUFFERED"
    }
    # One thread per process: two processes on two cores would otherwise fight over them.
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        CUDA_VISIBLE_DEVICES="",
        ACCELERATE_DISABLE_RICH="1",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def run_cli(args: Sequence[object], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`fmnist-dist ARGS` in `cwd`, as one process with its imports preloaded (tests/preloaded.py)."""
    return preloaded.run(args, cwd, cli_env(**env), timeout)


def launch_cli(args: Sequence[str], cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/cpu.yaml -m fmnist_dist ARGS` in `cwd`: two real gloo processes."""
    return subprocess.run(
        launch_command(args),
        cwd=cwd,
        env=cli_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch_preloaded(
    args: Sequence[object], cwd: Path, processes: int = 2, timeout: float = 300, **env: str
) -> subprocess.CompletedProcess:
    """`fmnist-dist ARGS` on `processes` gloo processes forked by Accelerate's launcher from an interpreter with
    the imports preloaded (tests/preloaded.py): for tests of what a multi-process run computes, where
    `launch_cli` (the real `accelerate launch`) would spend most of its time importing."""
    return preloaded.run(args, cwd, cli_env(**env), timeout, processes=processes)


def launch_command(args: Sequence) -> list[str]:
    """The command line of `launch_cli`, for a test that starts it itself."""
    return [*cli_command(2), *map(str, args)]


def train_args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """`train` on the synthetic data, quick and offline (override any flag by repeating it in `extra`)."""
    return [
        "train",
        "--data-dir",
        data_dir,
        "--no-download",
        "--output-dir",
        output_dir,
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--eval-batch-size",
        "64",
        "--tracker",
        "none",
        *extra,
    ]


def training_until_killed(data_dir: Path, output_dir: Path) -> list:
    """Far more steps than a test waits for, with a state every 50."""
    return train_args(
        data_dir,
        output_dir,
        "--cpu",
        "--epochs",
        "20",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "50",
        "--no-progress",
    )


def accelerate_launch(processes: int) -> list[str]:
    """`accelerate launch` of `processes` gloo processes (launch/cpu.yaml) on a free port; what it runs follows."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_LAUNCH_CONFIG),
        "--num_processes",
        str(processes),
        "--main_process_port",
        str(free_port()),
    ]


def cli_command(processes: int) -> list[str]:
    """`python -m fmnist_dist`, or `accelerate launch` of it on `processes` gloo processes."""
    if processes == 1:
        return [sys.executable, "-m", "fmnist_dist"]
    return [*accelerate_launch(processes), "-m", "fmnist_dist"]


# `fmnist-dist` with a model that records the training images each process trains on (by index).
RECORDER = "helpers.record_trained_indices:run_recording"


def train(
    data_dir: Path, output_dir: Path, processes: int, *extra: str, record: bool = False
) -> subprocess.CompletedProcess:
    """`train` on `processes` gloo processes (or one plain process); with `record`, through the index recorder."""
    args = quiet_train_args(data_dir, output_dir, *extra, *(["--cpu"] if processes > 1 else []))
    records = output_dir.parent / f"{output_dir.name}-records"
    if record:
        records.mkdir(parents=True, exist_ok=True)
        args = [str(records), *args]
    entry = RECORDER if record else preloaded.CLI
    result = preloaded.run(args, output_dir.parent, cli_env(), 300, entry, processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def quiet_train_args(data_dir: Path, output_dir: Path, *extra: object) -> list[str]:
    """`train_args` without a progress bar, and without `--batch-size` where `extra` has a flag it excludes
    (`--global-batch-size`) or continues a state (which keeps its saved batch)."""
    args = [str(a) for a in train_args(data_dir, output_dir, "--no-progress")]
    if "--global-batch-size" in extra or "--resume" in extra:
        del args[args.index("--batch-size") : args.index("--batch-size") + 2]
    return args + [str(a) for a in extra]


def train_in_process(args: Sequence[object]) -> EpochRecord:
    """`fmnist-dist train ...` (`args` after `fmnist-dist`) run as one process inside this one: the CLI's parser
    and settings, then the job itself (`run_training`: lock, resume, build, fit, save), without the CLI's signal
    handling. Its lines go to this process's stdout (`capsys`); a UsageError is raised, not an exit code.

    For tests of what a single-process run computes (bit-identical resumes, equal weights) that need no real
    process: each costs a fraction of a second where a new process costs several.
    """
    from fmnist_dist.cli import build_parser, train_settings
    from fmnist_dist.training.job import run_training

    cfg, given = train_settings(build_parser().parse_args([str(a) for a in args]))
    return run_training(cfg, given)


def printed_by_training(args: Sequence[object], capsys: pytest.CaptureFixture[str]) -> str:
    """What `train_in_process(args)` prints on stdout (the set-up, resume and epoch lines)."""
    capsys.readouterr()
    train_in_process(args)
    return capsys.readouterr().out


def recorded_ranks(output_dir: Path) -> list[list[list[int]]]:
    """Per process (by rank), per recorded epoch, the indices it trained (`train(..., record=True)`)."""
    records = output_dir.parent / f"{output_dir.name}-records"
    return [json.loads(path.read_text()) for path in sorted(records.glob("rank-*.json"))]


def trained_indices(output_dir: Path) -> list[list[int]]:
    """Per recorded epoch, the indices every process trained (concatenated over processes)."""
    return [[index for rank in epoch for index in rank] for epoch in zip(*recorded_ranks(output_dir), strict=True)]


# The long run: 375 optimizer steps of 32 images per epoch, so a signal or a kill lands mid-epoch.
LONG_TRAIN_SIZE = 12000


@pytest.fixture(scope="session")
def long_run_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic data of the long run (LONG_TRAIN_SIZE training images)."""
    return session_directory(
        tmp_path_factory, "long-run", lambda root: write_synthetic_dataset(root, LONG_TRAIN_SIZE, 200, seed=5)
    )


def long_run_args(data_dir: Path, output_dir: Path, processes: int, *extra: str) -> list[str]:
    """The long run's `train` arguments: 2 epochs, `--resume auto` (the same command continues a stopped run),
    `--cpu` on more than one process."""
    flags = train_args(data_dir, output_dir, "--no-progress", "--resume", "auto", *extra)
    return [str(a) for a in (*flags, *(["--cpu"] if processes > 1 else []))]


def run_long_to_end(data_dir: Path, output_dir: Path, processes: int, *extra: str) -> subprocess.CompletedProcess:
    """The long run (started, or continued from its newest state) on `processes` processes, to its end."""
    args = long_run_args(data_dir, output_dir, processes, *extra)
    result = preloaded.run(args, output_dir.parent, cli_env(), 300, processes=processes)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def uninterrupted_long_runs(long_run_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The long run without a stop on 1 and 2 processes, trained once for the session: what every preempted
    (tests/test_preemption.py) or killed (tests/test_faults.py) and continued run must equal bit for bit."""

    def train_both(work: Path) -> None:
        for processes in (1, 2):
            run_long_to_end(long_run_data_dir, work / f"p{processes}", processes)

    work = session_directory(tmp_path_factory, "uninterrupted", train_both)
    return {processes: work / f"p{processes}" for processes in (1, 2)}


MULTI_NODE_LAUNCH_CONFIG = REPO / "launch" / "multi-node.yaml"


def launch_two_nodes(
    node_args: list[list[str]], cwd: Path, timeout: float = 300, **env: str
) -> list[subprocess.CompletedProcess]:
    """Two machines of one job on this one, as the README's multi-node section runs them: for each machine rank
    i, `accelerate launch --config_file launch/multi-node.yaml --num_machines 2 --num_processes 2 --machine_rank i
    --main_process_ip 127.0.0.1 --main_process_port P -m fmnist_dist ARGS`, all started together.

    Args:
        node_args: `fmnist_dist` arguments of each machine rank (for example `train_args(...)` plus `--cpu`).
        timeout: seconds for the whole job; past it every process of both launches is killed and
            `subprocess.TimeoutExpired` raised.

    Returns:
        One finished process per machine rank, with its stdout and stderr.
    """
    import signal
    import tempfile
    import time

    port = str(free_port())
    commands = [
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(MULTI_NODE_LAUNCH_CONFIG),
            "--num_machines",
            str(len(node_args)),
            "--num_processes",
            str(len(node_args)),
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "-m",
            "fmnist_dist",
            *map(str, args),
        ]
        for rank, args in enumerate(node_args)
    ]
    # Output goes to files, not pipes: a node blocked on a full pipe would stall the other in a collective.
    outputs = [(tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")) for _ in commands]  # noqa: SIM115 - read and closed after the job
    # A session per node, so that a timeout kills its ranks too and not only the launcher.
    nodes = [
        subprocess.Popen(
            command, cwd=cwd, env=cli_env(**env), stdout=out, stderr=err, text=True, start_new_session=True
        )
        for command, (out, err) in zip(commands, outputs, strict=False)
    ]
    deadline = time.monotonic() + timeout
    try:
        for node in nodes:
            node.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    results = []
    for command, node, files in zip(commands, nodes, outputs, strict=False):
        stdout, stderr = (_read_and_close(file) for file in files)
        results.append(subprocess.CompletedProcess(command, node.returncode, stdout, stderr))
    return results


def _read_and_close(file) -> str:
    with file:
        file.seek(0)
        return file.read()


@pytest.fixture(autouse=True)
def in_process_tests_start_no_program(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the two tiers apart: a test not marked `integration` runs in this process (forks included) and starts
    no program, so that `pytest -m 'not integration'` stays the fast tier; one that does must be marked."""
    if request.node.get_closest_marker("integration") is not None:
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{request.node.nodeid} starts a program: mark it @pytest.mark.integration")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(preloaded.CliProcess, "__init__", refuse)


@pytest.hookimpl(tryfirst=True)  # before xdist's, which writes each test's group into its node id
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under xdist (`--dist loadgroup`, pyproject's addopts) a file's tests run on one worker, so that its module
    fixtures (reference runs, mostly) are built once; a test may name a group of its own (`xdist_group`)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.hookimpl(optionalhook=True)  # an xdist hook, called in the controller with what a worker collected
def pytest_xdist_node_collection_finished(node: Any, ids: list[str]) -> None:
    """Stop before any test runs where the groups did not reach the scheduler: a pytest where xdist's write into
    the node id has no effect (9.2, pytest-dev/pytest-xdist#1386) spreads the tests of a file, and those of the
    SLURM cluster, over the workers without a word (every module fixture built once per worker, the cluster's
    tests waiting for each other's turns)."""
    ungrouped = [nodeid for nodeid in ids if "@" not in nodeid]
    if node.config.getvalue("dist") == "loadgroup" and ungrouped:
        pytest.exit(
            f"pytest {pytest.__version__} with pytest-xdist does not group the tests ({ungrouped[0]} has no group; "
            "pytest-dev/pytest-xdist#1386): install the pytest that pyproject.toml's dev extra names, or run with "
            "-n 0",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cluster: runs a real SLURM cluster or a real two-node launch")
    # One torch thread in this process too, as in every process the tests start (`cli_env`): the suite runs on
    # every core at once (xdist), and threads that spin-wait for cores held by other workers slow a step tenfold.
    # The runs made here (`train_in_process`) default to it as well, through OMP_NUM_THREADS.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter) -> None:
    """Name every cluster test with its outcome, passes included, so that CI shows they ran rather than skipped."""
    lines = []
    for outcome in ("passed", "failed", "error", "skipped"):
        for report in terminalreporter.stats.get(outcome, []):
            if "cluster" in getattr(report, "keywords", {}):
                skipped = outcome == "skipped" and isinstance(report.longrepr, tuple)
                reason = f" ({report.longrepr[2]})" if skipped else ""
                lines.append(f"{outcome.upper()} {report.nodeid}{reason}")
    if lines:
        terminalreporter.section("cluster tests (SLURM, two-node launches)")
        for line in lines:
            terminalreporter.line(line)


@dataclass(frozen=True)
class FinishedRun:
    """A finished training run: its output directory and what it printed."""

    output_dir: Path
    stdout: str


@pytest.fixture(scope="session")
def one_epoch_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FinishedRun:
    """`train --epochs 1 --no-progress` on `data_dir`, trained once for the whole session: model.pth,
    metrics.jsonl, plots and a saved state. Shared by every module that needs a finished run, so a test must
    copy it (`shutil.copytree`) before running anything into it."""

    def train_one_epoch(work: Path) -> None:
        result = run_cli(train_args(data_dir, work / "out", "--epochs", "1", "--no-progress"), cwd=work)
        assert result.returncode == 0, result.stderr
        (work / "stdout.txt").write_text(result.stdout)

    work = session_directory(tmp_path_factory, "one-epoch", train_one_epoch)
    return FinishedRun(work / "out", (work / "stdout.txt").read_text())
