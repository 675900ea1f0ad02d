"""Record which training indices each process trains on, per epoch, exactly as `fmnist-dist train` deals them.

    accelerate launch --config_file launch/cpu.yaml tests/helpers/shard_indices.py OUT.json --size N --batch-size B

Builds the job's Accelerator (`build_accelerator`), wraps an in-memory dataset whose labels are the sample
indices in the job's `make_loader`, prepares it, and keeps the samples of each batch that `Trainer._train_step`
keeps (`real_batch_size` drops Accelerate's padding). The main process writes, for every epoch, one list of
indices per rank to OUT.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from accelerate.utils import gather_object

from fmnist_dist.config import TrainConfig
from fmnist_dist.data import InMemoryFashionMNIST, make_loader, real_batch_size
from fmnist_dist.job import build_accelerator


def indices_per_rank(size: int, batch_size: int, epochs: int, seed: int) -> dict:
    """Every epoch's kept indices, one list per rank (on every process)."""
    cfg = TrainConfig(cpu=True, tracker="none", seed=seed, batch_size=batch_size,
                      output_dir=Path(tempfile.gettempdir()))
    accelerator = build_accelerator(cfg)
    # The label of sample i is i, so a batch's targets are the indices it holds.
    dataset = InMemoryFashionMNIST(torch.zeros(size, 1, 1, dtype=torch.uint8), torch.arange(size))
    loader = accelerator.prepare(make_loader(dataset, batch_size, True, num_workers=0, pin_memory=False))
    epochs_seen = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        kept: list[int] = []
        for step, (_, indices) in enumerate(loader):
            real = real_batch_size(step, batch_size, size, accelerator.num_processes, accelerator.process_index)
            kept.extend(indices[:real].tolist())
        epochs_seen.append(gather_object([kept]))  # one list per rank, in rank order
    result = {"world_size": accelerator.num_processes, "epochs": epochs_seen, "is_main": accelerator.is_main_process}
    # As the job does at its end: a process that exits with its process group alive can abort in gloo's teardown.
    accelerator.end_training()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = indices_per_rank(args.size, args.batch_size, args.epochs, args.seed)
    if result.pop("is_main"):
        args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
