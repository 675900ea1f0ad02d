"""`--resume`: a run stopped after 2 of 4 epochs and resumed ends exactly where a straight 4-epoch run ends.

Bit-identical means `torch.equal` on every tensor of the final model.pth, in one process and in two real gloo
processes. The single-process resumed run also carries the W&B run id across the restart (offline), keeps
only `--keep-states` states, and ignores an unfinished `.tmp-*` state planted to look newer than the rest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TEST_SIZE, TRAIN_SIZE, launch_preloaded, printed_by_training, run_cli, train_args, train_in_process

from fmnist_dist.errors import UsageError
from fmnist_dist.storage.metrics_log import MetricsLog
from fmnist_dist.storage.run_dir import PROGRESS_FILE, STATES_DIR, TMP_PREFIX, TRASH_PREFIX
from fmnist_dist.storage.training_state import complete_states, discard_state, find_state, unfinished_states

pytestmark = pytest.mark.slow

EPOCHS = 4
STOP_AFTER = 2
BATCH = 32
CHECKPOINT_EVERY = 10
KEEP_STATES = 3
# Per-epoch results that must not depend on the restart (timings do).
DETERMINISTIC_KEYS = (
    "epoch",
    "global_step",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "test_samples",
    "train_samples",
    "world_size",
    "confusion_matrix",
)
QUIET = {"OMP_NUM_THREADS": "1"}  # one thread per process: faster on a small shared CPU
# These runs stop by finishing `--epochs 2` and continue with `--epochs 4`: a schedule that depends on the
# total (cosine) would differ from a straight 4-epoch run, so they train at a constant rate.
CONSTANT = ("--lr-schedule", "constant")


def load_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(output_dir / "model.pth", map_location="cpu", weights_only=True)


def assert_bit_identical(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    differing = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not differing, f"tensors differ from the straight run: {differing}"


def read_metrics(output_dir: Path) -> list[dict]:
    return [record.as_json() for record in MetricsLog.read(output_dir / "metrics.jsonl")]


def deterministic(records: list[dict]) -> list[dict]:
    return [{key: record[key] for key in DETERMINISTIC_KEYS} for record in records]


def check(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def plant_unfinished_state(output_dir: Path) -> Path:
    """A full copy of the newest state under the `.tmp-` name a crash mid-save leaves, claiming a later step.

    If `--resume` ever chose it, the run would skip ahead and the weights would differ from the straight run.
    """
    root = output_dir / STATES_DIR
    newest = sorted(root.glob("step-*"))[-1]
    decoy = root / f"{TMP_PREFIX}step-{10**8:09d}"
    shutil.copytree(newest, decoy)
    progress = json.loads((decoy / PROGRESS_FILE).read_text())
    progress["position"].update(epoch=EPOCHS - 1, global_step=10**8)
    (decoy / PROGRESS_FILE).write_text(json.dumps(progress))
    return decoy


# ----------------------------------------------------------------------------------------------- one process


@pytest.fixture(scope="module")
def straight_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 epochs without a stop."""
    work = tmp_path_factory.mktemp("straight")
    check(
        run_cli(train_args(data_dir, work / "out", "--epochs", EPOCHS, "--batch-size", BATCH, *CONSTANT), work, **QUIET)
    )
    return work / "out"


@pytest.fixture(scope="module")
def resumed_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """2 epochs, then `--epochs 4 --resume`: W&B offline, a state every 10 steps, a decoy `.tmp-` state."""
    work = tmp_path_factory.mktemp("resumed")
    out = work / "out"
    args = train_args(
        data_dir,
        out,
        "--batch-size",
        BATCH,
        *CONSTANT,
        "--tracker",
        "wandb",
        "--no-progress",
        "--checkpoint-every",
        CHECKPOINT_EVERY,
        "--keep-states",
        KEEP_STATES,
    )
    first = run_cli([*args, "--epochs", STOP_AFTER], cwd=work, **QUIET)
    check(first)
    saved_progress = json.loads((find_state(out, "latest") / PROGRESS_FILE).read_text())
    metrics_after_stop = read_metrics(out)
    plant_unfinished_state(out)
    second = run_cli([*args, "--epochs", EPOCHS, "--resume"], cwd=work, **QUIET)
    check(second)
    return {
        "work": work,
        "out": out,
        "saved_progress": saved_progress,
        "metrics_after_stop": metrics_after_stop,
        "log": second.stdout + second.stderr,
    }


@pytest.mark.integration
def test_resumed_model_is_bit_identical_to_a_straight_run(straight_run: Path, resumed_run: dict) -> None:
    assert_bit_identical(load_weights(straight_run), load_weights(resumed_run["out"]))


@pytest.mark.integration
def test_resume_starts_from_the_end_of_the_second_epoch(resumed_run: dict) -> None:
    steps_per_epoch = -(-TRAIN_SIZE // BATCH)
    assert resumed_run["saved_progress"]["position"]["epoch"] == STOP_AFTER
    assert resumed_run["saved_progress"]["position"]["global_step"] == STOP_AFTER * steps_per_epoch
    assert f"step-{STOP_AFTER * steps_per_epoch:09d}" in resumed_run["log"]
    assert len(resumed_run["metrics_after_stop"]) == STOP_AFTER


@pytest.mark.integration
def test_resumed_metrics_have_one_line_per_epoch_matching_the_straight_run(
    straight_run: Path, resumed_run: dict
) -> None:
    straight, resumed = read_metrics(straight_run), read_metrics(resumed_run["out"])
    assert [r["epoch"] for r in resumed] == list(range(1, EPOCHS + 1))
    assert deterministic(resumed) == deterministic(straight)
    # The epochs before the stop are carried over from the saved state, not re-run.
    assert resumed[:STOP_AFTER] == resumed_run["metrics_after_stop"]


@pytest.mark.integration
def test_resume_continues_the_same_wandb_run(resumed_run: dict) -> None:
    run_id = resumed_run["saved_progress"]["tracker_run_id"]
    assert run_id
    offline_runs = sorted(p.name for p in (resumed_run["work"] / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 2, offline_runs  # one per process start...
    assert all(name.endswith(f"-{run_id}") for name in offline_runs), (run_id, offline_runs)  # ...one run id
    final_progress = json.loads((find_state(resumed_run["out"], "latest") / PROGRESS_FILE).read_text())
    assert final_progress["tracker_run_id"] == run_id


@pytest.mark.integration
def test_keep_states_keeps_only_the_newest(resumed_run: dict) -> None:
    steps_per_epoch = -(-TRAIN_SIZE // BATCH)
    saved_at = set(range(CHECKPOINT_EVERY, EPOCHS * steps_per_epoch + 1, CHECKPOINT_EVERY))
    saved_at |= {epoch * steps_per_epoch for epoch in range(1, EPOCHS + 1)}
    newest = sorted(saved_at)[-KEEP_STATES:]
    kept = sorted(p.name for p in (resumed_run["out"] / STATES_DIR).iterdir())
    assert kept == [f"step-{step:09d}" for step in newest]  # the planted .tmp- state was cleared as well


def test_resume_never_chooses_an_unfinished_state(tmp_path: Path) -> None:
    root = tmp_path / STATES_DIR
    for name in ("step-000000010", "step-000000020", f"{TMP_PREFIX}step-000000030"):
        (root / name).mkdir(parents=True)
        (root / name / PROGRESS_FILE).write_text("{}")
    (root / "step-000000040").mkdir()  # a state directory without its progress file is not finished either
    assert complete_states(root) == [root / "step-000000010", root / "step-000000020"]
    assert find_state(tmp_path, "latest") == root / "step-000000020"
    with pytest.raises(UsageError, match="unfinished state"):
        find_state(tmp_path, str(root / f"{TMP_PREFIX}step-000000030"))


def test_a_deletion_interrupted_midway_leaves_no_part_of_a_state_under_a_states_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / STATES_DIR
    state = root / "step-000000010"
    state.mkdir(parents=True)
    for name in (PROGRESS_FILE, "model.safetensors", "optimizer.bin"):
        (state / name).write_text("{}")

    def killed_midway(path: Path, *args: object, **kwargs: object) -> None:  # one file gone, then the kill
        if Path(path).exists():
            next(Path(path).iterdir()).unlink()
            raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        discard_state(state)
    monkeypatch.undo()

    assert complete_states(root) == [] and not state.exists()
    assert unfinished_states(root) == [root / f"{TRASH_PREFIX}step-000000010"]  # the next save clears it


# ------------------------------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def two_process_runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two gloo processes: 4 straight epochs, and 2 epochs then `--epochs 4 --resume`."""
    work = tmp_path_factory.mktemp("two-process")
    args = ["--cpu", "--batch-size", BATCH, *CONSTANT, "--no-progress"]
    check(launch_preloaded(train_args(data_dir, work / "straight", *args, "--epochs", EPOCHS), work, **QUIET))
    check(launch_preloaded(train_args(data_dir, work / "resumed", *args, "--epochs", STOP_AFTER), work, **QUIET))
    resumed = launch_preloaded(
        train_args(data_dir, work / "resumed", *args, "--epochs", EPOCHS, "--resume"), work, **QUIET
    )
    check(resumed)
    assert "resuming from" in resumed.stdout
    return {"straight": work / "straight", "resumed": work / "resumed"}


@pytest.mark.integration
def test_two_process_resumed_model_is_bit_identical(two_process_runs: dict[str, Path]) -> None:
    assert_bit_identical(load_weights(two_process_runs["straight"]), load_weights(two_process_runs["resumed"]))


@pytest.mark.integration
def test_two_process_resumed_metrics_match_the_straight_run(two_process_runs: dict[str, Path]) -> None:
    straight, resumed = read_metrics(two_process_runs["straight"]), read_metrics(two_process_runs["resumed"])
    assert len(resumed) == EPOCHS
    assert deterministic(resumed) == deterministic(straight)
    assert all(record["world_size"] == 2 and record["test_samples"] == TEST_SIZE for record in resumed)


# ------------------------------------------------------------------------------ resuming from an older state


@pytest.fixture(scope="module")
def checkpointed_epoch(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch with a state every 5 optimizer steps (the first ones mid-epoch), all kept."""
    out = tmp_path_factory.mktemp("checkpointed") / "out"
    train_in_process(
        train_args(data_dir, out, "--epochs", "1", "--checkpoint-every", "5", "--keep-states", "100", "--no-progress")
    )
    return out


def progress_of(state: Path) -> dict:
    return json.loads((state / PROGRESS_FILE).read_text())


def test_a_run_resumed_from_an_older_state_is_the_run_that_resume_auto_continues(
    data_dir: Path, checkpointed_epoch: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(shutil.copytree(checkpointed_epoch, tmp_path / "out"))
    abandoned = complete_states(out / STATES_DIR)
    older = abandoned[0]  # step 5; the abandoned run went on to save higher steps
    abandoned_step = progress_of(abandoned[-1])["position"]["global_step"]

    train_in_process(
        train_args(
            data_dir,
            out,
            "--epochs",
            "1",
            "--resume",
            older,
            "--batch-size",
            "64",
            "--keep-states",
            "2",
            "--no-progress",
        )
    )
    branch_step = read_metrics(out)[-1]["global_step"]
    assert branch_step < abandoned_step
    kept = complete_states(out / STATES_DIR)
    assert len(kept) == 2 and progress_of(kept[-1])["position"]["global_step"] == branch_step, kept

    again = printed_by_training(train_args(data_dir, out, "--epochs", "2", "--resume", "auto", "--no-progress"), capsys)
    assert f"resuming from {kept[-1]} at epoch 2" in again, again
    assert "changed: epochs 1 -> 2" in again  # the branch's batch of 64 is the saved one


@pytest.mark.integration
def test_a_new_seed_is_refused_mid_epoch_and_taken_at_an_epoch_end(
    data_dir: Path, checkpointed_epoch: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(shutil.copytree(checkpointed_epoch, tmp_path / "out"))
    states = complete_states(out / STATES_DIR)
    mid_epoch, epoch_end = states[0], states[-1]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    refused = run_cli(
        train_args(data_dir, out, "--epochs", "1", "--resume", mid_epoch, "--seed", "7"), tmp_path, **QUIET
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    for word in (str(mid_epoch), "mid-epoch", "--seed 7 (saved: 0)", "twice", "resume without --seed"):
        assert word in line, (word, line)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    taken = printed_by_training(
        train_args(data_dir, out, "--epochs", "2", "--resume", epoch_end, "--seed", "7", "--no-progress"), capsys
    )
    assert "seed 0 -> 7" in taken


def test_a_finished_run_missing_its_model_and_plots_gets_them_from_a_resume_with_nothing_to_train(
    data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # onecycle, whose schedule ends at its last step, and fewer --epochs on resume than the state has trained
    out = tmp_path / "out"
    train_in_process(train_args(data_dir, out, "--lr-schedule", "onecycle", "--no-progress"))
    finished = {name: (out / name).read_bytes() for name in ("model.pth", "curves.png", "confusion.png")}
    for name in finished:  # as if the job had been killed right after its last state
        (out / name).unlink()

    resumed = printed_by_training(train_args(data_dir, out, "--resume", "--epochs", "1", "--no-progress"), capsys)

    assert "nothing to train" in resumed
    assert (out / "model.pth").read_bytes() == finished["model.pth"]
    assert all((out / name).stat().st_size > 0 for name in ("curves.png", "confusion.png"))


def test_copies_the_user_made_beside_the_states_are_never_resumed_or_pruned(
    data_dir: Path, checkpointed_epoch: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = Path(shutil.copytree(checkpointed_epoch, tmp_path / "out"))
    newest = complete_states(out / STATES_DIR)[-1]
    copies = [Path(shutil.copytree(newest, newest.with_name(newest.name + suffix))) for suffix in ("-mine", ".keep")]

    resumed = printed_by_training(
        train_args(data_dir, out, "--epochs", "2", "--resume", "auto", "--keep-states", "1", "--no-progress"), capsys
    )

    assert f"resuming from {newest} at epoch 2" in resumed, resumed
    assert len(complete_states(out / STATES_DIR)) == 1
    assert all((copy / PROGRESS_FILE).is_file() for copy in copies)
