"""Compare, on every rank, the fast path's batches with torchvision's per-sample `ToTensor()` batches.

    accelerate launch --config_file launch/cpu.yaml tests/helpers/fast_path_batches.py DATA_DIR OUT_DIR \
        --batch-size B --epochs E

Builds the job's Accelerator (`build_accelerator`, which splits each global batch between the processes), then
two training loaders made by the job's `ordered_loader` and prepared by Accelerate: one over the fast in-memory split
(`load_split` without transforms) and one over torchvision's FashionMNIST with `transform=ToTensor()`
(`load_split(..., transform=ToTensor())`). Both are iterated in step for every epoch; each rank writes what it
saw to OUT_DIR/rank<N>.json: per batch, whether the two agree exactly and the fast batch's dtype, shape and
labels.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from torchvision.transforms import ToTensor

from fmnist_dist.inputs.fashion_mnist import load_split
from fmnist_dist.recipe.data import InMemoryFashionMNIST, ordered_loader
from fmnist_dist.recipe.sampling import GlobalOrderBatchSampler
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.training.build import build_accelerator


def compare_batches(data_dir: Path, batch_size: int, epochs: int, seed: int) -> dict:
    """This rank's batches from both loaders, compared, for every epoch."""
    cfg = TrainConfig(
        cpu=True, tracker="none", seed=seed, batch_size=batch_size, output_dir=Path(tempfile.gettempdir())
    )
    accelerator = build_accelerator(cfg)
    fast_set = load_split(data_dir, train=True, download=False)
    torchvision_set = load_split(data_dir, train=True, download=False, transform=ToTensor())
    assert isinstance(fast_set, InMemoryFashionMNIST) and not isinstance(torchvision_set, InMemoryFashionMNIST)
    # The job's loaders: global micro-batches of each epoch's order, split between the processes by Accelerate.
    samplers = [GlobalOrderBatchSampler(len(fast_set), batch_size * accelerator.num_processes, seed) for _ in "ab"]
    fast_loader, torchvision_loader = accelerator.prepare(
        ordered_loader(fast_set, samplers[0], num_workers=0, pin_memory=False),
        ordered_loader(torchvision_set, samplers[1], num_workers=0, pin_memory=False),
    )
    batches = []
    for epoch in range(epochs):
        for sampler in samplers:
            sampler.set_position(epoch, 0)
        for (images, labels), (expected_images, expected_labels) in zip(fast_loader, torchvision_loader, strict=True):
            batches.append(
                {
                    "epoch": epoch,
                    "images_equal": torch.equal(images, expected_images) and images.dtype == expected_images.dtype,
                    "labels_equal": torch.equal(labels, expected_labels) and labels.dtype == expected_labels.dtype,
                    "dtype": str(images.dtype),
                    "shape": list(images.shape),
                    "labels": labels.tolist(),
                }
            )
    result = {"rank": accelerator.process_index, "world_size": accelerator.num_processes, "batches": batches}
    # As the job does at its end: a process that exits with its process group alive can abort in gloo's teardown.
    accelerator.end_training()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = compare_batches(args.data_dir, args.batch_size, args.epochs, args.seed)
    (args.out_dir / f"rank{result['rank']}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
