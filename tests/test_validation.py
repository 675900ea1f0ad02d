"""The validation split (`--val-size`), the best model (model-best.pth by `--monitor`) and early stopping.

In-process: the split is disjoint from the training images and chosen by the seed alone; an epoch improves only on
a strictly better value, and patience counts the epochs since the best; runs built by `build_run` and fitted here
score the split every epoch and the test set at the end, keep the best epoch's weights through a resume, and stop
early at the right epoch, also after a resume. Integration: the images trained are never the held-out ones, on 1
process and after a resume on 2; early stopping on 2 processes; a resume that changes --val-size exits 2.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import safetensors.torch
import torch
from accelerate import PartialState
from conftest import TEST_SIZE, TRAIN_SIZE, epoch_record, launch_cli, run_cli, train, train_args, trained_indices
from test_throughput import RecordingTracker

from fmnist_dist.cli import main
from fmnist_dist.errors import UsageError
from fmnist_dist.recipe.data import InMemoryFashionMNIST
from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.recipe.position import BatchPlan, TrainingPosition
from fmnist_dist.recipe.sampling import epoch_order
from fmnist_dist.recipe.validation import hold_out, validation_indices
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.metrics_log import MetricsLog
from fmnist_dist.storage.output_dir import refuse_earlier_run, remove_earlier_run
from fmnist_dist.storage.plots import plot_run
from fmnist_dist.storage.run_dir import STATE_WEIGHTS_FILE, STATES_DIR, RunDirectory
from fmnist_dist.storage.training_state import Progress, complete_states, read_progress
from fmnist_dist.storage.weights import save_state_dict
from fmnist_dist.training.build import build_run
from fmnist_dist.training.model_selection import best_key, judge_epoch, stopped_early
from fmnist_dist.training.resume import describe_resume, plan_start
from fmnist_dist.training.trainer import FitResult

VAL_SIZE = 101  # odd: 2 processes evaluate it in uneven shards, which Accelerate pads
TRAINED = TRAIN_SIZE - VAL_SIZE  # 902 images: 29 steps of 32 per epoch, the last one short
BATCH = 32
STATE_EVERY = 10  # optimizer steps between the states of the 2-process test: step 10 is mid-epoch 1
MID_EPOCH_3 = 70  # an optimizer step of epoch 3 (steps 59-87 at batch 32), where the plateau saves a state
SELECTION_FIELDS = ("best_value", "best_epoch", "epochs_without_improvement")  # Progress's, since --val-size


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def state_weights(output_dir: Path, global_step: int) -> dict[str, torch.Tensor]:
    return weights_of(RunDirectory(output_dir).state(global_step) / STATE_WEIGHTS_FILE)


# ------------------------------------------------------------------------------------------------ the split


def test_the_split_is_disjoint_from_training_and_chosen_by_the_seed_alone() -> None:
    trained, held_out = validation_indices(TRAIN_SIZE, VAL_SIZE, seed=3)

    assert (len(trained), len(held_out)) == (TRAINED, VAL_SIZE)
    assert sorted(trained.tolist() + held_out.tolist()) == list(range(TRAIN_SIZE))  # each image once, in one part
    assert torch.equal(held_out, validation_indices(TRAIN_SIZE, VAL_SIZE, seed=3)[1])  # computed alike anywhere
    assert not torch.equal(held_out, validation_indices(TRAIN_SIZE, VAL_SIZE, seed=4)[1])
    assert set(validation_indices(TRAIN_SIZE, 50, seed=3)[1].tolist()) < set(held_out.tolist())  # nested sizes
    # Its own stream: not the first images of the seed's epoch order.
    assert not torch.equal(held_out, epoch_order(TRAIN_SIZE, 3, 0)[:VAL_SIZE].sort().values)


def test_holding_out_splits_the_images_themselves_and_zero_holds_out_nothing() -> None:
    images = torch.arange(20, dtype=torch.uint8).reshape(20, 1, 1).expand(20, 28, 28).contiguous()
    whole = InMemoryFashionMNIST(images, torch.arange(20) % 10)

    trained, held_out = hold_out(whole, 5, seed=0)

    expected_trained, expected_held_out = validation_indices(20, 5, seed=0)
    assert held_out is not None
    assert torch.equal(held_out.images[:, 0, 0], expected_held_out.to(torch.uint8))
    assert torch.equal(trained.images[:, 0, 0], expected_trained.to(torch.uint8))
    assert torch.equal(held_out.targets, expected_held_out % 10)
    assert hold_out(whole, 0, seed=0) == (whole, None)


def test_a_split_that_leaves_nothing_to_train_on_is_refused() -> None:
    with pytest.raises(UsageError, match=r"^--val-size 20 would hold out the whole training set \(20 images\)"):
        validation_indices(20, 20, seed=0)
    assert len(validation_indices(20, 19, seed=0)[0]) == 1


@pytest.mark.parametrize(
    ("flags", "flag"),
    [({"monitor": "val_loss"}, "--monitor"), ({"early_stopping_patience": 2}, "--early-stopping-patience")],
)
def test_choosing_by_a_split_that_is_not_there_is_refused(flags: dict, flag: str, tmp_path: Path) -> None:
    refusal = f"^{flag} needs a validation split to judge epochs by, and there is none; pass --val-size N as well"
    with pytest.raises(UsageError, match=refusal):
        TrainConfig(**flags)  # a new run: as its flags are read
    with pytest.raises(UsageError, match=refusal):  # --resume auto where there is no state: once that is known
        plan_start(TrainConfig(output_dir=tmp_path, resume="auto", **flags), frozenset({"resume", *flags}))
    assert list(tmp_path.iterdir()) == []
    assert plan_start(TrainConfig(output_dir=tmp_path, val_size=10, **flags), frozenset()).cfg.monitor_or_default == (
        flags.get("monitor", "val_accuracy")
    )


# --------------------------------------------------------------------------------------- choosing an epoch


def epochs_until_stop(monitor: str, values: list[float], patience: int | None) -> tuple[int, Progress]:
    """Judge `values` epoch by epoch, as the Trainer does: the epochs run before early stopping, and the progress."""
    progress = Progress()
    for epoch, value in enumerate(values, 1):
        judge_epoch(progress, monitor, epoch, value)
        if stopped_early(progress, patience):
            return epoch, progress
    return len(values), progress


@pytest.mark.parametrize(
    ("monitor", "values", "patience", "stop", "best"),
    [
        # A tie is no improvement: 0.6 at epoch 3 counts as one epoch without, 0.55 as the second.
        ("val_accuracy", [0.5, 0.6, 0.6, 0.55, 0.7], 2, 4, (0.6, 2, 2)),
        ("val_accuracy", [0.5, 0.6, 0.6, 0.7, 0.65], 2, 5, (0.7, 4, 1)),
        ("val_loss", [1.0, 0.8, 0.9, 0.8, 0.7], 2, 4, (0.8, 2, 2)),
        ("val_loss", [1.0, 0.8, 0.9, 0.7, 0.75], 2, 5, (0.7, 4, 1)),
        ("val_accuracy", [0.5, 0.4, 0.3, 0.2], None, 4, (0.5, 1, 3)),  # no patience: never stops
        ("val_loss", [float("nan"), 1.0], 5, 2, (1.0, 2, 0)),  # NaN never improves
    ],
)
def test_an_epoch_improves_only_when_strictly_better_and_patience_counts_the_epochs_since(
    monitor: str, values: list[float], patience: int | None, stop: int, best: tuple[float, int, int]
) -> None:
    epochs, progress = epochs_until_stop(monitor, values, patience)

    assert epochs == stop
    assert (progress.best_value, progress.best_epoch, progress.epochs_without_improvement) == best


def test_a_state_without_the_best_epoch_loads_and_an_impossible_one_is_refused() -> None:
    two_epochs = Progress(
        TrainingPosition(epoch=2, global_step=30),
        dataset_size=480,
        per_process_batch=16,
        global_batch_size=32,
        metrics=[epoch_record(epoch=1), epoch_record(epoch=2)],
    )
    saved = asdict(two_epochs)  # as progress.json holds it
    older = {key: value for key, value in saved.items() if key not in SELECTION_FIELDS}

    loaded = Progress.from_dict(older)

    assert (loaded.best_value, loaded.best_epoch, loaded.epochs_without_improvement) == (None, None, 0)
    for impossible, problem in [
        ({"best_value": 0.5, "best_epoch": 3}, "best_epoch is 3, not a whole number from 1 to the 2 epoch(s)"),
        ({"best_value": 0.5, "best_epoch": 2, "epochs_without_improvement": 1}, "epochs_without_improvement is 1"),
        ({"best_value": None, "best_epoch": 1}, "both or neither"),
    ]:
        with pytest.raises(ValueError, match=re.escape(problem)):
            Progress.from_dict({**saved, **impossible})


def test_an_epoch_without_a_test_score_is_written_as_nulls_and_plotted_as_a_gap(tmp_path: Path) -> None:
    unscored = epoch_record(test_loss=None, test_accuracy=None, test_samples=None, confusion_matrix=None)
    path = tmp_path / "metrics.jsonl"
    MetricsLog(path).append(unscored)

    (line,) = [json.loads(text) for text in path.read_text().splitlines()]
    assert (line["test_loss"], line["test_accuracy"], line["confusion_matrix"]) == (None, None, None)
    assert "test_samples" not in line
    assert MetricsLog.read(path) == [unscored]
    curves, confusion = tmp_path / "curves.png", tmp_path / "confusion.png"
    assert plot_run([unscored], curves, confusion) == [curves]  # no test set scored yet: no confusion matrix
    assert plot_run([unscored, replace(epoch_record(), epoch=2)], curves, confusion) == [curves, confusion]


def test_a_best_model_marks_an_earlier_run_and_overwrite_removes_it(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    save_state_dict(NeuralNetwork().state_dict(), run_dir.best_model)  # a run killed after its first epoch's best

    with pytest.raises(UsageError, match=re.escape(f"--output-dir {tmp_path} holds an earlier run (model-best.pth)")):
        refuse_earlier_run(tmp_path)
    remove_earlier_run(PartialState(cpu=True), tmp_path)

    assert not run_dir.best_model.exists()


# ------------------------------------------------------------------------------------------ in-process runs


def config(data_dir: Path, output_dir: Path, **changes: object) -> TrainConfig:
    """A quick in-process run holding out VAL_SIZE images, every state kept."""
    values: dict = {
        "data_dir": data_dir,
        "download": False,
        "output_dir": output_dir,
        "batch_size": BATCH,
        "eval_batch_size": 64,
        "val_size": VAL_SIZE,
        "keep_states": 100,
        "cpu": True,
        "tracker": "none",
        "progress": False,
    }
    return TrainConfig(**{**values, **changes})


def fit(cfg: TrainConfig, *given: str) -> tuple[FitResult, Progress]:
    """Build the run `cfg` says, with the flags `given` (for a resume), fit it here; its result and progress."""
    trainer = build_run(plan_start(cfg, given=frozenset(given))).trainer
    return trainer.fit(), trainer.progress


def test_the_tracker_gets_the_best_value_so_far_after_every_epoch(data_dir: Path, tmp_path: Path) -> None:
    """Its last value is the run's best: what a W&B sweep scores a trial by (launch/sweep.yaml's metric)."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    run = build_run(plan_start(config(data_dir, output_dir, epochs=3, monitor="val_loss"), given=frozenset()))
    tracker = run.trainer.tracker = RecordingTracker(run.accelerator)
    run.trainer.fit()

    epochs = [values for _, values in sorted(tracker.values.items()) if "val/loss" in values]
    losses = [values["val/loss"] for values in epochs]
    assert len(epochs) == 3
    assert [values[best_key("val_loss")] for values in epochs] == [min(losses[: n + 1]) for n in range(3)]
    assert best_key("val_accuracy") == "val/best_accuracy" and "val/best_accuracy" not in epochs[0]


def resume(data_dir: Path, output_dir: Path, **flags: object) -> tuple[FitResult, Progress]:
    """Resume `output_dir`'s newest state in this process with `flags` given."""
    cfg = TrainConfig(data_dir=data_dir, download=False, output_dir=output_dir, cpu=True, progress=False)
    return fit(replace(cfg, resume="auto", **flags), "resume", *flags)


@pytest.fixture(scope="module")
def worsened(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FitResult, Progress, Path]:
    """2 epochs by --monitor val_loss, then resumed for a third with a weight decay that undoes the training: the
    best epoch is not the last, and only the best value carried by the state keeps the third from replacing it."""
    output_dir = tmp_path_factory.mktemp("worsened")  # made, as the job's claim of --output-dir makes it
    fit(config(data_dir, output_dir, epochs=2, monitor="val_loss"))
    result, progress = resume(data_dir, output_dir, epochs=3, weight_decay=1.0)
    return result, progress, output_dir


def test_every_epoch_scores_the_split_once_per_image_and_the_test_set_only_at_a_runs_end(
    worsened: tuple[FitResult, Progress, Path],
) -> None:
    result, _, output_dir = worsened
    records = MetricsLog.read(RunDirectory(output_dir).metrics)

    assert records == result.metrics
    assert [r.val_samples for r in records] == [VAL_SIZE] * 3
    assert [r.train_samples for r in records] == [TRAINED] * 3
    # Epoch 2 ended the first run, epoch 3 the resumed one; epoch 1 scored no test set.
    assert [r.test_samples for r in records] == [None, TEST_SIZE, TEST_SIZE]
    assert records[0].test_accuracy is None and records[0].confusion_matrix is None
    assert result.last_eval is not None and result.last_eval.accuracy == records[-1].test_accuracy
    assert all(0 <= r.val_accuracy <= 1 and math.isfinite(r.val_loss) for r in records if r.val_accuracy is not None)


def test_model_best_holds_the_best_epochs_weights_through_a_resume(
    worsened: tuple[FitResult, Progress, Path], data_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    result, progress, output_dir = worsened
    records = result.metrics
    assert records[2].val_loss > records[1].val_loss < records[0].val_loss  # the set-up: epoch 2 is the best
    run_dir = RunDirectory(output_dir)

    assert (progress.best_epoch, progress.epochs_without_improvement) == (2, 1)
    assert progress.best_value == records[1].val_loss
    best = weights_of(run_dir.best_model)
    assert equal(best, state_weights(output_dir, records[1].global_step))  # the weights at the end of epoch 2
    assert not equal(best, weights_of(run_dir.state(records[2].global_step) / STATE_WEIGHTS_FILE))
    # `evaluate` reads it as it reads model.pth: epoch 2's test score, which ended the first run.
    evaluated = ["evaluate", "--checkpoint", str(run_dir.best_model), "--data-dir", str(data_dir), "--no-download"]
    assert main([*evaluated, "--cpu", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["samples"] == TEST_SIZE and scores["accuracy"] == pytest.approx(records[1].test_accuracy, abs=1e-9)


# The quickstart's learning rate shrunk to nothing: every epoch scores the same, so the first is the best.
PLATEAU = {"lr": 1e-12, "momentum": 0.0, "lr_schedule": "constant", "warmup_steps": 0, "epochs": 10}
PATIENCE = 2


@pytest.fixture(scope="module")
def plateau(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FitResult, Progress, Path]:
    """10 epochs on a plateau with --early-stopping-patience 2: epoch 1 is the best, epochs 2 and 3 do not improve."""
    output_dir = tmp_path_factory.mktemp("plateau")
    cfg = config(data_dir, output_dir, early_stopping_patience=PATIENCE, checkpoint_every=MID_EPOCH_3, **PLATEAU)
    result, progress = fit(cfg)
    return result, progress, output_dir


def test_early_stopping_ends_the_run_after_patience_epochs_without_improvement(
    plateau: tuple[FitResult, Progress, Path],
) -> None:
    result, progress, _ = plateau

    assert [r.epoch for r in result.metrics] == [1, 2, 3]
    assert len({r.val_accuracy for r in result.metrics}) == 1  # the set-up: a plateau
    assert (progress.best_epoch, progress.epochs_without_improvement) == (1, PATIENCE)
    assert [r.test_samples for r in result.metrics] == [None, None, TEST_SIZE]  # its end scores the test set


def test_a_resume_keeps_the_count_of_epochs_without_improvement(
    plateau: tuple[FitResult, Progress, Path], data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, finished_progress, source = plateau
    mid_epoch_3 = RunDirectory(source).state(MID_EPOCH_3)
    assert read_progress(mid_epoch_3).epochs_without_improvement == 1  # epoch 2 did not improve
    shutil.copytree(mid_epoch_3, RunDirectory(tmp_path).state(MID_EPOCH_3))

    result, progress = resume(data_dir, tmp_path)

    # Counting afresh would have trained epochs 4 and 5.
    assert [r.epoch for r in result.metrics] == [1, 2, 3]
    assert (progress.best_value, progress.best_epoch, progress.epochs_without_improvement) == (
        finished_progress.best_value,
        1,
        PATIENCE,
    )
    lines = capsys.readouterr().out.splitlines()
    best = f"best {finished_progress.best_value:.4f} at epoch 1"
    stop = f"fmnist-dist: early stopping after epoch 3: val_accuracy has not improved for 2 epoch(s) ({best})"
    assert f"{stop}, kept in model-best.pth" in lines


def test_a_resume_of_an_early_stopped_run_has_nothing_to_train_unless_patience_grows(
    plateau: tuple[FitResult, Progress, Path], data_dir: Path
) -> None:
    _, _, output_dir = plateau
    cfg = replace(TrainConfig(data_dir=data_dir, download=False, output_dir=output_dir, cpu=True), resume="auto")

    plan = BatchPlan(per_process=BATCH, processes=1, accumulation=1)

    line = describe_resume(plan_start(cfg, frozenset({"resume"})), plan)
    longer = plan_start(replace(cfg, early_stopping_patience=3), frozenset({"resume", "early_stopping_patience"}))

    assert "has stopped early after epoch 3: val_accuracy has not improved for 2 epoch(s)" in line
    assert line.endswith("nothing to train (pass a larger --early-stopping-patience to train on)")
    assert "resuming from" in describe_resume(longer, plan)


def test_a_resume_from_an_older_state_takes_back_that_states_best_model(data_dir: Path, tmp_path: Path) -> None:
    """The abandoned epochs wrote a better model-best.pth; the run resumed before them never beats its own best,
    and its model-best.pth must be its best epoch's, not theirs."""
    fit(config(data_dir, tmp_path, epochs=2, monitor="val_loss"))
    end_of_epoch_1 = RunDirectory(tmp_path).state(math.ceil(TRAINED / BATCH))
    cfg = TrainConfig(data_dir=data_dir, download=False, output_dir=tmp_path, cpu=True, progress=False)

    result, progress = fit(replace(cfg, resume=str(end_of_epoch_1), weight_decay=1.0), "resume", "weight_decay")

    assert (progress.best_epoch, progress.epochs_without_improvement) == (1, 1)  # the set-up: epoch 2 is worse
    best = weights_of(RunDirectory(tmp_path).best_model)
    assert equal(best, state_weights(tmp_path, result.metrics[0].global_step))


def test_a_resume_mid_epoch_with_a_patience_already_spent_is_refused(
    plateau: tuple[FitResult, Progress, Path], data_dir: Path, tmp_path: Path
) -> None:
    """Stopping there would write model.pth from a part-trained epoch; it is refused as an --epochs that ends
    before the epoch under way is."""
    _, _, source = plateau
    mid_epoch_3 = RunDirectory(source).state(MID_EPOCH_3)  # 1 epoch without improvement, epoch 3 under way
    shutil.copytree(mid_epoch_3, RunDirectory(tmp_path).state(MID_EPOCH_3))
    cfg = TrainConfig(data_dir=data_dir, download=False, output_dir=tmp_path, cpu=True, resume="auto")

    with pytest.raises(
        UsageError,
        match=re.escape(
            f"--resume: the state {RunDirectory(tmp_path).state(MID_EPOCH_3)} was saved in the middle of epoch 3"
        ),
    ) as refused:
        plan_start(replace(cfg, early_stopping_patience=1), frozenset({"resume", "early_stopping_patience"}))

    assert "pass --early-stopping-patience 2 or more to finish that epoch" in str(refused.value)
    assert not RunDirectory(tmp_path).model.exists()
    assert plan_start(replace(cfg, early_stopping_patience=2), frozenset({"resume", "early_stopping_patience"}))


# ------------------------------------------------------------------------------------------- real processes


@pytest.mark.integration
@pytest.mark.slow
def test_no_process_count_or_resume_ever_trains_a_held_out_image(data_dir: Path, tmp_path: Path) -> None:
    flags = ("--val-size", VAL_SIZE, "--global-batch-size", 48, "--checkpoint-every", STATE_EVERY, "--keep-states", 100)
    one = tmp_path / "one"
    train(data_dir, one, 1, *flags, record=True)
    state = RunDirectory(one).state(STATE_EVERY)  # 480 of epoch 1's 902 images trained
    resumed = tmp_path / "resumed"
    shutil.copytree(state, RunDirectory(resumed).state(STATE_EVERY))

    train(data_dir, resumed, 2, "--resume", record=True)

    expected = validation_indices(TRAIN_SIZE, VAL_SIZE, seed=0)[0].tolist()
    assert [sorted(epoch) for epoch in trained_indices(one)] == [expected, expected]
    before, (rest, epoch_2) = trained_indices(one)[0][: STATE_EVERY * 48], trained_indices(resumed)
    assert sorted(before + rest) == sorted(epoch_2) == expected
    # The 2 processes scored the same split: every image once, to float rounding the same scores.
    one_records, resumed_records = (
        MetricsLog.read(RunDirectory(one).metrics),
        MetricsLog.read(RunDirectory(resumed).metrics),
    )
    assert [r.val_samples for r in resumed_records] == [VAL_SIZE] * 2
    assert [r.val_loss for r in resumed_records] == pytest.approx([r.val_loss for r in one_records], abs=1e-5)
    final = [read_progress(complete_states(run / STATES_DIR)[-1]) for run in (one, resumed)]
    assert final[0].best_epoch == final[1].best_epoch
    best = [weights_of(RunDirectory(run).best_model) for run in (one, resumed)]
    assert max((best[0][k] - best[1][k]).abs().max().item() for k in best[0]) < 1e-5


@pytest.mark.integration
@pytest.mark.slow
def test_early_stopping_on_two_processes_still_ends_the_run_whole(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    plateau = ["--lr", "1e-12", "--momentum", "0", "--lr-schedule", "constant", "--warmup-steps", "0"]
    args = train_args(data_dir, out, "--cpu", "--no-progress", "--val-size", VAL_SIZE, "--epochs", 10, *plateau)

    result = launch_cli([*args, "--early-stopping-patience", PATIENCE], cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    stop = "fmnist-dist: early stopping after epoch 3:"
    stops = [line for line in result.stdout.splitlines() if line.startswith(stop)]
    assert len(stops) == 1, result.stdout  # said once, by the main process
    run_dir = RunDirectory(out)
    records = MetricsLog.read(run_dir.metrics)
    assert [r.test_samples for r in records] == [None, None, TEST_SIZE]
    for path in (run_dir.model, run_dir.best_model, run_dir.curves, run_dir.confusion):
        assert path.is_file(), path
    before = sorted(p.name for p in (out / STATES_DIR).iterdir())

    refused = run_cli([*args, "--resume", "--val-size", 50], cwd=tmp_path)

    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"fmnist-dist: error: --resume: the state {run_dir.state(records[-1].global_step)} holds out {VAL_SIZE} "
        f"training images as its validation split (--val-size {VAL_SIZE}): --val-size 50 would validate on images it "
        "trained on, or train on images it validated on; resume without --val-size, or start afresh with --overwrite"
    ]
    assert sorted(p.name for p in (out / STATES_DIR).iterdir()) == before
