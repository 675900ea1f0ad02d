"""Throughput, MFU and memory, in-process: the model's FLOPs per image are the hand count of the quickstart's MLP;
the peak table finds the GPUs it lists and nothing else; MFU is omitted where no peak is known (the CPU); the
meter's windows add up its clock exactly; a real run writes plausible values to metrics.jsonl and the tracker."""

from __future__ import annotations

import contextlib
import io
import math
import resource
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import TRAIN_SIZE

from fmnist_dist.recipe.model import NeuralNetwork
from fmnist_dist.runtime.throughput import (
    ComputeSpec,
    ThroughputMeter,
    device_peak,
    flops_per_image,
    matmul_precision,
)
from fmnist_dist.settings.train_config import TrainConfig
from fmnist_dist.storage.metrics_log import EpochRecord, MetricsLog
from fmnist_dist.tracking.null_tracker import NullTracker
from fmnist_dist.training.build import build_run
from fmnist_dist.training.resume import plan_start

# The MLP's matrix products at 2 FLOPs per multiply-accumulate: the forward pass, the weight gradients (as many),
# and the input gradients of the second and third layers (the images need none).
LAYERS = [(784, 512), (512, 512), (512, 10)]
FORWARD = 2 * sum(inputs * outputs for inputs, outputs in LAYERS)
HAND_COUNT = FORWARD + FORWARD + 2 * sum(inputs * outputs for inputs, outputs in LAYERS[1:])
BATCH, LOG_EVERY = 32, 5
# What a logged step shows besides the loss (on the CPU: no MFU).
STEP_KEYS = {
    "perf/samples_per_second",
    "perf/seconds_per_step",
    "perf/data_wait_fraction",
    "perf/tflops_per_second",
    "perf/peak_memory_mib",
}


def test_flops_per_image_is_the_hand_count_of_the_quickstarts_mlp() -> None:
    model = NeuralNetwork()
    weights = {key: value.clone() for key, value in model.state_dict().items()}
    rng = torch.get_rng_state()

    assert HAND_COUNT == 3_209_216
    assert flops_per_image(model) == HAND_COUNT
    # Counted on meta tensors: the weights, their gradients and the random state are untouched.
    assert all(torch.equal(weights[key], value) for key, value in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.parametrize(
    ("device_name", "entry"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA GH200 480GB", "H200 SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A10", "A10"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-16GB", "V100 SXM2"),
        ("Tesla V100-PCIE-32GB", "V100 PCIe"),
        ("Tesla V100S-PCIE-32GB", "V100S PCIe"),
    ],
)
def test_the_peak_table_finds_each_gpu_it_lists_by_its_cuda_name(device_name: str, entry: str) -> None:
    peak = device_peak(device_name)
    assert peak is not None and peak.name == entry


@pytest.mark.parametrize(
    "device_name", ["NVIDIA A10G", "NVIDIA L40", "NVIDIA GeForce RTX 4090", "AMD Instinct MI300X", "cpu"]
)
def test_a_device_not_in_the_peak_table_has_no_peak(device_name: str) -> None:
    assert device_peak(device_name) is None


def test_peaks_are_dense_half_the_datasheets_sparse_figures() -> None:
    h100 = device_peak("NVIDIA H100 80GB HBM3")
    a100 = device_peak("NVIDIA A100-SXM4-40GB")
    assert h100 is not None and a100 is not None
    assert h100.flops["bf16"] == 1979e12 / 2 and h100.flops["fp8"] == 3958e12 / 2 and h100.flops["fp32"] == 67e12
    assert a100.flops["bf16"] == 312e12  # the A100's datasheet gives dense figures beside the sparse ones


def test_matrix_products_run_in_the_mixed_precision_else_fp32_or_tf32_where_allowed() -> None:
    assert matmul_precision("bf16") == "bf16"
    assert matmul_precision("no") == "fp32"  # PyTorch's default: no TF32 for matrix products
    torch.backends.cuda.matmul.allow_tf32 = True  # a module with its own __setattr__: monkeypatch cannot undo it
    try:
        assert matmul_precision("no") == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def test_mfu_is_the_achieved_flops_over_every_processs_peak_and_none_without_one() -> None:
    a100 = ComputeSpec(
        HAND_COUNT, processes=2, device="NVIDIA A100-SXM4-80GB", precision="bf16", peak=device_peak("A100")
    )
    t4_bf16 = ComputeSpec(HAND_COUNT, processes=1, device="Tesla T4", precision="bf16", peak=device_peak("Tesla T4"))

    assert a100.mfu(312e12) == 0.5
    assert t4_bf16.mfu(1e12) is None  # a T4 has no bf16 tensor cores: no peak, no MFU
    assert "no MFU" in t4_bf16.describe()
    assert "A100's dense bf16 peak, 312 TFLOP/s" in a100.describe()


def test_on_the_cpu_there_is_no_peak_and_no_mfu() -> None:
    spec = ComputeSpec.of(Accelerator(cpu=True), NeuralNetwork())

    assert (spec.flops_per_image, spec.device, spec.peak) == (HAND_COUNT, "cpu", None)
    assert spec.mfu(1e12) is None
    assert spec.describe().endswith("no MFU: the peak fp32 FLOP/s of cpu is not known")


class ValueReadingNetwork(NeuralNetwork):
    """A model of one's own whose forward pass reads a tensor's value, as a fork's might: meta tensors have none."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum().item() < 0:
            raise AssertionError("images are never negative")
        return super().forward(x)


def test_a_model_that_cannot_be_counted_trains_without_flops_and_says_so() -> None:
    spec = ComputeSpec.of(Accelerator(cpu=True), ValueReadingNetwork())
    clock = FakeClock()
    meter = ThroughputMeter(spec, torch.device("cpu"), clock=clock)
    meter.start_epoch()
    clock.now += 1.0
    meter.count_step(64)

    window = meter.window()

    assert spec.flops_per_image is None and spec.uncounted
    assert spec.describe().startswith("fmnist-dist: model FLOPs per training image not counted (")
    assert "\n" not in spec.describe() and spec.describe().endswith("no TFLOP/s or MFU")
    assert (window.samples_per_second, window.tflops_per_second, window.mfu) == (64.0, None, None)
    assert "perf/tflops_per_second" not in window.tracker_values()


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def batches_taking(clock: FakeClock, seconds: float) -> Iterator[int]:
    """Endless batches, each taking `seconds` of the clock to fetch."""
    while True:
        clock.now += seconds
        yield 0


def test_a_window_counts_steps_images_and_data_wait_on_its_clock() -> None:
    clock = FakeClock()
    spec = ComputeSpec(1000, processes=2, device="NVIDIA H100 PCIe", precision="fp32", peak=device_peak("H100 PCIe"))
    meter = ThroughputMeter(spec, torch.device("cpu"), clock=clock)
    batches = meter.timed(batches_taking(clock, 0.25))
    meter.start_epoch()
    for _ in range(4):  # 4 steps: 0.25 s fetching, 0.75 s computing, 64 images each
        next(batches)
        clock.now += 0.75
        meter.count_step(64)

    window = meter.window()

    assert (window.seconds, window.seconds_per_step, window.data_wait_fraction) == (4.0, 1.0, 0.25)
    assert window.samples_per_second == 64.0
    assert window.tflops_per_second == 64 * 1000 / 1e12
    assert window.mfu == 64 * 1000 / (51e12 * 2)
    assert window.peak_memory_mib is not None and window.peak_memory_mib > 0
    next(batches)  # the next window starts where this one ended: 1 step of 1.25 s
    clock.now += 1.0
    meter.count_step(32)
    second = meter.window()
    assert (second.seconds, second.seconds_per_step, second.data_wait_fraction) == (1.25, 1.25, 0.2)

    epoch = meter.epoch(Accelerator(cpu=True))  # both windows: 5 steps, 288 images in 5.25 s, 1.25 s fetching

    assert (epoch.seconds, epoch.seconds_per_step, epoch.samples_per_second) == (5.25, 1.05, 288 / 5.25)
    assert epoch.data_wait_fraction == pytest.approx(1.25 / 5.25, rel=1e-6)  # gathered as float32


def test_a_span_without_a_step_has_no_seconds_per_step() -> None:
    """A resumed run whose state was saved at its epoch's last step trains no step before evaluating it."""
    clock = FakeClock()
    meter = ThroughputMeter(ComputeSpec.of(Accelerator(cpu=True), NeuralNetwork()), torch.device("cpu"), clock=clock)
    meter.start_epoch()
    clock.now += 0.5

    epoch = meter.epoch(Accelerator(cpu=True))

    assert (epoch.seconds_per_step, epoch.samples_per_second, epoch.mfu) == (None, 0.0, None)


@dataclass(frozen=True)
class TrackedRun:
    """An in-process run's metrics.jsonl records, what its tracker was given ({step: {key: value}}) and stdout."""

    records: list[EpochRecord]
    values: dict[int, dict[str, float]]
    stdout: str


class RecordingTracker(NullTracker):
    """Keeps every logged value: {step: {key: value}}."""

    def __init__(self, accelerator: Accelerator) -> None:
        super().__init__(accelerator)
        self.values: dict[int, dict[str, float]] = {}

    def log_values(self, values: Mapping[str, float], step: int) -> None:
        self.values.setdefault(step, {}).update(values)


@pytest.fixture(scope="module")
def tracked_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TrackedRun:
    """Two epochs trained in this process, logging every LOG_EVERY steps to a recording tracker."""
    output_dir = tmp_path_factory.mktemp("throughput")
    cfg = TrainConfig(
        data_dir=data_dir,
        download=False,
        output_dir=output_dir,
        epochs=2,
        batch_size=BATCH,
        log_every=LOG_EVERY,
        cpu=True,
        tracker="none",
        progress=False,
    )
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        run = build_run(plan_start(cfg, given=frozenset()))
        tracker = run.trainer.tracker = RecordingTracker(run.accelerator)
        run.trainer.fit()
    return TrackedRun(MetricsLog.read(output_dir / "metrics.jsonl"), tracker.values, printed.getvalue())


def test_the_start_up_says_the_flops_per_image_and_why_there_is_no_mfu(tracked_run: TrackedRun) -> None:
    assert (
        "fmnist-dist: 3,209,216 model FLOPs per training image (forward and backward, torch.utils.flop_counter); "
        "no MFU: the peak fp32 FLOP/s of cpu is not known"
    ) in tracked_run.stdout.splitlines()


def test_every_epoch_records_plausible_throughput_flops_and_memory(tracked_run: TrackedRun) -> None:
    steps = math.ceil(TRAIN_SIZE / BATCH)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB

    for record in tracked_run.records:
        assert record.flops_per_image == HAND_COUNT
        assert record.seconds_per_step == pytest.approx(record.train_seconds / steps)
        assert 0 < record.data_wait_fraction < 1
        assert record.tflops_per_second == pytest.approx(HAND_COUNT * record.train_samples_per_second / 1e12)
        assert record.mfu is None
        assert 100 < record.peak_memory_mib <= peak_rss_mib  # torch alone takes hundreds of MiB
    assert "mfu" not in tracked_run.records[0].as_json()


def test_the_tracker_gets_the_epochs_values_and_a_window_at_every_logged_step(tracked_run: TrackedRun) -> None:
    steps = 2 * math.ceil(TRAIN_SIZE / BATCH)
    logged = {step: values for step, values in tracked_run.values.items() if "train/loss" in values}
    epochs = [values for values in tracked_run.values.values() if "test/accuracy" in values]

    assert sorted(logged) == list(range(LOG_EVERY, steps + 1, LOG_EVERY))
    for values in logged.values():
        assert values.keys() >= STEP_KEYS and "perf/mfu" not in values
        assert values["perf/seconds_per_step"] > 0 and 0 <= values["perf/data_wait_fraction"] < 1
        assert values["perf/tflops_per_second"] == pytest.approx(values["perf/samples_per_second"] * HAND_COUNT / 1e12)
    for values, record in zip(epochs, tracked_run.records, strict=True):
        assert values["perf/flops_per_image"] == HAND_COUNT
        assert values["perf/epoch_seconds_per_step"] == record.seconds_per_step
        assert values["perf/epoch_peak_memory_mib"] == record.peak_memory_mib
        assert "perf/epoch_mfu" not in values
