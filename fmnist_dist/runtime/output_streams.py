"""Output streams that never stop a run (a closed or broken stdout or stderr loses only the text written to it),
and whose lines can be followed while the run goes on.

Python ignores SIGPIPE, so a print to a pipe whose reader has left (`fmnist-dist train ... | head -2`) raises
BrokenPipeError, and a run started with stdout closed (`>&-`) has `sys.stdout = None`. Either would end a
training run between two of its files, say after metrics.jsonl and before that epoch's state. Here the
standard descriptors always point somewhere (/dev/null in place of a closed or broken one, as Python's
documentation advises for SIGPIPE), and the Python streams drop what they cannot write instead of raising.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Any, TextIO

STANDARD_DESCRIPTORS = (0, 1, 2)


def keep_output_from_failing() -> None:
    """From now on no write to stdout or stderr raises, and stdout shows each line as it is printed; call it
    first thing, before anything keeps a stream.

    A descriptor that is closed at start is opened on /dev/null first: else the next file this process opens
    (a state, the lock) would get its number, and text meant for the terminal would be written into it.
    """
    for descriptor in STANDARD_DESCRIPTORS:
        try:
            os.fstat(descriptor)
        except OSError:
            _point_to_devnull(descriptor)
    if not isinstance(sys.stdout, NeverFailingStream):  # main() may run more than once in a process (tests)
        sys.stdout = NeverFailingStream(_line_buffered(sys.stdout), "stdout")
    if not isinstance(sys.stderr, NeverFailingStream):
        sys.stderr = NeverFailingStream(sys.stderr, "stderr")


def _line_buffered(stream: TextIO | None) -> TextIO | None:
    """The stream, line-buffered also where it is a file or a pipe, as it already is on a terminal.

    Python block-buffers stdout that is not a terminal: in a SLURM job's output file, behind `| tee` or in
    `> train.log`, the start-up and epoch lines would come in blocks of several KiB or at exit, so a running job
    could not be followed, unless the user knew to set PYTHONUNBUFFERED. A run prints a few lines per epoch, so
    flushing each costs nothing.
    """
    if isinstance(stream, io.TextIOWrapper):
        # reconfigure flushes first; a stream that fails here is found broken at its first write, and diverted
        with contextlib.suppress(OSError, ValueError):
            stream.reconfigure(line_buffering=True)
    return stream


class NeverFailingStream:
    """A text stream whose writes and flushes never raise: once the stream fails, its output goes to /dev/null.

    Everything else (isatty, encoding, fileno, ...) is the wrapped stream's.
    """

    def __init__(self, stream: TextIO | None, name: str) -> None:
        self._stream: TextIO = stream if stream is not None else open(os.devnull, "w")  # noqa: SIM115 (kept open)
        self._name = name
        self.lost = stream is None  # whether its output has been going to /dev/null (closed at start: always)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError) as error:  # ValueError: the stream itself was closed
            self._divert(error)
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError) as error:
            self._divert(error)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def _divert(self, error: Exception) -> None:
        """Send this stream's descriptor to /dev/null (other writers of it too: tqdm, logging, torch's C++), and
        the text still buffered with it; say so on stderr when stdout was lost."""
        self.lost = True
        try:
            _point_to_devnull(self._stream.fileno())
            self._stream.flush()
        except (OSError, ValueError):
            self._stream = open(os.devnull, "w")  # noqa: SIM115 (kept open)
        if self._name == "stdout":
            print(
                f"fmnist-dist: warning: standard output is gone ({type(error).__name__}); the run goes on and its "
                "files are written as usual",
                file=sys.stderr,
                flush=True,
            )


def _point_to_devnull(descriptor: int) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    if devnull != descriptor:
        os.dup2(devnull, descriptor)
        os.close(devnull)
