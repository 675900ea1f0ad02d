"""A launched process ends with its launcher: no rank goes on training as an orphan.

torchrun and `accelerate launch` start each rank as a child in a session of its own, so when the launcher is
killed (even by SIGKILL, which it cannot forward) nothing reaches the ranks and they would train on, writing
states and model.pth alongside any job started afterwards. Linux's parent-death signal closes that gap: the
kernel sends it to the rank the moment its launcher dies, and the rank's SIGTERM handling takes over.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Set by torch's elastic agent (torchrun, and `accelerate launch` of several processes) in every rank it starts.
LAUNCHER_MARK = "TORCHELASTIC_RUN_ID"


def stop_with_launcher(signum: signal.Signals = signal.SIGTERM) -> bool:
    """If a launcher started this process, have Linux send it `signum` when the launcher dies.

    Call it first thing at start-up. Elsewhere (a plain run from a shell, which `nohup` may outlive, or a
    system other than Linux) it does nothing.

    Returns:
        Whether the signal is now armed.

    Raises:
        OSError: the kernel refused the request.
    """
    if not sys.platform.startswith("linux") or LAUNCHER_MARK not in os.environ:
        return False
    launcher = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")
    # A launcher that died before the request was armed sends nothing: this process was already handed to init
    # (pid 1) or to a subreaper, and its parent is no longer the one it had.
    if launcher == 1 or os.getppid() != launcher:
        os.kill(os.getpid(), signum)
    return True
