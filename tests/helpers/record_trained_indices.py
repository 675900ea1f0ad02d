"""`fmnist-dist` as usual, recording which training images each process trains on, in order.

    accelerate launch --config_file launch/cpu.yaml tests/helpers/record_trained_indices.py RECORD_DIR train ...

or, in a process of tests/preloaded.py, the entry "helpers.record_trained_indices:run_recording".

The model is the job's NeuralNetwork with a forward pass that, in training mode, notes the images it is given
(after the Trainer has dropped Accelerate's padding) and finds their indices in the training set by content.
Training itself is unchanged. Each process writes RECORD_DIR/rank-<R>.json: for each epoch it trained (or
resumed), the indices it trained, in order.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import fmnist_dist.training.build
from fmnist_dist.cli import main
from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.training.trainer import Trainer

trained: list[list[bytes]] = []
train_epoch = Trainer.train_epoch


def recording_epoch(self: Trainer):
    trained.append([])
    return train_epoch(self)


class RecordingNetwork(NeuralNetwork):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.device.type != "meta":  # not the start-up's count of FLOPs (no images there)
            pixels = (x * 255).round().to(torch.uint8).cpu()
            trained[-1].extend(image.numpy().tobytes() for image in pixels)
        return super().forward(x)


def indices_by_content(data_dir: Path) -> dict[bytes, int]:
    from fmnist_dist.inputs.fashion_mnist import load_split

    images = load_split(data_dir, train=True, download=False).images.unsqueeze(1)
    index = {image.numpy().tobytes(): i for i, image in enumerate(images)}
    assert len(index) == len(images), "the training images must be unique to be told apart"
    return index


def run_recording(args: list[str]) -> int:
    """`fmnist-dist ARGS[1:]`, recording into the directory ARGS[0]; the CLI's exit code."""
    record_dir, argv = Path(args[0]), args[1:]
    fmnist_dist.training.build.NeuralNetwork = RecordingNetwork
    Trainer.train_epoch = recording_epoch
    code = main(argv)
    index = indices_by_content(Path(argv[argv.index("--data-dir") + 1]))
    rank = os.environ.get("RANK", "0")
    (record_dir / f"rank-{rank}.json").write_text(json.dumps([[index[image] for image in epoch] for epoch in trained]))
    return code


if __name__ == "__main__":
    sys.exit(run_recording(sys.argv[1:]))
