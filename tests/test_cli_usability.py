"""The command line as a new user meets it: `--version`, every default in every `--help`, errors that point to
the subcommand's help, `evaluate`/`predict` finding the model and data where `train` puts them, `plot` taking a
run directory or its metrics.jsonl, and every numeric flag range-checked (one line, exit code 2).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fmnist_dist
from fmnist_dist.cli import build_parser, main
from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.settings.commands import MAX_SYNTHETIC_IMAGES
from fmnist_dist.settings.train_config import DEFAULT_LR, MAX_SEED

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


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (
            "train",
            [
                "--epochs EPOCHS       passes over the training set (default: 5)",
                "(default: data)",
                "(default: checkpoints)",
                f"(default: {DEFAULT_LR})",
                "(default: fmnist-dist)",
            ],
        ),
        ("evaluate", ["(default: checkpoints/model.pth)", "(default: data)", "(default: 1000)"]),
        ("predict", ["(default: checkpoints/model.pth)", "(default: data)"]),
        ("synthetic-data", ["(default: 60000)", "(default: 10000)", "(default: 0)"]),
    ],
)
def test_every_help_shows_the_defaults(command: str, shown: list[str], capsys: pytest.CaptureFixture) -> None:
    assert exit_code([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    for default in shown:
        assert " ".join(default.split()) in text
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize(
    "argv",
    [["train"], ["evaluate"], ["predict", "--index", "0"], ["synthetic-data", "--out", "x"], ["plot", "run"]],
    ids=lambda argv: argv[0],
)
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
    record = {
        "epoch": 1,
        "train_loss": 1.0,
        "test_loss": 1.1,
        "test_accuracy": 0.5,
        "confusion_matrix": [[1 if i == j else 0 for j in range(10)] for i in range(10)],
    }
    (run_dir / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    return run_dir / "metrics.jsonl"


@pytest.mark.parametrize("given", ["run directory", "metrics.jsonl"])
def test_plot_takes_a_run_directory_or_its_metrics_file(given: str, tmp_path: Path) -> None:
    metrics = write_metrics(tmp_path / "run")
    assert main(["plot", str(metrics.parent if given == "run directory" else metrics)]) == 0
    assert (tmp_path / "run" / "curves.png").is_file() and (tmp_path / "run" / "confusion.png").is_file()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
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
        (["evaluate", "--batch-size", "99999999999999999999"], ("--batch-size", "at most")),
        (["train", "--lr", "1e300"], ("--lr", "at most")),
    ],
)
def test_numeric_flags_out_of_range_are_refused_in_one_line(
    argv: list[str],
    named: tuple[str, ...],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    one_error_line(capsys, argv, *named)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_predict_index_out_of_range_is_refused_in_one_line(data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    one_error_line(
        capsys,
        ["predict", "--index", "-1", "--data-dir", str(data_dir), "--no-download"],
        "--index -1",
        "outside the test set",
    )


def numeric_flags() -> list[tuple[str, str, type]]:
    """(subcommand, flag, type) of every flag of every subcommand that takes a number."""
    # argparse has no public way to list a parser's subcommands and their flags.
    subcommands = build_parser()._subparsers._group_actions[0].choices
    return [
        (name, action.option_strings[0], action.type)
        for name, parser in subcommands.items()
        for action in parser._actions
        if action.type in (int, float)
    ]


BEYOND_RANGE = {int: (str(2**63), str(-(2**63))), float: ("1e300", "-1e300")}  # past int64, past float32


@pytest.mark.parametrize(("command", "flag", "kind"), numeric_flags(), ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("end", [0, 1], ids=["huge", "hugely-negative"])
def test_every_numeric_flag_of_every_subcommand_is_bounded(
    command: str,
    flag: str,
    kind: type,
    end: int,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    required = {"synthetic-data": ["--out", "x"], "train": ["--tracker", "none"]}.get(command, [])
    data = ["--data-dir", str(data_dir), "--no-download"] if command in ("train", "evaluate", "predict") else []
    one_error_line(capsys, [command, *required, *data, flag, BEYOND_RANGE[kind][end]], flag)
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("momentum", ["1", "1.5", "1e3"])
def test_momentum_of_one_or_more_is_refused(momentum: str, capsys: pytest.CaptureFixture) -> None:
    one_error_line(capsys, ["train", "--momentum", momentum], "--momentum", f"got {float(momentum)}", "below 1")


def predict_refused(capsys: pytest.CaptureFixture, checkpoint: Path, data_dir: Path, *named: str) -> str:
    """`predict --checkpoint CHECKPOINT --index 0` refused in one line naming the checkpoint and `named`."""
    argv = ["predict", "--checkpoint", str(checkpoint), "--index", "0", "--data-dir", str(data_dir), "--no-download"]
    return one_error_line(capsys, argv, str(checkpoint), *named)


def test_a_saved_state_directory_as_checkpoint_points_to_its_weights(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    state = tmp_path / "state" / "step-000000005"
    state.mkdir(parents=True)
    safetensors.torch.save_file(NeuralNetwork().state_dict(), state / "model.safetensors")
    predict_refused(
        capsys, state, data_dir, "is a directory (a saved training state)", str(state / "model.safetensors")
    )
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(state / "model.safetensors"),
                "--index",
                "0",
                "--data-dir",
                str(data_dir),
                "--no-download",
            ]
        )
        == 0
    )


def test_a_directory_or_fifo_as_checkpoint_is_named_for_what_it_is(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    predict_refused(capsys, tmp_path, data_dir, "is a directory")
    os.mkfifo(tmp_path / "fifo")
    predict_refused(capsys, tmp_path / "fifo", data_dir, "not a regular file")


def test_a_text_file_as_checkpoint_is_not_a_pytorch_checkpoint(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    line = predict_refused(capsys, write_metrics(tmp_path), data_dir, "is not a PyTorch checkpoint")
    assert "arbitrary objects" not in line


def with_first_weight(change: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    state = NeuralNetwork().state_dict()
    state["linear_relu_stack.0.weight"] = change(state["linear_relu_stack.0.weight"])
    return state


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda w: w.index_fill(1, torch.tensor([3]), float("nan")), "non-finite"),
        (lambda w: w.index_fill(1, torch.tensor([3]), float("inf")), "non-finite"),
        (lambda w: torch.empty_like(w, device="meta"), "meta tensor"),
        (lambda w: w.to_sparse(), "sparse"),
        (lambda w: w.to(torch.int64), "torch.int64 values, not floating-point"),
        (lambda w: w.to(torch.complex64), "torch.complex64 values, not floating-point"),
    ],
    ids=["nan", "inf", "meta", "sparse", "int", "complex"],
)
def test_unusable_weights_are_refused_in_one_line(
    change: Callable[[torch.Tensor], torch.Tensor],
    problem: str,
    data_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    torch.save(with_first_weight(change), tmp_path / "model.pth")
    predict_refused(capsys, tmp_path / "model.pth", data_dir, "linear_relu_stack.0.weight", problem)


def test_evaluate_refuses_non_finite_weights_instead_of_reporting_a_null_loss(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.save(with_first_weight(lambda w: w.index_fill(1, torch.tensor([3]), float("nan"))), tmp_path / "model.pth")
    one_error_line(
        capsys,
        [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "model.pth"),
            "--data-dir",
            str(data_dir),
            "--no-download",
            "--json",
        ],
        "non-finite",
    )


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ({"epoch": 2, "train_loss": 1.0, "test_accuracy": 0.5}, "no test_loss"),
        ([1, 2, 3], "not an object"),
        (
            {"epoch": 2, "train_loss": "low", "test_loss": 1.0, "test_accuracy": 0.5, "confusion_matrix": []},
            "train_loss is 'low'",
        ),
        ("{not json", "not JSON"),
    ],
    ids=["missing-key", "json-list", "not-a-number", "not-json"],
)
def test_plot_names_the_line_that_is_not_a_metrics_record(
    bad_line: object, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    metrics = write_metrics(tmp_path / "run")
    with metrics.open("a") as f:
        f.write((bad_line if isinstance(bad_line, str) else json.dumps(bad_line)) + "\n")
    one_error_line(
        capsys, ["plot", str(metrics.parent)], f"line 2 of {metrics}", "not an fmnist-dist metrics record", problem
    )
    assert sorted(p.name for p in metrics.parent.iterdir()) == ["metrics.jsonl"]  # no plots drawn


def test_plot_says_a_metrics_directory_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "run" / "metrics.jsonl").mkdir(parents=True)
    one_error_line(capsys, ["plot", str(tmp_path / "run")], "metrics.jsonl is a directory")
