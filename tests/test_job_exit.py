"""How a process leaves: output streams that never fail, its line for torch's launcher, clean-up failures that
never hide the error that ended the job, and the line of a process that a stop signal found stuck."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import train_args
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from fmnist_dist import cli
from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.runtime import stop_signals
from fmnist_dist.runtime.job_exit import ERROR_FILE_VARIABLE, record_for_launcher, released_after
from fmnist_dist.runtime.output_streams import NeverFailingStream, keep_output_from_failing
from fmnist_dist.storage.output_dir import OutputDirLock

ERROR = "fmnist-dist: error: "
WARNING = "fmnist-dist: warning: "


def test_a_stream_whose_reader_left_drops_its_output_instead_of_raising(tmp_path: Path) -> None:
    readable, writable = os.pipe()
    with open(writable, "w") as pipe:
        stream = NeverFailingStream(pipe, "stderr")
        os.close(readable)  # `| head -2` has read its lines

        for _ in range(3):  # more than a pipe's buffer: the kernel refuses the write (EPIPE)
            stream.write("x" * 70_000 + "\n")
            stream.flush()

        assert stream.lost
        assert os.path.samefile(f"/proc/self/fd/{writable}", os.devnull)  # torch's C++ and logging write there too


def test_a_closed_stream_drops_its_output_instead_of_raising() -> None:
    stream = NeverFailingStream(None, "stdout")  # what Python gives for a descriptor closed at start
    assert stream.write("lost\n") == len("lost\n")
    stream.flush()


def test_stdout_to_a_file_shows_each_line_as_it_is_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SLURM job's output file or `| tee`: Python block-buffers such a stdout, and a job's lines came at exit."""
    log = tmp_path / "job.log"
    with open(log, "w") as stream:
        monkeypatch.setattr(sys, "stdout", stream)
        monkeypatch.setattr(sys, "stderr", sys.stderr)  # restored afterwards: keep_output_from_failing wraps it
        keep_output_from_failing()

        print("epoch 1/5: ...")
        assert log.read_text() == "epoch 1/5: ...\n"


def test_a_stdout_that_fails_as_it_is_made_line_buffered_is_still_kept_from_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Making it line-buffered flushes it first: a closed stream, or text waiting for a reader that left, raises
    there, before the never-failing wrapper is in place."""
    closed = open(tmp_path / "job.log", "w")  # noqa: SIM115 (closed below)
    closed.close()
    monkeypatch.setattr(sys, "stdout", closed)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    keep_output_from_failing()

    print("epoch 1/5: ...")
    assert sys.stdout.lost


@pytest.mark.parametrize("closed_at_start", [False, True], ids=["full-disk", "closed"])
@pytest.mark.parametrize("command", [["evaluate", "--json"], ["predict", "--index", "0"]])
def test_results_that_never_reached_stdout_are_an_error_not_success(
    command: list[str],
    closed_at_start: bool,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`fmnist-dist evaluate --json > result.json` on a full disk, or with stdout closed: exit 2, not 0 beside an
    empty file that a script would take for the answer."""
    torch.save(NeuralNetwork().state_dict(), tmp_path / "model.pth")
    stdout = None if closed_at_start else open("/dev/full", "w")  # noqa: SIM115 (the stream owns it)
    monkeypatch.setattr(sys, "stdout", NeverFailingStream(stdout, "stdout"))
    argv = [*command, "--checkpoint", str(tmp_path / "model.pth"), "--data-dir", str(data_dir)]

    assert cli.main(argv) == cli.USAGE_ERROR
    assert f"{ERROR}standard output failed" in capsys.readouterr().err


@pytest.mark.integration
def test_a_run_with_stdout_closed_at_start_writes_nothing_into_its_files(data_dir: Path, tmp_path: Path) -> None:
    # Without a descriptor 1, the first file opened would get it, and the epoch lines would go into it.
    args = " ".join(map(str, train_args(data_dir, tmp_path / "out", "--epochs", "1", "--no-progress")))
    result = subprocess.run(
        ["sh", "-c", f"exec {sys.executable} -m fmnist_dist {args} >&-"],
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "offline", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    assert b"epoch 1/1" not in b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())


def test_the_launcher_reports_our_line_from_the_error_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    error_file = tmp_path / "error.json"
    monkeypatch.setenv(ERROR_FILE_VARIABLE, str(error_file))

    record_for_launcher("--output-dir out holds an earlier run")

    # What torch's launcher does with it when the process exits non-zero.
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    report = ChildFailedError("fmnist_dist", {0: failure}).format_msg()
    assert f"error_file: {error_file}" in report
    assert "traceback : --output-dir out holds an earlier run\n" in report
    assert list(tmp_path.iterdir()) == [error_file]


def test_without_a_launcher_no_error_file_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ERROR_FILE_VARIABLE, raising=False)
    monkeypatch.chdir(tmp_path)
    record_for_launcher("anything")
    assert not list(tmp_path.iterdir())


class FailingRelease:
    def __enter__(self) -> FailingRelease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        raise PermissionError(13, "Permission denied", "out/.fmnist-dist.lock")


def test_a_failed_clean_up_rides_on_the_error_as_a_note() -> None:
    with pytest.raises(UsageError) as raised, released_after(FailingRelease(), "releasing the lock"):
        raise UsageError("the real error")

    assert str(raised.value) == "the real error"
    assert raised.value.__notes__ == [
        "releasing the lock failed (PermissionError: [Errno 13] Permission denied: 'out/.fmnist-dist.lock')"
    ]


def test_a_failed_clean_up_after_success_is_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    with released_after(FailingRelease(), "releasing the lock"):
        pass

    assert capsys.readouterr().err.startswith(f"{WARNING}releasing the lock failed (PermissionError")


def test_a_failing_lock_release_leaves_the_real_error_and_one_warning_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def release(self: OutputDirLock) -> None:
        raise PermissionError(13, "Permission denied", str(self.path))

    monkeypatch.setattr(OutputDirLock, "release", release)
    missing = tmp_path / "no-data"

    code = cli.main([str(a) for a in train_args(missing, tmp_path / "out", "--no-progress")])

    lines = capsys.readouterr().err.splitlines()
    assert code == cli.USAGE_ERROR
    assert len(lines) == 2 and lines[0].startswith(ERROR) and str(missing) in lines[0], lines
    assert lines[1].startswith(f"{WARNING}releasing the lock of --output-dir") and "PermissionError" in lines[1]


def stuck_in(*stack: tuple[str, str], signum: signal.Signals = signal.SIGTERM) -> str:
    """The line of a process stuck in the innermost of `stack`'s (module, function) pairs, outermost first:
    stand-ins of torch's modules, each calling the next."""

    def wait() -> str:
        return stop_signals.stuck_message(signum, sys._getframe(1))

    for module, function in reversed(stack):
        namespace: dict = {"__name__": module, "inner": wait}
        exec(f"def {function}():\n    return inner()\n", namespace)
        wait = namespace[function]
    return wait()


def in_a_job_of(monkeypatch: pytest.MonkeyPatch, world_size: int) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world_size)


BACKWARD = [
    ("torch._tensor", "backward"),
    ("torch.autograd", "backward"),
    ("torch.autograd.graph", "_engine_run_backward"),
]
DDP_FORWARD = [("torch.nn.parallel.distributed", "forward"), ("torch.nn.parallel.distributed", "_pre_forward")]


def test_a_stuck_process_names_the_collective_it_waits_in() -> None:
    line = stuck_in(("torch.distributed.distributed_c10d", "barrier"))

    assert line.startswith(
        "stopped by SIGTERM after waiting 15 s for the job's other processes in torch.distributed's barrier: "
        "another process of this job failed or is still busy (the first error"
    ), line


@pytest.mark.parametrize(("stack", "step"), [(BACKWARD, "backward"), (DDP_FORWARD, "forward")])
def test_a_process_stuck_in_ddp_of_a_job_of_several_may_wait_for_the_others(
    monkeypatch: pytest.MonkeyPatch, stack: list[tuple[str, str]], step: str
) -> None:
    """DDP talks to the other processes from C++ (backward's all-reduce hooks, forward's bucket rebuild), with no
    torch.distributed frame on the stack; there the step's own computation may be what is slow."""
    in_a_job_of(monkeypatch, 2)

    line = stuck_in(*stack)

    innermost = stack[-1][1]
    assert line.startswith(
        f"stopped by SIGTERM after 15 s in DistributedDataParallel's {step} ({innermost}, <string>:2), where it "
        "may wait for the job's other processes: another process of this job failed or is still busy (the first "
        f"error in the job's output, on the node where it happened, says which, if any), or this process's {step} "
        "itself takes this long; nothing since"
    ), line


@pytest.mark.parametrize(
    "stack",
    [
        pytest.param([("torch.autograd.graph", "_engine_run_forward")], id="autograd-not-backward"),
        pytest.param([("torch.nn.modules.linear", "backward")], id="backward-not-autograd"),
        pytest.param([*BACKWARD, ("tests.custom_function", "backward")], id="a-python-backward-under-the-engine"),
        pytest.param([*DDP_FORWARD[:1], ("torch.nn.modules.linear", "forward")], id="the-model-under-ddp-forward"),
    ],
)
def test_a_process_of_a_job_of_several_stuck_outside_ddp_and_collectives_says_where(
    monkeypatch: pytest.MonkeyPatch, stack: list[tuple[str, str]]
) -> None:
    in_a_job_of(monkeypatch, 2)

    line = stuck_in(*stack)

    innermost = stack[-1][1]
    assert line.startswith(
        f"stopped by SIGTERM without saving (SIGTERM arrived while it waited 15 s in {innermost}, "
    ), line


@pytest.mark.parametrize("stack", [BACKWARD, DDP_FORWARD])
@pytest.mark.parametrize("process_group", ["of-one-process", "not-formed"])
def test_a_process_alone_stuck_in_backward_or_forward_says_where(
    monkeypatch: pytest.MonkeyPatch, stack: list[tuple[str, str]], process_group: str
) -> None:
    if process_group == "of-one-process":
        in_a_job_of(monkeypatch, 1)
    else:
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)

    line = stuck_in(*stack)

    assert line.startswith(
        f"stopped by SIGTERM without saving (SIGTERM arrived while it waited 15 s in {stack[-1][1]}, "
    ), line


@pytest.mark.parametrize("error", [ValueError, AttributeError])
def test_a_process_group_destroyed_while_the_watch_looks_leaves_it_a_line(
    monkeypatch: pytest.MonkeyPatch, error: type[Exception]
) -> None:
    """destroy_process_group between is_initialized and get_world_size raises inside torch."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)

    def destroyed(group: object = None) -> int:
        raise error("the default process group is gone")

    monkeypatch.setattr(torch.distributed, "get_world_size", destroyed)

    line = stuck_in(*BACKWARD)

    assert line.startswith("stopped by SIGTERM without saving (SIGTERM arrived while it waited 15 s in "), line


class Exited(Exception):
    pass


def test_a_process_whose_line_cannot_be_made_still_ends_with_one(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The watch thread must end a stuck process whatever goes wrong in naming where it waited."""

    def broken(signum: signal.Signals, frame: object) -> str:
        raise AttributeError("'NoneType' object has no attribute 'size'")

    def exit_code(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(stop_signals, "stuck_message", broken)
    monkeypatch.setattr(stop_signals.os, "_exit", exit_code)

    with pytest.raises(Exited) as exited:
        stop_signals._give_up(signal.SIGTERM, sys._getframe())

    assert exited.value.args == (128 + signal.SIGTERM,)
    assert capfd.readouterr().err == (
        "fmnist-dist: error: stopped by SIGTERM without saving, after waiting 15 s; nothing since the newest saved "
        "state is kept\n"
    )


def test_a_process_stuck_elsewhere_says_where() -> None:
    line = stop_signals.stuck_message(signal.SIGUSR1, sys._getframe())

    assert line.startswith("stopped by SIGUSR1 without saving (SIGUSR1 arrived while it waited 15 s in test_a_"), line
