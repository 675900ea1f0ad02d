"""The host costs behind the package's per-step choices, each timed against the alternative it replaced.

    python benchmarks/step_costs.py --threads 1

Rows (medians of --repeats timeit runs, on the CPU, the quickstart's MLP and batch 64):

  optimizer wrapper   `step()` + `zero_grad()` through Accelerate's AcceleratedOptimizer vs on the SGD it wraps
                      (the recipe's TrainStep calls the wrapped one where the wrapper adds nothing)
  weights check       `aminmax` of every weight vs `isfinite().all()` (the Trainer's divergence check)
  batch placement     Accelerate's `send_to_device` walk over a batch already on the device (skipped by
                      `device_placement=False`)
  batch gather        `index_select` vs `images[index]` on the uint8 training images (InMemoryFashionMNIST)
  batch building      one batch from InMemoryFashionMNIST vs torchvision's per-sample `ToTensor()` path
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import timeit
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import default_collate
from torchvision import datasets
from torchvision.transforms import ToTensor

from fmnist_dist.inputs.synthetic import write_synthetic_dataset
from fmnist_dist.recipe.data import InMemoryFashionMNIST
from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.recipe.train_step import build_optimizer

BATCH_SIZE = 64
TRAIN_SIZE = 60_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=5, help="timeit runs per alternative (median reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="fmnist-step-costs-") as tmp:
        write_synthetic_dataset(Path(tmp), TRAIN_SIZE, 100, seed=0)
        rows = measure_all(Path(tmp), args.repeats)
    print(
        f"## Per-step host costs ({date.today()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__})"
    )
    print("\n| choice | ours (µs) | alternative (µs) | saved per call (µs) |\n|---|---|---|---|")
    for name, ours, alternative in rows:
        print(f"| {name} | {ours:.1f} | {alternative:.1f} | {alternative - ours:.1f} |")


def measure_all(data_dir: Path, repeats: int) -> list[tuple[str, float, float]]:
    accelerator = Accelerator(cpu=True)
    model = NeuralNetwork()
    optimizer = build_optimizer(model, lr=1e-3, momentum=0.0, weight_decay=0.0)
    model, wrapped = accelerator.prepare(model, optimizer)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    weights = list(model.parameters())
    raw = datasets.FashionMNIST(root=str(data_dir), train=True, download=False)
    fast = InMemoryFashionMNIST(raw.data, raw.targets)
    per_sample = datasets.FashionMNIST(root=str(data_dir), train=True, download=False, transform=ToTensor())
    index = torch.randperm(TRAIN_SIZE)[:BATCH_SIZE]
    indices = index.tolist()
    batch = fast.__getitems__(indices)

    def both(step: Callable[[], object], zero: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            step()
            zero()

        return run

    pairs = [
        (
            "optimizer wrapper: step + zero_grad",
            both(optimizer.step, optimizer.zero_grad),
            both(wrapped.step, wrapped.zero_grad),
        ),
        (
            "weights check: aminmax vs isfinite().all()",
            lambda: torch.isfinite(torch.stack([b for p in weights for b in torch.aminmax(p.detach())])).all(),
            lambda: torch.stack([torch.isfinite(p).all() for p in weights]).all(),
        ),
        ("batch placement: none vs send_to_device", lambda: batch, lambda: send_to_device(batch, accelerator.device)),
        (
            "batch gather: index_select vs images[index]",
            lambda: raw.data.index_select(0, index),
            lambda: raw.data[index],
        ),
        (
            "batch building: in memory vs per-sample ToTensor()",
            lambda: fast.__getitems__(indices),
            lambda: default_collate([per_sample[i] for i in indices]),
        ),
    ]
    return [(name, time_us(ours, repeats), time_us(alternative, repeats)) for name, ours, alternative in pairs]


def time_us(fn: Callable[[], object], repeats: int, number: int = 200) -> float:
    """Median microseconds per call."""
    fn()
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeats)) / number * 1e6


if __name__ == "__main__":
    main()
