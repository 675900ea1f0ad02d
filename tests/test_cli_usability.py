"""The command line as a new user meets it: `--version`, every default in every `--help`, errors that point to
the subcommand's help, `evaluate`/`predict` finding the model and data where `train` puts them, `plot` taking a
run directory or its metrics.jsonl, and every numeric flag range-checked (one line, exit code 2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import fmnist_dist
from fmnist_dist.cli import MAX_SYNTHETIC_IMAGES, build_parser, main
from fmnist_dist.config import DEFAULT_LR, MAX_SEED
from fmnist_dist.model import NeuralNetwork

PREFIX = "fmnist-dist: error: "


def exit_code(argv: list[str]) -> int | None:
    """`main(argv)`'s exit code, also when argparse leaves by SystemExit."""
    try:
        return main(argv)
    except SystemExit as leaving:
        return leaving.code


def one_error_line(capsys: pytest.CaptureFixture, argv: list[str], *named: str) -> str:
    returncode = exit_code(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert returncode == 2 and len(lines) == 1 and lines[0].startswith(PREFIX), captured.err
    assert "Traceback" not in captured.err
    for word in named:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_version(capsys: pytest.CaptureFixture) -> None:
    assert exit_code(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fmnist-dist {fmnist_dist.__version__}"


@pytest.mark.parametrize(("command", "shown"), [
    ("train", ["--epochs EPOCHS       passes over the training set (default: 5)", "(default: data)",
               "(default: checkpoints)", f"(default: {DEFAULT_LR})", "(default: fmnist-dist)"]),
    ("evaluate", ["(default: checkpoints/model.pth)", "(default: data)", "(default: 1000)"]),
    ("predict", ["(default: checkpoints/model.pth)", "(default: data)"]),
    ("synthetic-data", ["(default: 60000)", "(default: 10000)", "(default: 0)"]),
])
def test_every_help_shows_the_defaults(command: str, shown: list[str], capsys: pytest.CaptureFixture) -> None:
    assert exit_code([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    for default in shown:
        assert " ".join(default.split()) in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("argv", [["train"], ["evaluate"], ["predict", "--index", "0"],
                                  ["synthetic-data", "--out", "x"], ["plot", "run"]], ids=lambda argv: argv[0])
def test_an_unknown_flag_points_to_the_subcommands_help(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    one_error_line(capsys, [*argv, "--bogus"], "unrecognized arguments: --bogus", f"`fmnist-dist {argv[0]} --help`")


def test_evaluate_and_predict_read_where_train_writes_by_default() -> None:
    for command in ("evaluate", "predict"):
        args = build_parser().parse_args([command, "--index", "0"] if command == "predict" else [command])
        assert (args.checkpoint, args.data_dir) == (Path("checkpoints/model.pth"), Path("data"))


def test_predict_runs_with_no_paths_given_in_a_trained_directory(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    shutil.copytree(data_dir, tmp_path / "data")
    (tmp_path / "checkpoints").mkdir()
    torch.save(NeuralNetwork().state_dict(), tmp_path / "checkpoints" / "model.pth")
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--no-download", "--index", "0", "1"]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == ["test[0]", "test[1]"]


def write_metrics(run_dir: Path) -> Path:
    """A one-epoch metrics.jsonl as `train` writes it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"epoch": 1, "train_loss": 1.0, "test_loss": 1.1, "test_accuracy": 0.5,
              "confusion_matrix": [[1 if i == j else 0 for j in range(10)] for i in range(10)]}
    (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    return run_dir / "metrics.jsonl"


@pytest.mark.parametrize("given", ["run directory", "metrics.jsonl"])
def test_plot_takes_a_run_directory_or_its_metrics_file(given: str, tmp_path: Path) -> None:
    metrics = write_metrics(tmp_path / "run")
    assert main(["plot", str(metrics.parent if given == "run directory" else metrics)]) == 0
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "confusion.png").is_file()


@pytest.mark.parametrize(("argv", "named"), [
    (["synthetic-data", "--out", "x", "--seed", "-1"], ("--seed", "-1", str(MAX_SEED))),
    (["synthetic-data", "--out", "x", "--seed", str(MAX_SEED + 1)], ("--seed", str(MAX_SEED + 1))),
    (["synthetic-data", "--out", "x", "--train-size", "0"], ("--train-size", "greater than 0")),
    (["synthetic-data", "--out", "x", "--test-size", str(MAX_SYNTHETIC_IMAGES + 1)], ("--test-size", "at most")),
    (["train", "--seed", "-1"], ("--seed", "-1")),
    (["train", "--lr", "inf"], ("--lr", "inf")),
    (["train", "--warmup-epochs", "inf"], ("--warmup-epochs", "inf")),
    (["train", "--momentum", "nan"], ("--momentum", "nan")),
    (["train", "--threads", "0"], ("--threads", "0")),
    (["train", "--num-workers", "-1"], ("--num-workers", "-1")),
    (["evaluate", "--batch-size", "0"], ("--batch-size", "0")),
])
def test_numeric_flags_out_of_range_are_refused_in_one_line(
    argv: list[str], named: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    one_error_line(capsys, argv, *named)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_predict_index_out_of_range_is_refused_in_one_line(data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    one_error_line(capsys, ["predict", "--index", "-1", "--data-dir", str(data_dir), "--no-download"],
                   "--index -1", "outside the test set")
