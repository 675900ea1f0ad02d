"""Run the fmnist-dist CLI killed (exit 9, no clean-up) in the middle of replacing a state of the same step.

    python tests/helpers/killed_mid_state_replacement.py train --checkpoint-every 16 --keep-states 1 ...

The process dies at the rename of the KILL_AT-th (default 2) complete state into place: in the second save of a
step, that is after the older state of that step was deleted and before the new one took its name. The fault
is injected here, by wrapping `Path.rename`, so the package carries no test hooks.
"""

from __future__ import annotations

import os
from pathlib import Path

from fmnist_dist.cli import main
from fmnist_dist.storage.run_dir import COMPLETE_PREFIX

KILL_AT = int(os.environ.get("KILL_AT", "2"))
real_rename = Path.rename
renames_into_place = 0


def rename(self: Path, target):
    global renames_into_place
    if self.name.startswith(COMPLETE_PREFIX):
        renames_into_place += 1
        if renames_into_place == KILL_AT:
            os._exit(9)
    return real_rename(self, target)


Path.rename = rename  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(main())
