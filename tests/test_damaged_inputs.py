"""Damaged datasets and damaged states, refused in one line by the checks `train` runs before it trains.

Each case runs the checking function in this process (`load_split`, as `train` reads its data; `find_state` and
`read_progress`, as `--resume` chooses and reads its state) and asserts what the one-line error says. The
end-to-end contract (exit code 2, one `fmnist-dist: error:` line, no traceback, the earlier run left
byte-identical) is tested once per family with a real `train` process in tests/test_bad_input.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import TRAIN_SIZE
from damages import DATASET_DAMAGES, PROGRESS_DAMAGES

from fmnist_dist.errors import UsageError
from fmnist_dist.inputs.fashion_mnist import load_split
from fmnist_dist.inputs.idx import SPLIT_FILES, raw_dir
from fmnist_dist.recipe.model import CLASSES
from fmnist_dist.recipe.position import TrainingPosition
from fmnist_dist.settings.train_config import RESUME_LATEST
from fmnist_dist.storage import strict_json
from fmnist_dist.storage.run_dir import PROGRESS_FILE, STATES_DIR
from fmnist_dist.storage.training_state import Progress, find_state, read_progress

BATCH = 32
STEPS = -(-TRAIN_SIZE // BATCH)  # one epoch of the session's synthetic data


def refusal(check: Callable[[], object], *named: str) -> str:
    """The UsageError `check` raises: one line, mentioning everything in `named`."""
    with pytest.raises(UsageError) as raised:
        check()
    message = str(raised.value)
    assert "\n" not in message, message
    for word in named:
        assert word in message, (word, message)
    return message


# ------------------------------------------------------------------------------------------- dataset files


@pytest.mark.parametrize(("damage", "problem"), DATASET_DAMAGES, ids=[damage.__name__ for damage, _ in DATASET_DAMAGES])
def test_a_damaged_dataset_file_is_refused_before_it_is_read(
    damage: Callable[[Path], str], problem: str, corrupt_data_dir: Path
) -> None:
    name = damage(raw_dir(corrupt_data_dir))
    refusal(lambda: load_split(corrupt_data_dir, train=True, download=False), name, problem, "download again")


def test_a_missing_test_file_is_named_even_when_training_reads_the_train_split(corrupt_data_dir: Path) -> None:
    test_labels = SPLIT_FILES["test"][1]
    (raw_dir(corrupt_data_dir) / test_labels).unlink()
    refusal(
        lambda: load_split(corrupt_data_dir, train=True, download=False),
        test_labels,
        "incomplete",
        "all four",
        "--no-download",
    )


# ------------------------------------------------------------------------------------------- a saved state


@pytest.fixture
def output_dir(tmp_path: Path) -> Path:
    """An output directory with the progress.json of the state a 1-epoch run on the session's data saves (the
    checks here read nothing else of a state)."""
    output_dir = tmp_path / "out"
    state = output_dir / STATES_DIR / f"step-{STEPS:09d}"
    state.mkdir(parents=True)
    progress = Progress(
        position=TrainingPosition(epoch=1, samples_done=0, global_step=STEPS),
        dataset_size=TRAIN_SIZE,
        per_process_batch=BATCH,
        global_batch_size=BATCH,
        config={"epochs": 1, "batch_size": BATCH, "seed": 0},
        metrics=[epoch_record(1)],
        save_index=1,
    )
    (state / PROGRESS_FILE).write_text(strict_json.dumps(asdict(progress), indent=1))
    return output_dir


def epoch_record(epoch: int) -> dict:
    """A metrics record as the Trainer writes it at the end of `epoch`."""
    return {
        "epoch": epoch,
        "global_step": epoch * STEPS,
        "lr": 0.001,
        "train_loss": 2.2,
        "test_loss": 2.1,
        "test_accuracy": 0.25,
        "test_samples": 301,
        "train_samples": TRAIN_SIZE,
        "world_size": 1,
        "global_batch_size": BATCH,
        "confusion_matrix": [[3] * len(CLASSES) for _ in CLASSES],
    }


def test_the_undamaged_state_is_read(output_dir: Path) -> None:
    """The damages below are what makes each state unreadable."""
    state = find_state(output_dir, RESUME_LATEST)
    assert state is not None and read_progress(state).position.global_step == STEPS


@pytest.mark.parametrize("damage", PROGRESS_DAMAGES.values(), ids=PROGRESS_DAMAGES.keys())
def test_resume_from_a_damaged_state_is_refused(damage: Callable[[Path], None], output_dir: Path) -> None:
    (state,) = (output_dir / STATES_DIR).iterdir()
    damage(state)
    refusal(
        lambda: read_progress(find_state(output_dir, RESUME_LATEST)),
        str(state),
        "cannot be read",
        "--resume STATE_DIR",
    )


def test_resume_without_saved_state_is_refused(tmp_path: Path) -> None:
    refusal(lambda: find_state(tmp_path, RESUME_LATEST), "--resume", "no saved training state", "without --resume")


def test_resume_from_a_directory_that_is_no_state_is_refused(output_dir: Path) -> None:
    refusal(lambda: find_state(output_dir, str(output_dir)), f"--resume {output_dir}", "not a saved")
