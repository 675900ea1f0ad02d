"""The fast in-memory data path gives exactly what torchvision's per-sample `ToTensor()` path gives.

Same values, dtype, shape and order for the same indices and seed: through a plain DataLoader, and through
Accelerate-prepared loaders on every rank of a real 2-process launch. User transforms fall back to torchvision.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import TRAIN_SIZE, accelerate_launch, cli_env
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import Compose, Normalize, ToTensor

from fmnist_dist.inputs.fashion_mnist import load_split
from fmnist_dist.recipe.data import InMemoryFashionMNIST, make_loader

FAST_PATH_HELPER = Path(__file__).parent / "helpers" / "fast_path_batches.py"
BATCH_SIZE = 64  # 1003 training images: the last batch is short, and 2 processes get padded batches
EPOCHS = 2


def torchvision_split(data_dir: Path, train: bool, **kwargs) -> datasets.FashionMNIST:
    """The quickstart's dataset: torchvision's FashionMNIST with per-sample `ToTensor()` unless told otherwise."""
    kwargs.setdefault("transform", ToTensor())
    return datasets.FashionMNIST(root=str(data_dir), train=train, download=False, **kwargs)


def batches(loader: DataLoader, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of `loader`, shuffled by a global RNG seeded with `seed` (as RandomSampler draws its seed)."""
    torch.manual_seed(seed)
    return list(loader)


def assert_same_batches(actual: list, expected: list) -> None:
    assert len(actual) == len(expected)
    for (images, labels), (expected_images, expected_labels) in zip(actual, expected, strict=True):
        assert images.dtype == expected_images.dtype and labels.dtype == expected_labels.dtype
        assert images.shape == expected_images.shape and labels.shape == expected_labels.shape
        assert torch.equal(images, expected_images)
        assert torch.equal(labels, expected_labels)


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
@pytest.mark.parametrize("shuffle", [True, False], ids=["shuffled", "in-order"])
def test_fast_batches_equal_torchvision_to_tensor_batches(data_dir: Path, train: bool, shuffle: bool) -> None:
    fast = make_loader(load_split(data_dir, train=train, download=False), BATCH_SIZE, shuffle, 0, False)
    reference = DataLoader(torchvision_split(data_dir, train), batch_size=BATCH_SIZE, shuffle=shuffle)

    assert isinstance(fast.dataset, InMemoryFashionMNIST)
    assert_same_batches(batches(fast, seed=3), batches(reference, seed=3))


def test_fast_batches_follow_the_default_float_dtype_as_to_tensor_does(data_dir: Path) -> None:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        fast = make_loader(load_split(data_dir, train=False, download=False), BATCH_SIZE, True, 0, False)
        reference = DataLoader(torchvision_split(data_dir, False), batch_size=BATCH_SIZE, shuffle=True)
        fast_batches, reference_batches = batches(fast, seed=5), batches(reference, seed=5)
    finally:
        torch.set_default_dtype(previous)

    assert fast_batches[0][0].dtype == torch.float64
    assert_same_batches(fast_batches, reference_batches)


def test_fast_single_samples_equal_to_tensor_samples(data_dir: Path) -> None:
    fast, reference = load_split(data_dir, train=True, download=False), torchvision_split(data_dir, True)

    for index in (0, 1, 500, TRAIN_SIZE - 1):
        (image, label), (expected_image, expected_label) = fast[index], reference[index]
        assert image.dtype == expected_image.dtype and image.shape == expected_image.shape == (1, 28, 28)
        assert torch.equal(image, expected_image)
        assert label == expected_label and isinstance(label, int)


def test_load_split_with_a_transform_returns_torchvision_dataset_applying_it(data_dir: Path) -> None:
    normalize = Compose([ToTensor(), Normalize((0.5,), (0.5,))])

    dataset = load_split(data_dir, train=True, download=False, transform=normalize)

    assert isinstance(dataset, datasets.FashionMNIST)
    reference = torchvision_split(data_dir, True)
    for index in (0, 7, TRAIN_SIZE - 1):
        image, label = dataset[index]
        expected_image, expected_label = reference[index]
        assert torch.equal(image, (expected_image - 0.5) / 0.5)
        assert label == expected_label
    images, labels = next(iter(make_loader(dataset, BATCH_SIZE, False, 0, False)))
    assert images.shape == (BATCH_SIZE, 1, 28, 28) and images.min() < 0  # normalised to [-1, 1], batched
    assert labels.dtype == torch.int64


def test_load_split_with_a_target_transform_returns_torchvision_dataset_applying_it(data_dir: Path) -> None:
    dataset = load_split(data_dir, train=False, download=False, target_transform=lambda label: label + 100)

    assert isinstance(dataset, datasets.FashionMNIST)
    reference = torchvision_split(data_dir, False)
    for index in (0, 7, 300):
        image, label = dataset[index]
        expected_image, expected_label = reference[index]
        assert label == expected_label + 100
        assert torch.equal(image, expected_image)  # images keep ToTensor() when only labels are transformed


@pytest.fixture(scope="module")
def ranks(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of 2 real gloo processes saw: its batches from both prepared loaders, compared."""
    out_dir = tmp_path_factory.mktemp("fast-path-ranks")
    result = subprocess.run(
        [
            *accelerate_launch(2),
            str(FAST_PATH_HELPER),
            str(data_dir),
            str(out_dir),
            "--batch-size",
            str(BATCH_SIZE),
            "--epochs",
            str(EPOCHS),
            "--seed",
            "11",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.integration
@pytest.mark.slow
def test_prepared_fast_batches_equal_to_tensor_batches_on_every_rank(ranks: list[dict]) -> None:
    batches_per_rank = EPOCHS * -(-TRAIN_SIZE // (2 * BATCH_SIZE))  # Accelerate pads the last round to full batches
    for rank, seen in enumerate(ranks):
        assert (seen["rank"], seen["world_size"]) == (rank, 2)
        assert len(seen["batches"]) == batches_per_rank
        for batch in seen["batches"]:
            assert batch["images_equal"] and batch["labels_equal"], (rank, batch["epoch"])
            assert batch["dtype"] == "torch.float32"
            assert batch["shape"] == [BATCH_SIZE, 1, 28, 28]


@pytest.mark.integration
@pytest.mark.slow
def test_prepared_ranks_get_different_shuffled_batches(ranks: list[dict]) -> None:
    labels = [[batch["labels"] for batch in seen["batches"]] for seen in ranks]

    assert labels[0] != labels[1]
    first_epoch = [[b["labels"] for b in seen["batches"] if b["epoch"] == 0] for seen in ranks]
    second_epoch = [[b["labels"] for b in seen["batches"] if b["epoch"] == 1] for seen in ranks]
    assert first_epoch != second_epoch  # set_epoch reshuffles
