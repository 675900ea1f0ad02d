"""A state records the training set it was trained on (the fingerprint of its images and labels, and the data
directory) and is continued only on that training set: another --data-dir of the same size, or the files replaced
in place (`synthetic-data --seed 7 --force`), is refused in one line naming both, with the output directory left
as it was. The same images elsewhere resume; a state saved before fingerprints were recorded is checked by its
image count only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TEST_SIZE, TRAIN_SIZE, run_cli, train_args

from fmnist_dist.cli import main
from fmnist_dist.errors import UsageError
from fmnist_dist.inputs.fashion_mnist import fingerprint, load_split
from fmnist_dist.inputs.synthetic import write_synthetic_dataset
from fmnist_dist.recipe.data import InMemoryFashionMNIST
from fmnist_dist.storage.run_dir import PROGRESS_FILE, STATES_DIR
from fmnist_dist.storage.training_state import complete_states, read_progress

PREFIX = "fmnist-dist: error: "
QUIET = {"OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------ the fingerprint


@pytest.fixture(scope="module")
def train_split(data_dir: Path) -> InMemoryFashionMNIST:
    split = load_split(data_dir, train=True, download=False)
    assert isinstance(split, InMemoryFashionMNIST)
    return split


def test_the_fingerprint_is_the_same_for_every_form_of_the_same_split(data_dir: Path, train_split) -> None:
    """The fast path, torchvision's per-sample dataset (a user's transform) and uint8 labels (torchvision's old
    cache) hold the same images and labels."""
    per_sample = load_split(data_dir, train=True, download=False, transform=lambda image: image)
    uint8_labels = InMemoryFashionMNIST(train_split.images, train_split.targets.to(torch.uint8))
    assert fingerprint(per_sample) == fingerprint(uint8_labels) == fingerprint(train_split)


def one_pixel_brighter(images: torch.Tensor, labels: torch.Tensor) -> None:
    images[500, 14, 14] += 1


def one_label_changed(images: torch.Tensor, labels: torch.Tensor) -> None:
    labels[500] = (labels[500] + 1) % 10


def two_images_swapped(images: torch.Tensor, labels: torch.Tensor) -> None:
    images[[0, 1]], labels[[0, 1]] = images[[1, 0]], labels[[1, 0]]


@pytest.mark.parametrize("change", [one_pixel_brighter, one_label_changed, two_images_swapped])
def test_the_fingerprint_changes_with_any_pixel_label_or_order(train_split, change) -> None:
    images, labels = train_split.images.clone(), train_split.targets.clone()
    change(images, labels)
    assert not (torch.equal(images, train_split.images) and torch.equal(labels, train_split.targets))
    assert fingerprint(InMemoryFashionMNIST(images, labels)) != fingerprint(train_split)


# ---------------------------------------------------------------------------------------------- resuming on it


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with `data/` (the synthetic set) and `out/`, a finished 1-epoch run trained on it; the paths in
    its state are relative, so that a copy of the directory is a run of its own."""
    work = tmp_path_factory.mktemp("trained")
    shutil.copytree(data_dir, work / "data")
    result = run_cli(train_args(Path("data"), Path("out"), "--epochs", "1", "--no-progress"), cwd=work, **QUIET)
    assert result.returncode == 0, result.stderr
    return work


@pytest.fixture
def work(trained: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "work", symlinks=True))


def files_in(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def saved_training_data(work: Path) -> dict[str, str]:
    [state] = complete_states(work / "out" / STATES_DIR)
    return json.loads((state / PROGRESS_FILE).read_text())["training_data"]


def resume(work: Path, data: str, *extra: str):
    return run_cli(train_args(Path(data), Path("out"), "--resume", "--no-progress", *extra), cwd=work, **QUIET)


def refused(work: Path, data: str, *named: str) -> str:
    """The one-line refusal to resume `work`'s run on `data`, whose output directory is left as it was."""
    before = files_in(work / "out")
    result = resume(work, data, "--epochs", "2")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    assert "Traceback" not in result.stderr
    for word in named:
        assert word in lines[0], (word, lines[0])
    assert files_in(work / "out") == before
    return lines[0]


@pytest.mark.integration
def test_a_state_records_the_training_set_it_was_trained_on(work: Path) -> None:
    recorded = saved_training_data(work)
    assert recorded == {"data_dir": "data", "fingerprint": fingerprint(load_split(work / "data", True, False))}


@pytest.mark.integration
def test_a_state_is_not_resumed_on_another_data_dir_of_the_same_size(work: Path) -> None:
    write_synthetic_dataset(work / "other", TRAIN_SIZE, TEST_SIZE, seed=7)
    saved = saved_training_data(work)["fingerprint"]
    line = refused(work, "other", "--resume", "other images", "in data ", "in other ", saved)
    assert fingerprint(load_split(work / "other", True, False)) in line


@pytest.mark.integration
def test_a_state_is_not_resumed_on_files_replaced_in_place(work: Path, capsys: pytest.CaptureFixture) -> None:
    saved = saved_training_data(work)["fingerprint"]
    replace = ["synthetic-data", "--out", str(work / "data"), "--seed", "7", "--force"]
    assert main([*replace, "--train-size", str(TRAIN_SIZE), "--test-size", str(TEST_SIZE)]) == 0
    capsys.readouterr()
    line = refused(work, "data", "other images", saved)
    assert fingerprint(load_split(work / "data", True, False)) in line


@pytest.mark.integration
def test_the_same_images_in_another_directory_resume(work: Path) -> None:
    shutil.copytree(work / "data", work / "moved")
    result = resume(work, "moved", "--epochs", "1")  # nothing left to train: it checks, and finishes
    assert result.returncode == 0, result.stderr


@pytest.mark.integration
def test_a_state_saved_before_fingerprints_is_checked_by_its_image_count_only(work: Path) -> None:
    for state in complete_states(work / "out" / STATES_DIR):
        progress = json.loads((state / PROGRESS_FILE).read_text())
        del progress["training_data"]
        (state / PROGRESS_FILE).write_text(json.dumps(progress))
    write_synthetic_dataset(work / "same-size", TRAIN_SIZE, TEST_SIZE, seed=7)
    assert resume(work, "same-size", "--epochs", "1").returncode == 0
    write_synthetic_dataset(work / "smaller", TRAIN_SIZE - 1, TEST_SIZE, seed=0)
    refused(work, "smaller", f"saved training on {TRAIN_SIZE} images", f"has {TRAIN_SIZE - 1}")


@pytest.mark.integration
@pytest.mark.parametrize("damaged", [5, {"data_dir": "data"}, {"data_dir": "data", "fingerprint": None}])
def test_a_damaged_training_set_record_is_refused_in_one_line(work: Path, damaged) -> None:
    [state] = complete_states(work / "out" / STATES_DIR)
    progress = json.loads((state / PROGRESS_FILE).read_text())
    (state / PROGRESS_FILE).write_text(json.dumps({**progress, "training_data": damaged}))
    with pytest.raises(UsageError) as refusal:
        read_progress(state)
    assert str(state) in str(refusal.value) and "training_data" in str(refusal.value)
    assert "\n" not in str(refusal.value)
