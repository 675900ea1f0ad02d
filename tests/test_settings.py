"""The settings, declared once: every field validated in one pass, the flags given found in the one parse, a
resumed run's saved settings checked as flags are, every changed setting announced, and resumes that would
train nothing of a part-trained epoch refused. In-process: no training runs here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
from conftest import epoch_record

from fmnist_dist.cli import build_parser, main, train_settings
from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.position import BatchPlan, TrainingPosition
from fmnist_dist.settings.declaration import setting_of
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.run_dir import PROGRESS_FILE, RunDirectory
from fmnist_dist.storage.training_state import Progress
from fmnist_dist.training.resume import describe_resume, plan_start

PREFIX = "fmnist-dist: error: "
DATASET_SIZE = 1003


def test_every_field_is_a_declared_setting() -> None:
    assert all(setting_of(f) for f in fields(TrainConfig))


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"tracker": "bogus"}, ("--tracker", "'bogus'", "wandb, none")),
        ({"data_on_device": "sometimes"}, ("--data-on-device", "'sometimes'", "auto, on, off")),
        ({"mixed_precision": "fp64"}, ("--mixed-precision", "'fp64'", "no, fp16, bf16")),
        ({"epochs": True}, ("--epochs", "True", "not a whole number")),
        ({"lr": None}, ("--lr", "None", "not a number")),
        ({"data_dir": "data"}, ("--data-dir", "not a non-empty path")),
    ],
)
def test_every_field_is_checked_including_the_choices_flags_never_checked_before(
    values: dict, named: tuple[str, ...]
) -> None:
    with pytest.raises(UsageError) as refused:
        TrainConfig(**values)
    assert all(word in str(refused.value) for word in named), str(refused.value)


def test_the_flags_given_are_those_in_the_one_parse() -> None:
    args = build_parser().parse_args(["train", "--lr", "0.1", "--no-progress", "--resume", "--tags", "a", "b"])
    cfg, given = train_settings(args)
    assert given == {"lr", "progress", "resume", "tags"}
    assert (cfg.resume, cfg.lr, cfg.progress, cfg.tags, cfg.epochs) == (
        "latest",
        0.1,
        False,
        ("a", "b"),
        5,
    )  # the rest: defaults


def one_error_line(capsys: pytest.CaptureFixture, argv: list[str], *named: str) -> str:
    try:
        returncode = main(argv)
    except SystemExit as leaving:
        returncode = leaving.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert returncode == 2 and len(lines) == 1 and lines[0].startswith(PREFIX), captured.err
    assert all(word in lines[0] for word in named), lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data-dir", ""],
        ["train", "--output-dir", ""],
        ["evaluate", "--checkpoint", ""],
        ["predict", "--checkpoint", "", "--index", "0"],
        ["evaluate", "--data-dir", ""],
        ["synthetic-data", "--out", ""],
        ["plot", ""],
        ["predict", "--image", ""],
        ["predict", "--image", "shirt.png", ""],
    ],
    ids=lambda argv: "-".join(a.strip("-") for a in argv if a)[:40],
)
def test_an_empty_path_is_refused_instead_of_meaning_the_current_directory(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    one_error_line(capsys, argv, "empty path", "current directory")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- a resumed run's settings


def saved_state(out: Path, position: TrainingPosition, **config: object) -> Path:
    """A state's progress.json (no weights: plan_start reads only the progress) with settings edited by `config`."""
    state = RunDirectory(out).state(position.global_step)
    state.mkdir(parents=True)
    saved = TrainConfig(output_dir=out).to_log() | {"mixed_precision": "no"} | config
    progress = Progress(
        position=position,
        dataset_size=DATASET_SIZE,
        per_process_batch=64,
        global_batch_size=64,
        config=saved,
        metrics=[epoch_record(epoch=epoch) for epoch in range(1, position.epoch + 1)],  # one per epoch trained
        save_index=1,
    )
    (state / PROGRESS_FILE).write_text(json.dumps(asdict(progress)))
    return state


AT_EPOCH_END = TrainingPosition(epoch=1, samples_done=0, global_step=16)
MID_EPOCH_2 = TrainingPosition(epoch=1, samples_done=640, global_step=26)


@pytest.mark.parametrize(
    ("saved", "named"),
    [
        ({"lr": None}, ("lr is None, not a number", "--lr")),
        ({"epochs": "6"}, ("epochs is '6', not a whole number", "--epochs")),
        ({"epochs": True}, ("epochs is True, not a whole number", "--epochs")),
        ({"data_dir": 5}, ("data_dir is 5, not a non-empty path", "--data-dir")),
        ({"data_dir": ""}, ("data_dir is empty, not a non-empty path", "--data-dir")),
        ({"tracker": "bogus"}, ("tracker is 'bogus', not one of wandb, none", "--tracker")),
        ({"lr": -1}, ("lr must be greater than 0 (got -1)", "--lr")),
        ({"tags": [1, 2]}, ("tags is (1, 2), not a list of strings", "--tags")),
        ({"mixed_precision": 16}, ("mixed_precision is 16, not a string", "--mixed-precision")),
        ({"batch_size": 16, "global_batch_size": 64}, ("--batch-size and --global-batch-size exclude each other",)),
    ],
    ids=[
        "lr-null",
        "epochs-string",
        "epochs-bool",
        "data-dir-number",
        "data-dir-empty",
        "tracker-bogus",
        "lr-negative",
        "tags-numbers",
        "precision-number",
        "both-batch-sizes",
    ],
)
def test_saved_settings_pass_the_checks_of_the_flags(saved: dict, named: tuple[str, ...], tmp_path: Path) -> None:
    state = saved_state(tmp_path / "out", AT_EPOCH_END, **saved)
    with pytest.raises(UsageError) as refused:
        plan_start(TrainConfig(output_dir=tmp_path / "out", resume="auto"), frozenset({"output_dir", "resume"}))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"--resume: the state {state} cannot be resumed")
    assert all(word in message for word in named), message


def test_a_bad_saved_value_replaced_by_a_flag_is_not_refused(tmp_path: Path) -> None:
    saved_state(tmp_path / "out", AT_EPOCH_END, lr=None)
    start = plan_start(
        TrainConfig(output_dir=tmp_path / "out", resume="auto", lr=0.05), frozenset({"output_dir", "resume", "lr"})
    )
    assert start.cfg.lr == 0.05


@pytest.mark.parametrize("saved", [{"overwrite": "yes"}, {"download": 3}, {"progress": None}, {"resume": 5}])
def test_saved_per_invocation_settings_are_never_used_so_never_refused(saved: dict, tmp_path: Path) -> None:
    saved_state(tmp_path / "out", AT_EPOCH_END, **saved)
    start = plan_start(TrainConfig(output_dir=tmp_path / "out", resume="auto"), frozenset({"output_dir", "resume"}))
    assert start.changed == {}


def test_limits_of_this_machine_do_not_refuse_what_another_machine_saved(tmp_path: Path) -> None:
    saved_state(tmp_path / "out", AT_EPOCH_END, num_workers=10**6)  # never carried over
    start = plan_start(TrainConfig(output_dir=tmp_path / "out", resume="auto"), frozenset({"output_dir", "resume"}))
    assert start.cfg.num_workers == 0 and start.changed == {"num_workers": (10**6, 0)}


def resume_line(tmp_path: Path, saved: dict, *flags: str) -> str:
    saved_state(tmp_path / "out", MID_EPOCH_2, **saved)
    cfg, given = train_settings(
        build_parser().parse_args(["train", "--output-dir", str(tmp_path / "out"), "--resume", *flags])
    )
    start = plan_start(cfg, given)
    return describe_resume(start, BatchPlan(per_process=64, processes=1, accumulation=1))


def test_the_same_settings_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resume_line(tmp_path, {}).endswith("same settings")


@pytest.mark.parametrize(
    ("saved", "flags", "announced"),
    [
        ({"mixed_precision": "no"}, ["--mixed-precision", "bf16"], "mixed_precision no -> bf16"),
        ({"mixed_precision": "bf16"}, [], "mixed_precision bf16 -> no"),
        ({}, ["--cpu", "--threads", "3"], "threads default -> 3, cpu False -> True"),
        ({}, ["--data-on-device", "off", "--num-workers", "1"], "num_workers 0 -> 1, data_on_device auto -> off"),
        ({}, ["--lr", "0.5"], "lr 0.12 -> 0.5"),
    ],
)
def test_every_changed_setting_is_announced_the_machines_included(
    saved: dict, flags: list[str], announced: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert resume_line(tmp_path, saved, *flags).endswith(f"changed: {announced}")


def test_the_precision_accelerate_launch_asks_for_is_compared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    assert resume_line(tmp_path, {"mixed_precision": "no"}).endswith("changed: mixed_precision no -> bf16")


def test_where_the_run_starts_writes_and_reports_is_not_a_change(tmp_path: Path) -> None:
    line = resume_line(tmp_path, {"output_dir": "elsewhere", "progress": True}, "--no-progress", "--no-download")
    assert line.endswith("same settings"), line


def test_a_resume_whose_epochs_end_before_the_epoch_of_its_state_is_refused(tmp_path: Path) -> None:
    state = saved_state(tmp_path / "out", MID_EPOCH_2)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UsageError) as refused:
        plan_start(
            TrainConfig(output_dir=tmp_path / "out", resume="auto", epochs=1),
            frozenset({"output_dir", "resume", "epochs"}),
        )
    message = str(refused.value)
    for words in (str(state), "middle of epoch 2", f"image 640/{DATASET_SIZE}", "--epochs 2 or more", "end of epoch 1"):
        assert words in message, (words, message)
    assert sorted(tmp_path.rglob("*")) == before


def test_a_resume_with_fewer_epochs_at_an_epoch_end_still_has_nothing_to_train(tmp_path: Path) -> None:
    saved_state(tmp_path / "out", AT_EPOCH_END)
    start = plan_start(
        TrainConfig(output_dir=tmp_path / "out", resume="auto", epochs=1), frozenset({"output_dir", "resume", "epochs"})
    )
    assert "nothing to train" in describe_resume(start, BatchPlan(per_process=64, processes=1, accumulation=1))


# ------------------------------------------------------------------------------------- the validation split


@pytest.mark.parametrize(
    ("saved", "flags", "named"),
    [
        (
            {"val_size": 100},
            ["--val-size", "50"],
            ("holds out 100 training images", "--val-size 50", "without --val-size"),
        ),
        (
            {"val_size": 0},
            ["--val-size", "100"],
            ("holds out 0 training images", "--val-size 100", "without --val-size"),
        ),
        (
            {"val_size": 100, "seed": 0},
            ["--seed", "1"],
            ("by --seed 0", "--seed 1 would choose another", "without --seed"),
        ),
        ({"val_size": 100}, ["--monitor", "val_loss"], ("by --monitor val_accuracy", "without --monitor")),
    ],
    ids=["smaller", "none-before", "new-seed", "new-monitor"],
)
def test_a_resume_that_would_change_the_validation_split_exits_2(
    saved: dict, flags: list[str], named: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    state = saved_state(tmp_path / "out", AT_EPOCH_END, **saved)
    before = {path: path.read_bytes() for path in state.parent.rglob("*") if path.is_file()}
    line = one_error_line(
        capsys, ["train", "--output-dir", str(tmp_path / "out"), "--resume", *flags], f"the state {state}", *named
    )
    assert line.endswith("or start afresh with --overwrite")
    assert {path: path.read_bytes() for path in state.parent.rglob("*") if path.is_file()} == before


def test_a_state_saved_before_the_validation_split_held_out_nothing(tmp_path: Path) -> None:
    state = saved_state(tmp_path / "out", AT_EPOCH_END)
    progress = json.loads((state / PROGRESS_FILE).read_text())
    del progress["config"]["val_size"]
    (state / PROGRESS_FILE).write_text(json.dumps(progress))
    cfg = TrainConfig(output_dir=tmp_path / "out", resume="auto")
    with pytest.raises(UsageError, match="holds out 0 training images"):
        plan_start(replace(cfg, val_size=10), frozenset({"output_dir", "resume", "val_size"}))
    assert plan_start(cfg, frozenset({"output_dir", "resume"})).cfg.val_size == 0


def test_a_resume_may_repeat_its_split_and_name_the_default_monitor(tmp_path: Path) -> None:
    saved_state(tmp_path / "out", AT_EPOCH_END, val_size=100, monitor=None)
    cfg = TrainConfig(output_dir=tmp_path / "out", resume="auto", val_size=100, seed=0, monitor="val_accuracy")
    start = plan_start(cfg, frozenset({"output_dir", "resume", "val_size", "seed", "monitor"}))
    assert (start.cfg.val_size, start.cfg.monitor_or_default) == (100, "val_accuracy")
