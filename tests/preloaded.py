"""`python -m fmnist_dist ARGS` as a real process that does not pay for its imports.

Each process starting the CLI spends seconds of CPU importing torch, torchvision (which loads TorchDynamo),
Accelerate and matplotlib before it reads its arguments; the suite starts hundreds, on 2 cores. A process made
here is forked from a server process (multiprocessing's forkserver) that has imported them once: a fresh
process of its own (its own pid, working directory, environment, stdout and stderr files, signal handlers and
exit code), which runs the same `fmnist_dist.cli.main` as `python -m fmnist_dist`, without the imports.

The server is a clean interpreter, not a fork of pytest (whose threads would leave locks held in a fork). What
the CLI's modules read from the environment while they are imported comes from the server's environment (this
worker's, with OMP_NUM_THREADS=1; matplotlib's backend and configuration directory among them): a test of what
an import does with the environment (thread counts, wandb's variables, MPLBACKEND) starts a plain `python`
instead. All these processes also share one hash seed and memory layout, and they end by `os._exit`, without
the interpreter's finalisation (atexit, destructors): the tests of exit codes and teardown, and at least one
run of each kind, start a real interpreter or launcher (`conftest.run_cli`'s neighbours `launch_cli` and the
launcher tests).
"""

from __future__ import annotations

import importlib
import io
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from processes import free_port

# What `fmnist-dist train` imports before its first step; wandb is left out (it reads WANDB_* at import).
PRELOADED = ["fmnist_dist.cli", "fmnist_dist.training.job", "fmnist_dist.storage.plots", "fmnist_dist.inference"]

# The entry of `python -m fmnist_dist`.
CLI = "fmnist_dist.cli:main"

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOADED)


@dataclass(frozen=True)
class _Start:
    """What the forked process becomes: what a test would give `subprocess.Popen`, and what it runs."""

    entry: str
    argv: list[str]
    processes: int
    cwd: str
    env: dict[str, str]
    umask: int
    stdout: str
    stderr: str
    new_session: bool


class CliProcess:
    """One `fmnist-dist ARGS` process (or launch of processes): the part of `subprocess.Popen` the tests use
    (pid, poll, wait, send_signal, kill, returncode), with its stdout and stderr kept in files until
    `communicate`."""

    def __init__(
        self,
        args: Sequence[object],
        cwd: Path,
        env: Mapping[str, str],
        *,
        entry: str = CLI,
        processes: int = 1,
        new_session: bool = False,
    ) -> None:
        """Start it.

        Args:
            entry: "module:function" that the process runs with `args` and exits with the int it returns (the
                CLI's `main`, or a test helper that wraps it).
            processes: over 1, the process is a launcher that runs `entry` on that many gloo processes, forked
                from it by Accelerate's `notebook_launcher` (torch's elastic launcher, as under `accelerate
                launch`, with the same environment for each rank); it exits 0 when every rank exits 0.
            new_session: in a session and process group of its own (`start_new_session`), for `os.killpg`.
        """
        self.args = ["fmnist-dist", *map(str, args)]
        self._output = tempfile.TemporaryDirectory(prefix="fmnist-dist-cli-")
        self._streams = (Path(self._output.name) / "stdout", Path(self._output.name) / "stderr")
        start = _Start(
            entry, self.args[1:], processes, str(cwd), dict(env), _umask(), *map(str, self._streams), new_session
        )
        self._process = _context.Process(target=_run, args=(start,), daemon=False)
        self._process.start()
        self.pid: int = self._process.pid  # type: ignore[assignment]

    @property
    def returncode(self) -> int | None:
        return self._process.exitcode

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return self._process.exitcode

    def send_signal(self, signum: int) -> None:
        if self._process.exitcode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait_for_line(self, start: str, timeout: float) -> None:
        """Wait until a line of its stdout or stderr starts with `start` (it may still be running); AssertionError
        if it ends first or `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while not any(line.startswith(start) for line in "".join(self._texts()).splitlines()):
            assert self.poll() is None, f"it ended (exit code {self.poll()}) before printing {start!r}"
            assert time.monotonic() < deadline, f"{start!r} not printed within {timeout} s"
            time.sleep(0.02)

    def _texts(self) -> tuple[str, str]:
        """Its stdout and stderr so far (empty before it has opened them)."""
        stdout, stderr = (path.read_text(errors="replace") if path.exists() else "" for path in self._streams)
        return stdout, stderr

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the process to end, then its stdout and stderr (as text)."""
        self.wait(timeout)
        texts = self._texts()
        self._output.cleanup()
        return texts


def run(
    args: Sequence[object],
    cwd: Path,
    env: Mapping[str, str],
    timeout: float,
    entry: str = CLI,
    processes: int = 1,
) -> subprocess.CompletedProcess:
    """`fmnist-dist ARGS` in `cwd` with exactly `env` (on `processes` processes, see CliProcess), to its end,
    like `subprocess.run(capture_output=True)`; past `timeout` seconds it is killed and `subprocess.TimeoutExpired`
    raised."""
    process = CliProcess(args, cwd, env, entry=entry, processes=processes)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise subprocess.TimeoutExpired(process.args, timeout, stdout, stderr) from None
    except BaseException:  # an interrupted test (Ctrl-C, a timeout plugin): the server's child must not outlive it
        process.kill()
        process.communicate()
        raise
    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.wait(), stdout, stderr)


def _umask() -> int:
    """This process's umask, which a process it starts inherits (reading it means setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _run(start: _Start) -> None:
    """In the forked process: become the process the test started (in its working directory, with its
    environment and umask), its output to the two files, then exit as `python -m fmnist_dist` would."""
    if start.new_session:
        os.setsid()
    os.umask(start.umask)
    os.chdir(start.cwd)
    os.environ.clear()
    os.environ.update(start.env)
    tempfile.tempdir = None  # found again from TMPDIR and the rest of this environment, not the server's
    for fd, path in ((1, start.stdout), (2, start.stderr)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(file, fd)
        os.close(file)
    # As the interpreter makes them for files: block-buffered stdout (unless PYTHONUNBUFFERED), line-buffered stderr.
    unbuffered = bool(start.env.get("PYTHONUNBUFFERED"))
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=unbuffered)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), line_buffering=True, errors="backslashreplace"
    )
    sys.argv = [sys.argv[0], *start.argv]
    if start.processes == 1:
        raise SystemExit(_call(start.entry, start.argv))
    from accelerate import notebook_launcher

    notebook_launcher(_rank, args=(start.entry, start.argv), num_processes=start.processes, use_port=str(free_port()))


def _call(entry: str, argv: list[str]) -> int:
    module, function = entry.split(":")
    return getattr(importlib.import_module(module), function)(argv)


def _rank(entry: str, argv: list[str]) -> None:
    """One rank of a launch: a non-zero exit code fails the launch, as under torch's launcher."""
    code = _call(entry, argv)
    if code:
        raise SystemExit(code)
