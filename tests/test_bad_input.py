"""Bad input: every case ends with exit code 2 and one line on stderr, `fmnist-dist: error: ...`, that names the
file or flag and says what to do; no traceback; and the outputs of an earlier run stay byte-identical.

`train` runs as a real process (it builds an Accelerator); flag and checkpoint checks, which need none, call
the CLI's `main` in this process.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import FinishedRun, run_cli, train_args
from damages import cut_images_short, truncate_weights
from torch import nn

from fmnist_dist.cli import main
from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.storage.run_dir import PROGRESS_FILE, STATES_DIR

PREFIX = "fmnist-dist: error: "
QUIET = {"OMP_NUM_THREADS": "1"}  # one thread per process: faster on a small shared CPU


def files_in(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (or the file itself), by relative path, with its bytes."""
    if directory.is_file():
        return {"": directory.read_bytes()}
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_refused(returncode: int, stdout: str, stderr: str, *named: str) -> str:
    """Exit code 2 and exactly one error line that mentions everything in `named`; return that line."""
    assert "Traceback" not in stdout + stderr, stderr
    lines = stderr.strip().splitlines()
    assert returncode == 2, stderr
    assert len(lines) == 1 and lines[0].startswith(PREFIX), stderr
    for word in named:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def output_dir(one_epoch_run: FinishedRun, tmp_path: Path) -> Path:
    """A copy of the session's finished 1-epoch run (model.pth, metrics.jsonl, plots, a saved state), for a
    command to leave alone."""
    return Path(shutil.copytree(one_epoch_run.output_dir, tmp_path / "out"))


def train_refused(data: Path, output_dir: Path, *extra, named: tuple[str, ...] = ()) -> str:
    before = files_in(output_dir) if output_dir.exists() else None
    result = run_cli(train_args(data, output_dir, "--epochs", "1", *extra), cwd=Path(data).parent, **QUIET)
    line = assert_refused(result.returncode, result.stdout, result.stderr, *named)
    if before is not None:
        assert files_in(output_dir) == before
    return line


# ------------------------------------------------------------------------------------------- dataset files
# Every damage of tests/damages.py is checked in this process by tests/test_damaged_inputs.py; one of the family
# here, end to end.


@pytest.mark.integration
def test_damaged_dataset_file_is_refused(corrupt_data_dir: Path, output_dir: Path) -> None:
    name = cut_images_short(corrupt_data_dir / "FashionMNIST" / "raw")
    # --overwrite: even a run allowed to replace the earlier run leaves it alone when its data is damaged.
    train_refused(corrupt_data_dir, output_dir, "--overwrite", named=(name, "truncated", "download again"))


# ----------------------------------------------------------------------------------- output dir and resume


@pytest.mark.integration
def test_output_dir_that_is_a_file_is_refused(data_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_bytes(b"someone else's file")
    train_refused(data_dir, blocker, named=(str(blocker), "--output-dir"))


@pytest.mark.integration
def test_output_dir_under_a_file_is_refused(data_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "results"
    blocker.write_bytes(b"someone else's file")
    train_refused(data_dir, blocker / "run1", named=("--output-dir",))
    assert blocker.read_bytes() == b"someone else's file"


@pytest.mark.integration
def test_resume_without_saved_state_is_refused(data_dir: Path, output_dir: Path) -> None:
    shutil.rmtree(output_dir / STATES_DIR)
    train_refused(data_dir, output_dir, "--resume", named=("--resume", "no saved training state", "without --resume"))


@pytest.mark.integration
def test_resume_from_a_damaged_state_is_refused(data_dir: Path, output_dir: Path) -> None:
    """Truncated weights, found only when Accelerate loads them, after the run is built; damaged progress.json
    files are checked in this process by tests/test_damaged_inputs.py."""
    (state,) = (output_dir / STATES_DIR).iterdir()
    truncate_weights(state)
    train_refused(data_dir, output_dir, "--resume", named=(str(state), "cannot be read", "--resume STATE_DIR"))


@pytest.mark.integration
def test_resume_of_a_state_whose_saved_settings_no_flag_would_take_is_refused(data_dir: Path, output_dir: Path) -> None:
    # The family's end-to-end case; tests/test_settings.py checks each kind of value in-process.
    (state,) = (output_dir / STATES_DIR).iterdir()
    progress = json.loads((state / PROGRESS_FILE).read_text())
    progress["config"]["epochs"] = "6"
    (state / PROGRESS_FILE).write_text(json.dumps(progress))
    # No --epochs here: the run would take the saved one.
    args = [arg for arg in map(str, train_args(data_dir, output_dir, "--resume")) if arg not in ("--epochs", "2")]
    before = files_in(output_dir)
    result = run_cli(args, cwd=output_dir.parent, **QUIET)
    assert_refused(result.returncode, result.stdout, result.stderr, str(state), "epochs is '6'", "--epochs")
    assert files_in(output_dir) == before


# --------------------------------------------------------------------------------------------------- flags


@pytest.mark.integration
@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--epochs", "0"),
        ("--epochs", "two"),
        ("--batch-size", "-4"),
        ("--eval-batch-size", "0"),
        ("--lr", "nan"),
        ("--lr", "0"),
        ("--momentum", "-0.5"),
        ("--keep-states", "0"),
        ("--checkpoint-every", "-1"),
        ("--gradient-accumulation-steps", "0"),
        ("--log-every", "0"),
        ("--profile-steps", "-1"),
        ("--resume", ""),
    ],
)
def test_invalid_hyperparameter_is_refused(
    flag: str, value: str, data_dir: Path, output_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    before = files_in(output_dir)
    returncode = cli_returncode([*map(str, train_args(data_dir, output_dir)), flag, value])
    captured = capsys.readouterr()
    assert_refused(returncode, captured.out, captured.err, flag, value)
    assert files_in(output_dir) == before


def cli_returncode(argv: list[str]) -> int:
    """`main(argv)`'s exit code, also when argparse leaves by SystemExit."""
    try:
        return main(argv)
    except SystemExit as leaving:
        return leaving.code


# ---------------------------------------------------------------------------------------------- checkpoints


class RunsCodeWhenLoaded:
    """Unpickling this calls os.system: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def truncated(path: Path) -> None:
    torch.save(NeuralNetwork().state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def not_a_checkpoint(path: Path) -> None:
    path.write_bytes(b"hello, I am a text file\n" * 10)


def list_of_tensors(path: Path) -> None:
    torch.save(list(NeuralNetwork().state_dict().values()), path)


def one_tensor(path: Path) -> None:
    torch.save(torch.zeros(3), path)


def dict_of_numbers(path: Path) -> None:
    torch.save({"epoch": 3, "lr": 0.1}, path)


def whole_pickled_model(path: Path) -> None:
    torch.save(NeuralNetwork(), path)


def other_architecture(path: Path) -> None:
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).state_dict(), path)


def wider_hidden_layer(path: Path) -> None:
    state = NeuralNetwork().state_dict()
    state["linear_relu_stack.0.weight"] = torch.zeros(1024, 784)
    torch.save(state, path)


RESAVE = "torch.save(model.state_dict()"
RETRAIN = "re-save it or train again"
OURS = "pass a model.pth saved by fmnist-dist"


@pytest.mark.parametrize(
    ("make", "problem", "advice"),
    [
        (None, "does not exist", "train first"),
        (truncated, "truncated or corrupted", RETRAIN),
        (empty, "truncated or corrupted", RETRAIN),
        (not_a_checkpoint, "truncated or corrupted", RETRAIN),
        (list_of_tensors, "holds a list, not a state_dict", RESAVE),
        (one_tensor, "holds a Tensor, not a state_dict", RESAVE),
        (dict_of_numbers, "not tensors: ['epoch', 'lr']", RESAVE),
        (whole_pickled_model, "refused", RESAVE),
        (other_architecture, "missing keys ['linear_relu_stack.0.bias'", OURS),
        (other_architecture, "unexpected keys ['1.bias', '1.weight']", OURS),
        (wider_hidden_layer, "shape mismatches ['linear_relu_stack.0.weight (1024, 784) vs (512, 784)']", OURS),
    ],
)
def test_bad_checkpoint_is_refused(
    make: Callable[[Path], None] | None,
    problem: str,
    advice: str,
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    checkpoint = tmp_path / "model.pth"
    if make is not None:
        make(checkpoint)
    before = files_in(tmp_path)
    returncode = cli_returncode(
        ["predict", "--checkpoint", str(checkpoint), "--index", "0", "--data-dir", str(data_dir), "--no-download"]
    )
    captured = capsys.readouterr()
    assert_refused(returncode, captured.out, captured.err, str(checkpoint), problem, advice)
    assert files_in(tmp_path) == before


@pytest.mark.integration
def test_checkpoint_that_would_run_code_is_refused_without_running_it(data_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "model.pth"
    torch.save(RunsCodeWhenLoaded(marker), checkpoint)
    result = run_cli(
        ["evaluate", "--checkpoint", checkpoint, "--data-dir", data_dir, "--no-download", "--cpu"],
        cwd=tmp_path,
        **QUIET,
    )
    assert_refused(result.returncode, result.stdout, result.stderr, str(checkpoint), "refused", "system", RESAVE)
    assert not marker.exists(), "loading the checkpoint ran its code"
