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

and, in a second table, what the throughput metrics (runtime/throughput.py's ThroughputMeter) add, without
them and with them: medians of --repeats rounds in the process's CPU time (other jobs on the machine slow the
wall clock unevenly), each round timing the alternatives in turn, starting with the next one each round:

  next() of a batch   `next()` of a ready batch, plain vs the meter's timed `next()` and its `count_step`: what
                      every optimizer step pays
  training step       one optimizer step of batch 64 (the batch built, forward, backward, SGD) without vs with
                      both, and without vs a second copy of itself without: whether the cost shows in a whole
                      step, beside the noise of that comparison
  logged window       the meter's `window()` (a clock, the peak memory, the arithmetic): every --log-every steps
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable, Iterator, Sequence
from datetime import date
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch.utils.data import default_collate
from torchvision import datasets
from torchvision.transforms import ToTensor

from fmnist_dist.inputs.synthetic import write_synthetic_dataset
from fmnist_dist.recipe.data import Batch, InMemoryFashionMNIST
from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.recipe.train_step import build_optimizer, step_loss
from fmnist_dist.runtime.throughput import ComputeSpec, ThroughputMeter

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
        bookkeeping = measure_bookkeeping(Path(tmp), args.repeats)
    print(
        f"## Per-step host costs ({date.today()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__})"
    )
    print("\n| choice | ours (µs) | alternative (µs) | saved per call (µs) |\n|---|---|---|---|")
    for name, ours, alternative in rows:
        print(f"| {name} | {ours:.1f} | {alternative:.1f} | {alternative - ours:.1f} |")
    print("\n| throughput metrics, per call | without (µs) | with (µs) | added (µs) | with / without |")
    print("|---|---|---|---|---|")
    for name, without, with_them in bookkeeping:
        ratio = f"{with_them / without:.3f}" if without else "-"
        print(f"| {name} | {without:.2f} | {with_them:.2f} | {with_them - without:.2f} | {ratio} |")


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


def measure_bookkeeping(data_dir: Path, repeats: int) -> list[tuple[str, float, float]]:
    """What the ThroughputMeter adds per call, on the training path it times: (row, without µs, with µs)."""
    accelerator = Accelerator(cpu=True)
    model = NeuralNetwork()
    optimizer = build_optimizer(model, lr=1e-3, momentum=0.0, weight_decay=0.0)
    meter = ThroughputMeter(ComputeSpec.of(accelerator, model), accelerator.device)
    raw = datasets.FashionMNIST(root=str(data_dir), train=True, download=False)
    fast = InMemoryFashionMNIST(raw.data, raw.targets)
    indices = torch.randperm(TRAIN_SIZE)[:BATCH_SIZE].tolist()
    ready = fast.__getitems__(indices)

    def built_batches() -> Iterator[Batch]:
        return (fast.__getitems__(indices) for _ in itertools.count())

    plain, plain_too, timed = built_batches(), built_batches(), meter.timed(built_batches())
    plain_ready, timed_ready = itertools.repeat(ready), meter.timed(itertools.repeat(ready))

    def step(batches: Iterator[Batch]) -> None:
        images, targets = next(batches)
        step_loss(model(images), targets).backward()
        optimizer.step()
        optimizer.zero_grad()

    def counted(batches: Iterator[Batch], work: Callable[[Iterator[Batch]], object]) -> Callable[[], None]:
        def run() -> None:
            work(batches)
            meter.count_step(BATCH_SIZE)

        return run

    without, without_too, with_them = cpu_times_us(
        [lambda: step(plain), lambda: step(plain_too), counted(timed, step)], repeats
    )
    return [
        (
            "next() of a batch: plain vs timed + count_step",
            *cpu_times_us([lambda: next(plain_ready), counted(timed_ready, next)], repeats),
        ),
        ("training step, batch 64: without vs with", without, with_them),
        ("training step, batch 64: without vs without again (the noise)", without, without_too),
        ("logged window: nothing vs ThroughputMeter.window()", *cpu_times_us([lambda: None, meter.window], repeats)),
    ]


def cpu_times_us(fns: Sequence[Callable[[], object]], repeats: int, number: int = 200) -> list[float]:
    """Median microseconds of process CPU time per call of each of `fns`, timed in turn, round by round, each
    round starting with the next one (so that none gains from its place)."""
    timers = [timeit.Timer(fn, timer=time.process_time) for fn in fns]
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for round_ in range(repeats):
        for i in [(round_ + k) % len(fns) for k in range(len(fns))]:
            times[i].append(timers[i].timeit(number) / number * 1e6)
    return [statistics.median(each) for each in times]


def time_us(fn: Callable[[], object], repeats: int, number: int = 200) -> float:
    """Median microseconds per call."""
    fn()
    return statistics.median(timeit.repeat(fn, number=number, repeat=repeats)) / number * 1e6


if __name__ == "__main__":
    main()
