"""One training epoch of FashionMNIST at batch 64, timed side by side in one run on one machine.

    python benchmarks/epoch_benchmark.py                       # all rows, 3 interleaved repeats
    python benchmarks/epoch_benchmark.py --repeats 5 --skip-multiprocess
    python benchmarks/epoch_benchmark.py --device cuda         # single-process rows on the GPU
    python benchmarks/epoch_benchmark.py --threads 1 --skip-multiprocess   # steadier on a shared machine

Rows (all train the quickstart's MLP with the quickstart's SGD, lr 1e-3, no momentum, so only the data and
step path differ):

  a. quickstart   the PyTorch quickstart as published: torchvision FashionMNIST + ToTensor, a per-sample
                  DataLoader(batch_size=64, shuffle=True) and the tutorial's `train` loop, which reads
                  `loss.item()` and prints every 100 batches (printed into a buffer to keep stdout a table).
  b. fmnist-dist  the package's own training path, built by `build_run` as `fmnist-dist train` builds it,
                  timing `Trainer.train_epoch`, the call `Trainer.fit` makes for every epoch.
  c. floor        the same SGD steps on preloaded float tensors, batches indexed by a random permutation,
                  no DataLoader: what any data path costs at least.
  d. end to end   the real command, `fmnist-dist train` in its own process (quickstart SGD, constant rate,
                  no tracker, no progress bar), `train_seconds` from its metrics.jsonl for the epochs after
                  the first; beside it (c') the floor's steps in a separate process too, timed the same way
                  (the first epoch is the warm-up), so that d/c' compares two fresh processes.
  2-process CPU   `accelerate launch --config_file launch/cpu.yaml -m fmnist_dist train --cpu ...`, the job
                  as a whole; `train_samples_per_second` from its metrics.jsonl (all processes together).

The data is a FashionMNIST-sized synthetic set (60,000 / 10,000 images in the real IDX format, read by
torchvision's FashionMNIST class) unless --data-dir points at a real copy. Rows are warmed up, then measured
in interleaved rounds (a, b, c, d, c', a, b, ...) so that machine noise hits them alike; the table gives
medians. Every row, the processes of d and c' included, runs with the same number of torch CPU threads.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import ToTensor

from fmnist_dist.inputs.synthetic import write_synthetic_dataset
from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.recipe.position import steps_per_epoch
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.metrics_log import MetricsLog
from fmnist_dist.training.build import build_run
from fmnist_dist.training.resume import plan_start

REPO = Path(__file__).resolve().parent.parent
BATCH_SIZE = 64
LR = 1e-3  # the quickstart's SGD settings, for every row
# What `fmnist-dist train` is given in rows d and the 2-process job: the quickstart's SGD (batch, rate, no
# momentum, a constant rate without warm-up), untracked and without a progress bar.
QUICKSTART_SGD_FLAGS = [
    "--batch-size",
    str(BATCH_SIZE),
    "--lr",
    str(LR),
    "--momentum",
    "0",
    "--lr-schedule",
    "constant",
    "--warmup-epochs",
    "0",
    "--tracker",
    "none",
    "--no-progress",
]
TRAIN_SIZE, TEST_SIZE = 60_000, 10_000
WARMUP_BATCHES = 100

# A row's epoch function takes the epoch number and returns (seconds, samples trained).
EpochFn = Callable[[int], tuple[float, int]]
# A measured round: (wall seconds, samples, process CPU seconds).
Round = tuple[float, int, float]


# Row keys, in the order of the table and of every round.
QUICKSTART, PACKAGE, FLOOR, END_TO_END, FLOOR_PROCESS = "a", "b", "c", "d", "c'"
ROW_NAMES = {
    QUICKSTART: "a. quickstart (torchvision + ToTensor, per-sample DataLoader)",
    PACKAGE: "b. fmnist-dist (Trainer.train_epoch, Accelerate-prepared loader)",
    FLOOR: "c. floor (preloaded tensors, permutation slices, no loader)",
    END_TO_END: "d. end to end (`fmnist-dist train` in its own process, metrics.jsonl train_seconds)",
    FLOOR_PROCESS: "c'. floor in its own process (timed as d: epochs after the first)",
}
SEPARATE_PROCESS_ROWS = (END_TO_END, FLOOR_PROCESS)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    args.threads = torch.get_num_threads()  # the child processes of rows d and c' get the same count
    if args.floor_process:
        return floor_process(args.data_dir, device, args.floor_process)
    with tempfile.TemporaryDirectory(prefix="fmnist-bench-") as tmp:
        data_dir = args.data_dir or make_data(Path(tmp) / "data")
        rows = {
            QUICKSTART: quickstart_row(data_dir, device),
            PACKAGE: package_row(data_dir, device, Path(tmp) / "run"),
            FLOOR: floor_row(data_dir, device),
            END_TO_END: end_to_end_row(data_dir, device, Path(tmp) / "e2e", args),
            FLOOR_PROCESS: floor_process_row(data_dir, device, args),
        }
        results = measure(rows, args.repeats, args.epochs_per_measure)
        multiprocess = None if args.skip_multiprocess else two_process_cpu(data_dir, Path(tmp) / "mp", args.repeats)
    report = render(args, device, results, multiprocess)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report + "\n")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds per row (median reported)")
    parser.add_argument("--epochs-per-measure", type=int, default=1, help="epochs timed together per round")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device of the single-process rows (default: cuda if available)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads of every single-process row, rows d and c' included (default: "
        "torch's choice); 1 is steadier on a machine shared with other jobs",
    )
    parser.add_argument(
        "--process-epochs",
        type=int,
        default=2,
        help="epochs of each process of rows d and c' (the first is the warm-up; median of the rest)",
    )
    parser.add_argument("--floor-process", type=int, default=0, help=argparse.SUPPRESS)  # row c' runs itself so
    parser.add_argument("--skip-multiprocess", action="store_true", help="leave out the 2-process CPU row")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="a torchvision FashionMNIST root to use instead of the synthetic set",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"also write the table here (e.g. {REPO / 'benchmarks' / 'results' / 'epoch.md'})",
    )
    return parser.parse_args(argv)


def make_data(root: Path) -> Path:
    write_synthetic_dataset(root, TRAIN_SIZE, TEST_SIZE, seed=0)
    return root


# --- a. the quickstart as published ------------------------------------------------------------------------


def quickstart_row(data_dir: Path, device: torch.device) -> EpochFn:
    training_data = datasets.FashionMNIST(root=str(data_dir), train=True, download=False, transform=ToTensor())
    train_dataloader = DataLoader(training_data, batch_size=BATCH_SIZE, shuffle=True)
    model = NeuralNetwork().to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    log = io.StringIO()

    def train(dataloader, model, loss_fn, optimizer, max_batches=None):  # the tutorial's loop, verbatim
        size = len(dataloader.dataset)
        model.train()
        for batch, (X, y) in enumerate(dataloader):
            if batch == max_batches:
                break
            X, y = X.to(device), y.to(device)

            # Compute prediction error
            pred = model(X)
            loss = loss_fn(pred, y)

            # Backpropagation
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

            if batch % 100 == 0:
                loss, current = loss.item(), (batch + 1) * len(X)
                print(f"loss: {loss:>7f}  [{current:>5d}/{size:>5d}]", file=log)

    train(train_dataloader, model, loss_fn, optimizer, max_batches=WARMUP_BATCHES)

    def epoch(_: int) -> tuple[float, int]:
        start = time.perf_counter()
        train(train_dataloader, model, loss_fn, optimizer)
        sync(device)
        return time.perf_counter() - start, len(training_data)

    return epoch


# --- b. fmnist-dist's own training path ----------------------------------------------------------------------


def package_row(data_dir: Path, device: torch.device, output_dir: Path) -> EpochFn:
    """The run `fmnist-dist train` builds, by the same function, timed in the Trainer's real epoch."""
    cfg = TrainConfig(
        data_dir=data_dir,
        download=False,
        batch_size=BATCH_SIZE,
        lr=LR,
        momentum=0.0,
        lr_schedule="constant",
        warmup_epochs=0.0,
        output_dir=output_dir,
        cpu=device.type == "cpu",
        tracker="none",
        progress=False,
        epochs=1_000_000,
    )
    output_dir.mkdir(parents=True)
    start = plan_start(cfg, given=frozenset())
    trainer = build_run(start).trainer
    position = start.progress.position  # the one position the Trainer reads and advances

    def run_epoch(epoch: int, samples_done: int = 0) -> tuple[float, int]:
        position.epoch, position.samples_done = epoch, samples_done  # `fit` would move to the next epoch
        stats = trainer.train_epoch()
        return stats.seconds, stats.samples

    run_epoch(0, samples_done=start.progress.dataset_size - WARMUP_BATCHES * BATCH_SIZE)  # warm-up: the last batches
    return run_epoch


# --- d. the real command, end to end ---------------------------------------------------------------------


def end_to_end_row(data_dir: Path, device: torch.device, output_dir: Path, args: argparse.Namespace) -> EpochFn:
    """`fmnist-dist train` in its own process; the `train_seconds` it reports for the epochs after the first."""
    command = [
        sys.executable,
        "-m",
        "fmnist_dist",
        "train",
        "--data-dir",
        str(data_dir),
        "--no-download",
        "--output-dir",
        str(output_dir),
        "--epochs",
        str(args.process_epochs),
        "--threads",
        str(args.threads),
        *QUICKSTART_SGD_FLAGS,
        "--overwrite",
    ] + (["--cpu"] if device.type == "cpu" else [])
    args.end_to_end_command = "fmnist-dist " + " ".join(command[3:])

    def epoch(_: int) -> tuple[float, int]:
        run_child(command, "fmnist-dist train")
        records = MetricsLog.read(output_dir / "metrics.jsonl")[1:]
        return statistics.median(r.train_seconds for r in records), records[0].train_samples

    return epoch


def floor_process_row(data_dir: Path, device: torch.device, args: argparse.Namespace) -> EpochFn:
    """Row c's steps in a process of their own, started and timed as row d's (epochs after the first)."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--floor-process",
        str(args.process_epochs),
        "--data-dir",
        str(data_dir),
        "--device",
        str(device),
        "--threads",
        str(args.threads),
    ]

    def epoch(_: int) -> tuple[float, int]:
        measured = json.loads(run_child(command, "the floor process").splitlines()[-1])
        return statistics.median(measured["seconds"]), measured["images"]

    return epoch


def floor_process(data_dir: Path, device: torch.device, epochs: int) -> int:
    """Row c' inside its own process: print the seconds of each epoch after the first and the images of one epoch,
    as one JSON object."""
    epoch = floor_row(data_dir, device)
    measured = [epoch(e) for e in range(epochs)][1:]
    print(json.dumps({"seconds": [seconds for seconds, _ in measured], "images": measured[0][1]}))
    return 0


def run_child(command: list[str], what: str) -> str:
    """Run a row's process (no inherited launcher settings, so it is one process); return its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


# --- c. the floor --------------------------------------------------------------------------------------------


def floor_row(data_dir: Path, device: torch.device) -> EpochFn:
    raw = datasets.FashionMNIST(root=str(data_dir), train=True, download=False)
    images = raw.data.unsqueeze(1).float().div(255).to(device)
    targets = raw.targets.to(device)
    model = NeuralNetwork().to(device)
    loss_fn = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    generator = torch.Generator(device=device).manual_seed(0)

    def steps(max_batches: int | None = None) -> None:
        order = torch.randperm(len(targets), device=device, generator=generator)
        for batch, start in enumerate(range(0, len(targets), BATCH_SIZE)):
            if batch == max_batches:
                break
            index = order[start : start + BATCH_SIZE]
            loss = loss_fn(model(images[index]), targets[index])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    steps(WARMUP_BATCHES)

    def epoch(_: int) -> tuple[float, int]:
        start = time.perf_counter()
        steps()
        sync(device)
        return time.perf_counter() - start, len(targets)

    return epoch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(rows: dict[str, EpochFn], repeats: int, epochs_per_measure: int) -> dict[str, list[Round]]:
    """Interleaved rounds: every row once per round, `epochs_per_measure` epochs each time."""
    results: dict[str, list[Round]] = {name: [] for name in rows}
    for round_ in range(repeats):
        for name, epoch_fn in rows.items():
            cpu_start = time.process_time()
            runs = [epoch_fn(1 + round_ * epochs_per_measure + e) for e in range(epochs_per_measure)]
            seconds, samples = sum(r[0] for r in runs), sum(r[1] for r in runs)
            results[name].append((seconds, samples, time.process_time() - cpu_start))
            print(f"round {round_ + 1}/{repeats}: {name}: {seconds:.2f} s", file=sys.stderr)
    return results


# --- the 2-process CPU job -----------------------------------------------------------------------------------


def two_process_cpu(data_dir: Path, output_dir: Path, repeats: int) -> dict:
    """`fmnist-dist train` under `accelerate launch` with 2 gloo processes; the first epoch is the warm-up."""
    epochs = repeats + 1
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "launch" / "cpu.yaml"),
        "--main_process_port",
        str(free_port()),
        "-m",
        "fmnist_dist",
        "train",
        "--cpu",
        "--data-dir",
        str(data_dir),
        "--no-download",
        "--output-dir",
        str(output_dir),
        "--epochs",
        str(epochs),
        *QUICKSTART_SGD_FLAGS,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "LOCAL_RANK"))}
    env.update(CUDA_VISIBLE_DEVICES="", ACCELERATE_DISABLE_RICH="1", WANDB_MODE="offline")
    print(f"2-process CPU job: {epochs} epochs ...", file=sys.stderr)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the 2-process job failed:\n{done.stdout}\n{done.stderr}")
    records = MetricsLog.read(output_dir / "metrics.jsonl")[1:]
    return {
        "world_size": records[0].world_size,
        "seconds": statistics.median(r.train_seconds for r in records),
        "samples": records[0].train_samples,
        "samples_per_second": statistics.median(r.train_samples_per_second for r in records),
        "epochs": len(records),
        "rounds": ", ".join(f"{r.train_seconds:.2f}" for r in records),
        "command": "python " + " ".join(command[1:]),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the report ----------------------------------------------------------------------------------------------


def render(args: argparse.Namespace, device: torch.device, results: dict, multiprocess: dict | None) -> str:
    per_epoch = {key: [run[0] / args.epochs_per_measure for run in runs] for key, runs in results.items()}
    medians = {key: statistics.median(seconds) for key, seconds in per_epoch.items()}
    cpu = {key: statistics.median(run[2] for run in runs) / args.epochs_per_measure for key, runs in results.items()}
    samples = {key: runs[0][1] for key, runs in results.items()}
    steps = steps_per_epoch(BATCH_SIZE, samples[END_TO_END])
    a, b, c, d, c_process = (medians[key] for key in ROW_NAMES)
    lines = [
        f"## One training epoch, batch {BATCH_SIZE} ({datetime.now():%Y-%m-%d %H:%M})",
        "",
        machine(device),
        "",
        f"Median of {args.repeats} interleaved rounds of {args.epochs_per_measure} epoch(s) each; "
        f"{samples[PACKAGE]:,} training images per epoch ({steps} steps); SGD lr {LR}, no momentum, every row; "
        f"{args.threads} torch thread(s) in every single-process row.",
        "",
        "| row | processes | device | epoch seconds (median) | all rounds | samples/s | process CPU s (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, name in ROW_NAMES.items():
        rounds = ", ".join(f"{seconds:.2f}" for seconds in per_epoch[key])
        cpu_seconds = "" if key in SEPARATE_PROCESS_ROWS else f"{cpu[key]:.2f}"
        lines.append(
            f"| {name} | 1 | {device} | {medians[key]:.2f} | {rounds} | "
            f"{samples[key] / medians[key]:,.0f} | {cpu_seconds} |"
        )
    if multiprocess:
        lines.append(
            f"| 2-process CPU job (`accelerate launch`, metrics.jsonl, median of {multiprocess['epochs']} epochs "
            f"after the first) | {multiprocess['world_size']} | cpu | {multiprocess['seconds']:.2f} | "
            f"{multiprocess['rounds']} | {multiprocess['samples_per_second']:,.0f} | |"
        )
    lines += [
        "",
        f"- a/b (quickstart time / fmnist-dist time): **{a / b:.2f}x**",
        f"- b/c (fmnist-dist time / floor time): **{b / c:.2f}x**",
        f"- d/c' (end to end / floor, each in its own process): **{d / c_process:.2f}x**; d/c **{d / c:.2f}x**",
        f"- host time per step outside the model, (d - c') / {steps} steps: **{(d - c_process) / steps * 1e6:.0f} µs**",
        f"- process CPU time, rows a-c: a/b {cpu[QUICKSTART] / cpu[PACKAGE]:.2f}x, "
        f"b/c {cpu[PACKAGE] / cpu[FLOOR]:.2f}x",
        f"- a/c (quickstart / floor) bounds a/b from above: **{a / c:.2f}x**",
        f"- d: `{args.end_to_end_command}`",
    ]
    if multiprocess:
        lines.append(f"- 2-process job: `{multiprocess['command']}`")
    return "\n".join(lines)


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return (
        f"Machine: {cpu}, {cores} usable CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, device {device}{gpu}"
    )


if __name__ == "__main__":
    sys.exit(main())
