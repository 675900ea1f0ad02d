"""`launch/slurm.sbatch` on a real two-node SLURM cluster (`.ci/slurm-cluster.sh`: slurmctld and two slurmd on
this machine, nodes n1 and n2): CPU nodes train as one job, a preempted job requeues itself and continues, a
node that never starts ends the job within the rendezvous bound, and GPU nodes get one process per GPU.

The cluster is the one `.ci/slurm-cluster.sh up` started. Only with FMNIST_DIST_SLURM_SETUP=1 do the tests start
one themselves for this module (as root, installing SLURM and MUNGE with apt-get if missing, starting their daemons
and adding n1 and n2 to /etc/hosts; stopped and undone afterwards): `pytest` never installs packages or changes
system files unasked. Where there is no cluster the tests are skipped with the reason and how to opt in; with
FMNIST_DIST_REQUIRE_SLURM=1 (as `.ci/run` sets) they fail instead.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import pytest
import torch
from conftest import REPO, cli_env, launch_cli, one_at_a_time, synthetic_data, train_args
from processes import wait_until

# One xdist worker runs every test of the cluster (SLURM_TESTS: this module's and the sweep's), one after another.
SLURM_TESTS = pytest.mark.xdist_group("slurm-cluster")
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster, SLURM_TESTS]

CLUSTER_SCRIPT = REPO / ".ci" / "slurm-cluster.sh"
SBATCH_SCRIPT = REPO / "launch" / "slurm.sbatch"
SLURM_CONF = Path(os.environ.get("FMNIST_DIST_SLURM_DIR", "/tmp/fmnist-dist-slurm")) / "slurm.conf"
# Long enough (3 epochs of 125 steps of 2 x 16 images) that a signal sent after epoch 1 lands mid-run.
TRAIN_IMAGES = 4000
TEST_IMAGES = 200
EPOCHS = 3
JOB_FLAGS = ("--epochs", str(EPOCHS), "--batch-size", "16", "--no-progress")
RDZV_TIMEOUT_S = 15
# The rendezvous bound, plus start-up and SLURM's bookkeeping on 2 busy cores.
NEVER_STARTS_BOUND_S = 60
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


# The opt-in: the tests may start (and install) a cluster themselves.
SETUP_VARIABLE = "FMNIST_DIST_SLURM_SETUP"
# CI: a cluster that cannot be used fails the tests instead of skipping them.
REQUIRE_VARIABLE = "FMNIST_DIST_REQUIRE_SLURM"


class ClusterPlan(Enum):
    """What the SLURM tests do about the cluster."""

    USE = "use the cluster that is up"
    START = "start one (opted in)"
    UNAVAILABLE = "skip, or fail where a cluster is required"


def cluster_plan(env: Mapping[str, str], cluster_up: bool, cannot_start: str | None) -> tuple[ClusterPlan, str]:
    """Use a cluster that is up; start one only when `env` opts in and it can be started; else say why not.

    Args:
        cluster_up: whether `.ci/slurm-cluster.sh status` found a cluster.
        cannot_start: why this machine cannot start one (`why_slurm_cannot_start`), or None.

    Returns:
        The plan, and for UNAVAILABLE the reason (which says how to opt in when that is what is missing).
    """
    if cluster_up:
        return ClusterPlan.USE, ""
    if env.get(SETUP_VARIABLE) != "1":
        return ClusterPlan.UNAVAILABLE, (
            f"no SLURM test cluster is up; start one (`sudo .ci/slurm-cluster.sh up`), or set {SETUP_VARIABLE}=1 to "
            "let the tests start one as root, which installs slurmctld, slurmd, slurm-client and munge with apt-get "
            "if missing, starts their daemons and adds n1 and n2 to /etc/hosts (undone when the tests end)"
        )
    if cannot_start is not None:
        return ClusterPlan.UNAVAILABLE, f"{SETUP_VARIABLE}=1, but {cannot_start}"
    return ClusterPlan.START, ""


def slurm_unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_VARIABLE) == "1":
        pytest.fail(f"{REQUIRE_VARIABLE}=1 but {reason}")
    pytest.skip(reason)


def why_slurm_cannot_start() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the SLURM test cluster runs on Linux only"
    if os.geteuid() != 0:
        return "starting the SLURM test cluster needs root (`sudo .ci/slurm-cluster.sh up`)"
    if not shutil.which("sbatch") and not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it (slurmctld slurmd slurm-client munge)"
    return None


def cluster_script(command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`.ci/slurm-cluster.sh COMMAND` (status only reads: its config file, `sinfo`; up and down change the system)."""
    return subprocess.run([CLUSTER_SCRIPT, command], capture_output=True, text=True, timeout=timeout)


@contextmanager
def slurm_cluster() -> Iterator[dict[str, str]]:
    """The environment for sbatch and friends: this cluster's SLURM_CONF, this venv's `accelerate` on PATH.

    A cluster is started (and stopped afterwards) only as `cluster_plan` says; else the tests skip or fail.
    """
    plan, reason = cluster_plan(os.environ, cluster_script("status").returncode == 0, why_slurm_cannot_start())
    if plan is ClusterPlan.UNAVAILABLE:
        slurm_unavailable(reason)
    if plan is ClusterPlan.START:
        up = cluster_script("up")
        if up.returncode != 0:
            slurm_unavailable(f"`.ci/slurm-cluster.sh up` failed: {up.stderr.strip() or up.stdout.strip()}")
    # Nothing of an enclosing SLURM job (when pytest itself runs under one) may leak into these jobs.
    env = {k: v for k, v in cli_env().items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF=str(SLURM_CONF), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    try:
        yield env
    finally:
        if plan is ClusterPlan.START:
            cluster_script("down", timeout=120)


@contextmanager
def the_test_cluster() -> Iterator[dict[str, str]]:
    """`slurm_cluster()`, used by this test module alone until it is done: it may start and stop the cluster, and
    its jobs need the cluster's nodes."""
    with one_at_a_time("slurm-cluster"), slurm_cluster() as env:
        yield env


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    with the_test_cluster() as env:
        yield env


@pytest.fixture(scope="module")
def job_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_data(tmp_path_factory, "slurm-data", TRAIN_IMAGES, TEST_IMAGES, seed=3)


@pytest.fixture(scope="module")
def uninterrupted_weights(job_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The same training as the SLURM jobs, as two processes on one node (launch/cpu.yaml)."""
    output_dir = tmp_path_factory.mktemp("single-node") / "out"
    result = launch_cli(train_args(job_data, output_dir, *JOB_FLAGS, "--cpu"), cwd=output_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_weights(output_dir / "model.pth")


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True, map_location="cpu")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def sbatch_command(log_dir: Path, job_name: str, *options: str) -> list[str]:
    """`sbatch` of launch/slurm.sbatch on both nodes, one CPU each; the output in log_dir/slurm-<job id>.out."""
    return [
        "sbatch",
        f"--job-name={job_name}",
        "--nodes=2",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        f"--output={log_dir}/slurm-%j.out",
        *options,
        str(SBATCH_SCRIPT),
    ]


def job_log(log_dir: Path) -> tuple[str, str]:
    """(job id, the job's output) of the one job that wrote to log_dir."""
    [log] = log_dir.glob("slurm-*.out")
    return log.stem.removeprefix("slurm-"), log.read_text()


def job_name(test: str) -> str:
    """Unique to this pytest process, so that cleaning up never cancels another session's job on a shared cluster."""
    return f"fmnist-test-{os.getpid()}-{test}"


def cancel(name: str, env: dict[str, str]) -> None:
    subprocess.run(["scancel", f"--name={name}"], env=env, capture_output=True)


@pytest.fixture(scope="module")
def cpu_job(
    slurm_env: dict[str, str], job_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[subprocess.CompletedProcess, Path, str]:
    """`FMNIST_DIST_CPU=1 sbatch --wait launch/slurm.sbatch` on n1 and n2, one process each, run to the end."""
    log_dir = tmp_path_factory.mktemp("cpu-job")
    output_dir = log_dir / "out"
    flags = train_args(job_data, output_dir, *JOB_FLAGS)[1:]
    try:
        result = subprocess.run(
            [*sbatch_command(log_dir, job_name("cpu"), "--wait"), *map(str, flags)],
            cwd=REPO,
            env={**slurm_env, "FMNIST_DIST_CPU": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        cancel(job_name("cpu"), slurm_env)
    return result, output_dir, job_log(log_dir)[1]


def test_cpu_job_on_two_nodes_exits_0(cpu_job) -> None:
    result, _, log = cpu_job

    assert result.returncode == 0, log[-3000:]


def test_cpu_job_on_two_nodes_writes_one_model_trained_by_two_processes(cpu_job) -> None:
    _, output_dir, log = cpu_job

    assert list(output_dir.parent.rglob("model.pth")) == [output_dir / "model.pth"], log[-3000:]
    metrics = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["world_size"] for record in metrics] == [2] * EPOCHS


def test_cpu_job_on_two_nodes_matches_two_processes_on_one_node(cpu_job, uninterrupted_weights) -> None:
    _, output_dir, _ = cpu_job

    assert max_difference(load_weights(output_dir / "model.pth"), uninterrupted_weights) <= 1e-6


def job_fields(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """`scontrol show job`'s fields (JobState, Restarts, ExitCode, ...); {} once the controller has forgotten it."""
    shown = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def test_preempted_job_requeues_itself_and_ends_with_the_uninterrupted_weights(
    slurm_env: dict[str, str], job_data: Path, uninterrupted_weights, tmp_path: Path
) -> None:
    output_dir = tmp_path / "out"
    flags = train_args(job_data, output_dir, *JOB_FLAGS)[1:]
    env = {**slurm_env, "FMNIST_DIST_CPU": "1"}
    # Not `sbatch --wait`: it returns as soon as the job is requeued (SLURM reports it as ended for a moment).
    submitted = subprocess.run(
        [*sbatch_command(tmp_path, job_name("preempt"), "--parsable"), *map(str, flags)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = submitted.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job_id}.out"
    try:
        wait_until(
            lambda: log.exists() and f"epoch 1/{EPOCHS}:" in log.read_text(),
            180,
            "the job did not finish its first epoch in time",
        )
        # What `#SBATCH --signal=B:USR1@120` does ahead of the time limit: USR1 to the batch shell only.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], env=env, check=True)
        # SLURM holds a requeued job for its credential lifetime (120 s by default; 10 s on the test cluster).
        # Starting it sooner (`scontrol update StartTime=now`) can fail: "Job credential revoked".
        wait_until(
            lambda: job_fields(job_id, env).get("Restarts") == "1",
            90,
            f"job {job_id} was not requeued:\n{log.read_text()[-3000:]}",
        )
        wait_until(
            lambda: job_fields(job_id, env).get("JobState") in ENDED,
            240,
            f"job {job_id} did not end:\n{log.read_text()[-3000:]}",
        )
        ended = job_fields(job_id, env)
    finally:
        cancel(job_name("preempt"), env)

    first_run, _, second_run = log.read_text().partition(f"job {job_id} (restart 1)")
    assert (ended["JobState"], ended["Restarts"], ended["ExitCode"]) == ("COMPLETED", "1", "0:0"), second_run[-3000:]
    assert "requeueing job" in first_run, first_run[-3000:]
    # The second run continued the first one's state: it never trained epoch 1 again.
    assert f"epoch 1/{EPOCHS}:" not in second_run and f"epoch {EPOCHS}/{EPOCHS}:" in second_run, second_run[-3000:]
    assert max_difference(load_weights(output_dir / "model.pth"), uninterrupted_weights) <= 1e-6


def fake_accelerate(bin_dir: Path, body: str) -> None:
    """An `accelerate` first on PATH that runs `body` (bash) on each node, in place of the real launcher."""
    bin_dir.mkdir()
    script = bin_dir / "accelerate"
    script.write_text(f"#!/bin/bash\nset -euo pipefail\n{body}\n")
    script.chmod(0o755)


def test_node_that_never_starts_ends_the_job_within_the_bound_with_a_clear_message(
    slurm_env: dict[str, str], job_data: Path, tmp_path: Path
) -> None:
    # n2's task never gets to `accelerate launch` (as on a node with a hung file system); n1's launches for real.
    fake_accelerate(
        tmp_path / "bin",
        f'[[ $SLURMD_NODENAME == n2 ]] && exec sleep 600\nexec {Path(sys.executable).parent / "accelerate"} "$@"',
    )
    env = {
        **slurm_env,
        "FMNIST_DIST_CPU": "1",
        "FMNIST_DIST_RDZV_TIMEOUT": str(RDZV_TIMEOUT_S),
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{slurm_env['PATH']}",
    }
    flags = train_args(job_data, tmp_path / "out", *JOB_FLAGS)[1:]
    started = time.monotonic()
    try:
        result = subprocess.run(
            [*sbatch_command(tmp_path, job_name("never"), "--wait"), *map(str, flags)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        cancel(job_name("never"), slurm_env)
    elapsed = time.monotonic() - started

    log = job_log(tmp_path)[1]
    assert result.returncode != 0, log[-3000:]
    assert elapsed < NEVER_STARTS_BOUND_S, f"took {elapsed:.0f} s"
    assert "1/2 clients joined" in log, log[-3000:]  # torch's rendezvous: who showed up
    assert "fmnist-dist: error: the training step failed" in log


@pytest.mark.parametrize(
    ("variables", "sbatch_options", "processes", "device_flags"),
    [
        ({}, ["--gpus-per-node=2"], 2, []),  # GPU nodes by default, one process per allocated GPU
        ({"FMNIST_DIST_CPU": "1", "FMNIST_DIST_PROCESSES_PER_NODE": "2"}, ["--gpus-per-node=0"], 2, ["--cpu"]),
    ],
    ids=["gpu-nodes", "cpu-nodes"],
)
def test_each_node_launches_one_process_per_gpu_or_as_many_as_asked_on_cpu_nodes(
    slurm_env: dict[str, str],
    tmp_path: Path,
    variables: dict[str, str],
    sbatch_options: list[str],
    processes: int,
    device_flags: list[str],
) -> None:
    # The test cluster's nodes declare 4 CPUs and 2 (fake) GPUs each; the fake launcher records its arguments.
    fake_accelerate(tmp_path / "bin", f'printf "%s\\n" "$@" >{tmp_path}/"$SLURMD_NODENAME".args')
    env = {**slurm_env, **variables, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{slurm_env['PATH']}"}
    try:
        result = subprocess.run(
            [
                "sbatch",
                "--wait",
                f"--job-name={job_name('launch')}",
                "--nodes=2",
                "--cpus-per-task=4",
                *sbatch_options,
                f"--output={tmp_path}/slurm-%j.out",
                str(SBATCH_SCRIPT),
                "--epochs",
                "1",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        cancel(job_name("launch"), slurm_env)

    assert result.returncode == 0, job_log(tmp_path)[1]
    launches = [(tmp_path / f"{node}.args").read_text().splitlines() for node in ("n1", "n2")]
    ports = set()
    for rank, args in enumerate(launches):
        option = dict(itertools.pairwise(args))
        assert args[:3] == ["launch", "--machine_rank", str(rank)]
        assert option["--config_file"] == str(REPO / "launch" / "multi-node.yaml")
        assert (option["--num_machines"], option["--num_processes"]) == ("2", str(2 * processes))
        assert option["--main_process_ip"] == "n1"
        assert option["--num_cpu_threads_per_process"] == str(4 // processes)  # the task's CPUs, shared
        assert args[args.index("-m") :] == [
            "-m",
            "fmnist_dist",
            "train",
            *device_flags,
            "--resume",
            "auto",
            "--epochs",
            "1",
        ]
        ports.add(option["--main_process_port"])
    assert len(ports) == 1


def test_gpu_job_without_gpus_is_refused_in_one_line(slurm_env: dict[str, str], tmp_path: Path) -> None:
    try:
        result = subprocess.run(
            sbatch_command(tmp_path, job_name("nogpu"), "--wait"),
            cwd=REPO,
            env=slurm_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        cancel(job_name("nogpu"), slurm_env)

    log = job_log(tmp_path)[1]
    assert result.returncode == 2, log
    assert log.count("fmnist-dist: error:") == 1 and "FMNIST_DIST_CPU=1" in log, log
