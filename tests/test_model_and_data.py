"""The dataset files `synthetic-data` writes, and the model's compatibility with the PyTorch quickstart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_cli
from torchvision import datasets

from fmnist_dist.inputs.synthetic import MARKER
from fmnist_dist.recipe.model import NeuralNetwork

# The quickstart's state_dict: https://pytorch.org/tutorials/beginner/basics/quickstart_tutorial.html
QUICKSTART_SHAPES = {
    "linear_relu_stack.0.weight": (512, 784),
    "linear_relu_stack.0.bias": (512,),
    "linear_relu_stack.2.weight": (512, 512),
    "linear_relu_stack.2.bias": (512,),
    "linear_relu_stack.4.weight": (10, 512),
    "linear_relu_stack.4.bias": (10,),
}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.mark.integration
def test_synthetic_data_writes_the_files_torchvision_reads(tmp_path: Path) -> None:
    result = run_cli(["synthetic-data", "--out", "syn", "--train-size", "230", "--test-size", "170"], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    raw_dir = tmp_path / "syn" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw_dir.iterdir()) == sorted([*IDX_FILES, MARKER])
    for train, size in ((True, 230), (False, 170)):
        split = datasets.FashionMNIST(root=str(tmp_path / "syn"), train=train, download=False)
        assert len(split) == size
        assert split.data.shape == (size, 28, 28) and split.data.dtype == torch.uint8
        assert sorted(split.targets.unique().tolist()) == list(range(10))


def test_model_state_dict_is_the_quickstarts() -> None:
    state = NeuralNetwork().state_dict()

    assert {key: tuple(tensor.shape) for key, tensor in state.items()} == QUICKSTART_SHAPES
