"""W&B credentials are found the way wandb finds them, and starting a run never stalls training: a wrong key
with the server unreachable falls back to an offline run within the init timeout, online mode without credentials
on a terminal records offline instead of waiting at wandb's login prompt, and a key stored by `wandb login` is
recognised. Every run here gets its own HOME, so no real credentials or settings are read.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli_env, train_args
from test_outputs import run_on_terminal

from fmnist_dist.tracking.wandb_tracker import INIT_TIMEOUT_SECONDS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAKE_KEY = "0123456789abcdef" * 3  # 48 characters: well formed, wrong everywhere
WANDB_CLI = Path(sys.executable).parent / "wandb"
# A 1-epoch run on the small synthetic set takes a few seconds; an unbounded wandb.init waited 90 s and more.
START_UP_ALLOWANCE = 30


def closed_port_url() -> str:
    """A local address nothing listens on: every connection is refused at once, as with no network."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def user_env(home: Path, **extra: str) -> dict[str, str]:
    """cli_env for a user with their own HOME and no WANDB_MODE or WANDB_SILENT of their own, plus `extra`."""
    env = cli_env(HOME=str(home), **extra)
    for name in ("WANDB_MODE", "WANDB_SILENT", "NETRC"):
        if name not in extra:
            env.pop(name, None)
    return env


def offline_runs(cwd: Path) -> list[Path]:
    return sorted((cwd / "wandb").glob("offline-run-*"))


def test_a_wrong_key_with_no_network_falls_back_to_offline_within_the_init_timeout(
    data_dir: Path, tmp_path: Path
) -> None:
    env = user_env(tmp_path, WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=closed_port_url())
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fmnist_dist",
            *map(str, train_args(data_dir, tmp_path / "out", "--cpu", "--epochs", "1", "--tracker", "wandb")),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("fmnist-dist: warning: ")]
    assert len(warnings) == 1 and "could not start online" in warnings[0] and "offline instead" in warnings[0]
    assert len(offline_runs(tmp_path)) == 1
    assert (tmp_path / "out" / "model.pth").is_file()
    assert elapsed < INIT_TIMEOUT_SECONDS + START_UP_ALLOWANCE, f"{elapsed:.0f} s"


def test_online_mode_without_credentials_on_a_terminal_records_offline_without_prompting(
    data_dir: Path, tmp_path: Path
) -> None:
    command = [
        sys.executable,
        "-m",
        "fmnist_dist",
        *map(
            str, train_args(data_dir, tmp_path / "out", "--cpu", "--epochs", "1", "--tracker", "wandb", "--no-progress")
        ),
    ]
    # run_on_terminal fails the test if the run is still waiting (at wandb's prompt) when the time is up. wandb
    # prompts only on a terminal and when not silent.
    returncode, output = run_on_terminal(
        command, tmp_path, timeout=120, HOME=str(tmp_path), WANDB_MODE="online", WANDB_SILENT="false"
    )
    assert returncode == 0, output[-3000:]
    assert "WANDB_MODE=online but no W&B credentials were found" in output
    assert len(offline_runs(tmp_path)) == 1


def credentials_found(home: Path, **env: str) -> bool:
    """What the job's credential lookup says, in a fresh process with `home` as HOME."""
    code = (
        "from fmnist_dist.tracking.wandb_tracker import has_wandb_credentials, prepare_wandb; prepare_wandb(); "
        "print(has_wandb_credentials())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=user_env(home, **env), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1] == "True"


def test_a_key_stored_by_wandb_login_is_found(tmp_path: Path) -> None:
    assert not credentials_found(tmp_path)
    login = subprocess.run(
        [str(WANDB_CLI), "login", "--no-verify", FAKE_KEY],
        env=user_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert login.returncode == 0, login.stderr[-3000:]
    # wandb 0.31 stores it for its own default host, which is not api.wandb.ai: only wandb knows where to look.
    netrc = (tmp_path / ".netrc").read_text()
    assert FAKE_KEY in netrc and "machine api.wandb.ai" not in netrc
    assert credentials_found(tmp_path)


def test_a_key_in_the_environment_is_found(tmp_path: Path) -> None:
    assert credentials_found(tmp_path, WANDB_API_KEY=FAKE_KEY)


def test_a_malformed_key_records_offline_with_one_warning(data_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fmnist_dist",
            *map(str, train_args(data_dir, tmp_path / "out", "--cpu", "--epochs", "1", "--tracker", "wandb")),
        ],
        cwd=tmp_path,
        env=user_env(tmp_path, WANDB_API_KEY="too-short"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("fmnist-dist: warning: ")]
    assert len(warnings) == 1 and "credentials are unusable" in warnings[0]
    assert len(offline_runs(tmp_path)) == 1


def train_online_unreachable(data_dir: Path, tmp_path: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    """A 1-epoch job that asks W&B to run online with a wrong key and no server, plus `flags` and `env`. The
    timeout fails the test if the job does not end by itself."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "fmnist_dist",
            *map(str, train_args(data_dir, tmp_path / "out", "--cpu", "--epochs", "1", "--tracker", "wandb", *flags)),
        ],
        cwd=tmp_path,
        env=user_env(tmp_path, WANDB_API_KEY=FAKE_KEY, WANDB_BASE_URL=closed_port_url(), **env),
        capture_output=True,
        text=True,
        timeout=INIT_TIMEOUT_SECONDS + START_UP_ALLOWANCE + 60,
    )


def warning_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("fmnist-dist: warning: ")]


@pytest.mark.parametrize("timeout", ["0", "abc"], ids=["zero", "not-a-number"])
def test_an_unusable_init_timeout_is_ignored_with_a_warning_and_the_job_ends(
    timeout: str, data_dir: Path, tmp_path: Path
) -> None:
    """wandb takes WANDB_INIT_TIMEOUT=0 (or less) and its service then never gives up, hanging the job at exit;
    it fails on a non-number with a traceback."""
    result = train_online_unreachable(data_dir, tmp_path, WANDB_INIT_TIMEOUT=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = warning_lines(result)
    assert f"WANDB_INIT_TIMEOUT='{timeout}' is not a positive number of seconds" in first
    assert "could not start online" in second and "offline instead" in second
    assert len(offline_runs(tmp_path)) == 1
    assert (tmp_path / "out" / "model.pth").is_file()


@pytest.mark.parametrize(("variable", "value"), [("WANDB_PROJECT", "bad/name"), ("WANDB_RUN_ID", "bad/id")])
def test_a_wandb_variable_wandb_rejects_is_named_in_one_warning_and_training_goes_on(
    variable: str, value: str, data_dir: Path, tmp_path: Path
) -> None:
    result = train_online_unreachable(data_dir, tmp_path, **{variable: value})
    assert result.returncode == 0, result.stderr[-3000:]
    (warning,) = warning_lines(result)
    assert f"W&B could not start ({variable}='{value}' is invalid: " in warning
    assert "training goes on without W&B tracking" in warning
    assert (tmp_path / "out" / "model.pth").is_file()
