"""Every process's error reaches the user, and the job ends promptly: two nodes emulated on this machine (two
`accelerate launch --num_machines 2`, one CPU process each, on the loopback address), and one node of two
processes (`launch/cpu.yaml`) whose start is refused or whose peer is lost."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import (
    CPU_LAUNCH_CONFIG,
    cli_env,
    free_port,
    launch_command,
    run_cli,
    synthetic_data,
    train_args,
    training_until_killed,
)
from processes import children

from fmnist_dist.storage.run_dir import PROGRESS_FILE, STATES_DIR

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPT_S = 120  # well under the 10-minute collective timeout a waiting process would otherwise sit out
QUIET = {"OMP_NUM_THREADS": "1"}
ERROR = "fmnist-dist: error: "


def node_command(machine_rank: int, port: int, args: Sequence) -> list[str]:
    """`accelerate launch` of node `machine_rank` of two, one process each, meeting on 127.0.0.1:`port`."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_LAUNCH_CONFIG),
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--machine_rank",
        str(machine_rank),
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "-m",
        "fmnist_dist",
        *map(str, args),
    ]


def start_two_nodes(node_args: Sequence[Sequence], cwd: Path) -> list[subprocess.Popen]:
    """Both nodes' launchers, each in a session of its own, output (stdout and stderr together) piped."""
    port = free_port()
    return [
        subprocess.Popen(
            node_command(rank, port, args),
            cwd=cwd,
            env=cli_env(**QUIET),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for rank, args in enumerate(node_args)
    ]


def finish(nodes: list[subprocess.Popen], timeout: float) -> list[tuple[int, str]]:
    """Each node's exit code and output; fails the test if a node is still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    results = []
    try:
        for node in nodes:
            output, _ = node.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((node.returncode, output))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a node still ran {timeout} s after the job failed")
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.communicate()
    return results


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(ERROR)]


def no_traceback_through_fmnist_dist(output: str) -> bool:
    # The launcher prints its own report (ChildFailedError) of a failed process; no process prints a traceback.
    return "fmnist_dist/" not in output.replace("-m fmnist_dist", "")


def test_missing_data_on_the_second_node_is_reported_there_and_ends_both(data_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "not-copied-here"
    common = ("--cpu", "--epochs", "1", "--no-progress")
    nodes = start_two_nodes(
        [train_args(data_dir, tmp_path / "out", *common), train_args(missing, tmp_path / "out", *common)], tmp_path
    )
    (code0, output0), (code1, output1) = finish(nodes, PROMPT_S)

    assert code0 != 0 and code1 != 0
    (line1,) = error_lines(output1)
    assert str(missing) in line1 and "--no-download" in line1, line1
    (line0,) = error_lines(output0)
    assert "process 1 on" in line0 and str(missing) in line0, line0  # the first node says which process failed
    assert no_traceback_through_fmnist_dist(output0 + output1), output0 + output1
    assert not (tmp_path / "out" / "model.pth").exists()


def test_an_output_dir_not_shared_by_the_nodes_is_refused_before_training(data_dir: Path, tmp_path: Path) -> None:
    common = ("--cpu", "--epochs", "1", "--no-progress")
    nodes = start_two_nodes(
        [train_args(data_dir, tmp_path / "node0-out", *common), train_args(data_dir, tmp_path / "node1-out", *common)],
        tmp_path,
    )
    (code0, output0), (code1, output1) = finish(nodes, PROMPT_S)

    assert code0 != 0 and code1 != 0
    (line1,) = error_lines(output1)
    assert "not the same directory on every node" in line1 and "shares" in line1, line1
    assert len(error_lines(output0)) == 1
    assert not list(tmp_path.rglob("model.pth")) and not list(tmp_path.rglob(PROGRESS_FILE))


@pytest.fixture(scope="module")
def long_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_data(tmp_path_factory, "long", 20000, 100, seed=5)


def wait_for_a_state(output_dir: Path, launches: list[subprocess.Popen]) -> None:
    """Until a state is saved: every process is training."""
    deadline = time.monotonic() + 120
    while not list(output_dir.glob(f"{STATES_DIR}/*/{PROGRESS_FILE}")):
        assert time.monotonic() < deadline and all(launch.poll() is None for launch in launches), "no state saved"
        time.sleep(0.1)


def test_a_process_whose_peer_died_mid_training_ends_with_one_line(long_data_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    args = training_until_killed(long_data_dir, output_dir)
    nodes = start_two_nodes([args, args], tmp_path)
    wait_for_a_state(output_dir, nodes)
    (second_nodes_rank,) = children(nodes[1].pid)
    os.kill(second_nodes_rank, signal.SIGKILL)
    (code0, output0), _ = finish(nodes, PROMPT_S)

    assert code0 != 0
    (line0,) = error_lines(output0)
    assert "another process of this job failed" in line0 and "by peer" in line0, line0
    assert no_traceback_through_fmnist_dist(output0), output0


def start_one_node(args: Sequence, cwd: Path) -> subprocess.Popen:
    """`accelerate launch --config_file launch/cpu.yaml`: two processes on this node, output piped."""
    return subprocess.Popen(
        launch_command(args),
        cwd=cwd,
        env=cli_env(**QUIET),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


# CPU ticks (1/100 s) a waiting process may use in 3 s: gloo's rendezvous wakes about once a second to poll,
# a tick each time; a process that starts Python or trains uses a hundred times more.
IDLE_TICKS = 5


def wait_until_blocked(pid: int, still_s: float = 3.0, timeout: float = 240) -> None:
    """Until the process has used at most IDLE_TICKS of CPU in `still_s` seconds (it waits for something)."""
    deadline = time.monotonic() + timeout
    while True:
        before = cpu_ticks(pid)
        time.sleep(still_s)
        if cpu_ticks(pid) - before <= IDLE_TICKS:
            return
        assert time.monotonic() < deadline, "the process never blocked"


LAUNCHER_KILLS_AFTER_S = 30  # torch's launcher: SIGKILL this long after its SIGTERM to a process that ignored it


def test_a_peer_lost_while_the_process_group_forms_ends_the_other_with_one_line(data_dir: Path, tmp_path: Path) -> None:
    """Rank 1 is held before it joins, so rank 0 waits in gloo's rendezvous; then rank 1 is killed."""
    node = start_one_node(train_args(data_dir, tmp_path / "out", "--cpu", "--no-progress"), tmp_path)
    stopped: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(children(node.pid)) < 2:
            assert time.monotonic() < deadline, "the launcher started no processes"
            time.sleep(0.02)
        rank0, rank1 = sorted(children(node.pid))
        stopped.append(rank1)
        os.kill(rank1, signal.SIGSTOP)
        wait_until_blocked(rank0)
        os.kill(rank1, signal.SIGKILL)
        killed = time.monotonic()
        output, _ = node.communicate(timeout=PROMPT_S)
        took = time.monotonic() - killed
    finally:
        for pid in stopped:  # a stopped rank outlives a launcher that has ended, and holds its output pipe
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.communicate()

    assert took < LAUNCHER_KILLS_AFTER_S, (took, output)  # rank 0 ended itself; the launcher did not kill it
    (line,) = error_lines(output)
    assert "another process of this job failed" in line and "init_process_group" in line, line
    assert f"exitcode  : {128 + signal.SIGTERM} (pid: {rank0})" in output, output
    assert no_traceback_through_fmnist_dist(output), output


def test_the_survivor_of_a_lost_first_process_on_its_node_says_so(long_data_dir: Path, tmp_path: Path) -> None:
    """Local rank 0, which prints its node's shared errors, is killed mid-training: local rank 1 says what happened."""
    output_dir = tmp_path / "out"
    node = start_one_node(training_until_killed(long_data_dir, output_dir), tmp_path)
    wait_for_a_state(output_dir, [node])
    local_rank0, _ = sorted(children(node.pid))
    os.kill(local_rank0, signal.SIGKILL)
    ((code, output),) = finish([node], PROMPT_S)

    assert code != 0
    (line,) = error_lines(output)
    assert "another process of this job failed" in line, line
    assert no_traceback_through_fmnist_dist(output), output


def test_a_refused_start_ends_every_process_with_exit_2_and_our_line_in_the_launchers_report(
    data_dir: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "out"
    earlier = run_cli(train_args(data_dir, output_dir, "--epochs", "1", "--no-progress"), cwd=tmp_path)
    assert earlier.returncode == 0, earlier.stderr

    ((code, output),) = finish(
        [start_one_node(train_args(data_dir, output_dir, "--cpu", "--no-progress"), tmp_path)], PROMPT_S
    )

    assert code != 0
    (line,) = error_lines(output)
    assert "holds an earlier run" in line, output
    # Both processes exited 2 themselves (no SIGTERM, no SIGABRT), and the launcher's report shows our line.
    assert output.count("exitcode  : 2 (pid") == 2, output
    assert "terminate called" not in output and "SIGABRT" not in output, output
    assert output.count(f"traceback : {line.removeprefix(ERROR)}") == 2 and "<N/A>" not in output, output
