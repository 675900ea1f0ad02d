"""Throughput, model FLOPs utilisation (MFU) and peak memory of training, measured without slowing a step.

What is measured, and where the methods come from:

- **Images per second, seconds per optimizer step**: the host's wall clock (`time.perf_counter`) over a span of
  steps (a `--log-every` window, or an epoch), as Composer's `SpeedMonitor`
  (composer/callbacks/speed_monitor.py: `throughput/samples_per_sec`) and torchtitan's metrics
  (torchtitan/components/metrics.py: `tps`, `time_metrics/end_to_end(s)`) do. A logged step reads the loss,
  which waits for the device, so a window that ends there times the device's work too.
- **The fraction of step time spent waiting for data**: the host's time inside the training loader's `next()`
  over the span's wall time, torchtitan's `time_metrics/data_loading(%)`. Measured without synchronising with
  the device: on an accelerator the host queues steps ahead, so time spent fetching while the device still
  computes is counted although it costs nothing; the fraction is an upper bound of what data costs a step.
- **Model FLOPs per image**: counted once, at start-up, by `torch.utils.flop_counter.FlopCounterMode` over one
  training forward and backward pass of the model on one image (with meta tensors: nothing is computed, the
  weights and the random state are untouched). Its convention: matrix products (`mm`, `addmm`, `bmm`,
  convolutions, attention) count 2 FLOPs per multiply-accumulate; nothing else counts (activations, bias
  gradients, the loss, the optimizer's update). For the quickstart's 784-512-512-10 MLP that is
  2 x 668,672 forward, as much again for the weight gradients, and 2 x 267,264 for the input gradients of the
  second and third layer (the images need none): 3,209,216 FLOPs per image, where the usual 6 x parameters
  estimate (PaLM's MFU, torchtitan's `num_flops_per_token`) would say 4,012,032.
- **Achieved TFLOP/s** of the whole job: FLOPs per image x images per second / 1e12 (the images of every
  process, like `train_samples_per_second`).
- **MFU**: achieved FLOP/s over the peak of all processes' devices (processes x the device's dense peak at
  the precision the matrix products run in: `PEAK_FLOPS`), as Composer (`throughput/device/mfu`) and torchtitan
  (`mfu(%)`) define it. None where the peak is not known (the CPU, an accelerator not in the table): never
  guessed (torchtitan falls back to the A100's peak).
- **Peak memory**: the accelerator allocator's peak of memory allocated to tensors
  (`torch.cuda.max_memory_allocated`, `torch.xpu.max_memory_allocated`; Composer's and torchtitan's memory
  monitors read the same statistic); on the CPU the process's peak resident set size (`resource.getrusage`).
  Both since the process started (a resumed run: since the resume). None where the device keeps no peak
  (MPS has no peak statistic).

A step that logs nothing costs two clock reads per `next()` and two integer additions (benchmarks/README.md
has the measurement); nothing here reads a tensor, so nothing waits for the device.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fmnist_dist.errors import first_line
from fmnist_dist.recipe.model import IMAGE_SIZE
from fmnist_dist.recipe.train_step import step_loss
from fmnist_dist.runtime.devices import precision_in_effect

T = TypeVar("T")
MIB = 2**20


@dataclass(frozen=True)
class DevicePeak:
    """A GPU model's dense peak FLOP/s for each precision its matrix products can run in.

    Attributes:
        name: the model, as NVIDIA names it.
        pattern: a regular expression found in `torch.cuda.get_device_name()` for it (case-insensitive).
        flops: FLOP/s by precision: "fp32" (CUDA cores), "tf32", "bf16", "fp16", "fp8" (tensor cores, dense).
        source: where the numbers come from.
    """

    name: str
    pattern: str
    flops: Mapping[str, float]
    source: str


def _tera(**peaks: float) -> dict[str, float]:
    return {precision: tflops * 1e12 for precision, tflops in peaks.items()}


_H100_SHEET = "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet"
_H200_SHEET = "https://www.nvidia.com/en-us/data-center/h200/"
_V100_SHEET = "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf"
# Dense peaks, first match wins (so the specific names come before the general ones). Tensor-core figures are
# half the datasheets' "with sparsity" ones, as in Composer's GPU_AVAILABLE_FLOPS
# (composer/callbacks/speed_monitor.py) and torchtitan's get_peak_flops (torchtitan/tools/utils.py), whose
# bf16 figures these match (A100 312, H100 SXM 989, H100 PCIe 756, H100 NVL 835, H200 989, L40S 362 TFLOP/s).
PEAK_FLOPS: tuple[DevicePeak, ...] = (
    DevicePeak("H100 NVL", r"H100.*NVL", _tera(fp32=60, tf32=417.5, bf16=835.5, fp16=835.5, fp8=1670.5), _H100_SHEET),
    DevicePeak("H100 PCIe", r"H100.*PCIe", _tera(fp32=51, tf32=378, bf16=756.5, fp16=756.5, fp8=1513), _H100_SHEET),
    DevicePeak("H100 SXM", r"H100", _tera(fp32=67, tf32=494.5, bf16=989.5, fp16=989.5, fp8=1979), _H100_SHEET),
    DevicePeak("H200 NVL", r"H200.*NVL", _tera(fp32=60, tf32=417.5, bf16=835.5, fp16=835.5, fp8=1670.5), _H200_SHEET),
    # GH200 (its GPU is an H100 or H200 SXM): the same peaks.
    DevicePeak("H200 SXM", r"H200", _tera(fp32=67, tf32=494.5, bf16=989.5, fp16=989.5, fp8=1979), _H200_SHEET),
    DevicePeak(
        "A100",  # SXM and PCIe, 40 and 80 GB: the same peaks
        r"A100",
        _tera(fp32=19.5, tf32=156, bf16=312, fp16=312),
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
        "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
    ),
    DevicePeak(
        "L40S",
        r"L40S",
        _tera(fp32=91.6, tf32=183, bf16=362.05, fp16=362.05, fp8=733),
        "https://resources.nvidia.com/en-us-l40s/l40s-datasheet-28413",
    ),
    DevicePeak(
        "L4",
        r"\bL4\b",
        _tera(fp32=30.3, tf32=60, bf16=121, fp16=121, fp8=242.5),
        "https://resources.nvidia.com/en-us-data-center-overview/l4-gpu-datasheet",
    ),
    DevicePeak(
        "A10",  # not the A10G (a cloud variant with its own clocks): \b keeps it out
        r"\bA10\b",
        _tera(fp32=31.2, tf32=62.5, bf16=125, fp16=125),
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a10/pdf/a10-datasheet.pdf",
    ),
    DevicePeak(
        "T4",
        r"\bT4\b",
        _tera(fp32=8.1, fp16=65),
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/tesla-t4/t4-tensor-core-datasheet-951643.pdf",
    ),
    DevicePeak("V100S PCIe", r"V100S", _tera(fp32=16.4, fp16=130), _V100_SHEET),
    DevicePeak("V100 PCIe", r"V100-PCIE", _tera(fp32=14, fp16=112), _V100_SHEET),
    DevicePeak("V100 SXM2", r"V100", _tera(fp32=15.7, fp16=125), _V100_SHEET),
)


def device_peak(device_name: str) -> DevicePeak | None:
    """The entry of `PEAK_FLOPS` for a device named as `torch.cuda.get_device_name()` names it, else None."""
    return next((peak for peak in PEAK_FLOPS if re.search(peak.pattern, device_name, re.IGNORECASE)), None)


def matmul_precision(mixed_precision: str) -> str:
    """The precision a CUDA device's matrix products run in, by the mixed precision in effect ("no", "bf16",
    "fp16", "fp8"): under autocast the given one, else fp32, or tf32 where PyTorch is allowed to use it
    (`torch.backends.cuda.matmul.allow_tf32`, off by default)."""
    if mixed_precision != "no":
        return mixed_precision
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def flops_per_image(model: nn.Module) -> int:
    """Model FLOPs of training one image: one forward and backward pass with the recipe's loss, as counted by
    `FlopCounterMode` (its convention: the module docstring).

    The pass runs on meta tensors standing for the weights (`torch.func.functional_call`): nothing is computed
    or allocated, and the model, its gradients and the random state are left as they were.

    Args:
        model: the unwrapped model (not DDP's wrapper), taking N x 1 x 28 x 28 images.
    """
    meta = {
        name: torch.empty_like(tensor, device="meta").requires_grad_(tensor.requires_grad)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
    }
    image = torch.zeros(1, 1, IMAGE_SIZE, IMAGE_SIZE, device="meta")
    target = torch.zeros(1, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        step_loss(torch.func.functional_call(model, meta, (image,)), target).backward()
    return counter.get_total_flops()


def peak_memory_bytes(device: torch.device) -> int | None:
    """This process's peak memory since it started: the accelerator allocator's peak of memory allocated to
    tensors on `device`, or on the CPU the peak resident set size; None where the device keeps no peak (MPS).

    Reads a counter on the host: no synchronisation with the device.
    """
    if device.type == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
    read = getattr(getattr(torch, device.type, None), "max_memory_allocated", None)
    return None if read is None else int(read(device))


@dataclass(frozen=True)
class ComputeSpec:
    """What one image costs and what the job's devices can do, fixed at start-up.

    Attributes:
        flops_per_image: model FLOPs of training one image (`flops_per_image`); None where the model could not be
            counted (then `uncounted` says why, and there is no TFLOP/s or MFU).
        processes: the world size.
        device: the device's name ("cpu", or the accelerator's own, "NVIDIA H100 80GB HBM3").
        precision: the precision the matrix products run in ("fp32", "tf32", "bf16", "fp16", "fp8").
        peak: the device's entry of `PEAK_FLOPS`; None where it is not known.
    """

    flops_per_image: int | None
    processes: int
    device: str
    precision: str
    peak: DevicePeak | None
    uncounted: str | None = None

    @classmethod
    def of(cls, accelerator: Accelerator, model: nn.Module) -> ComputeSpec:
        """Count the prepared `model`'s FLOPs per image and look up the peak of the accelerator's device."""
        device = accelerator.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        precision = matmul_precision(precision_in_effect(accelerator))
        peak = device_peak(name) if device.type == "cuda" else None
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        try:
            flops, uncounted = flops_per_image(unwrapped), None
        # A model of one's own whose forward pass reads its tensors' values (`.item()`, NumPy) or copies them off
        # the device cannot run on meta tensors: its run trains all the same, without FLOPs.
        except Exception as error:
            flops, uncounted = None, first_line(error)
        return cls(flops, accelerator.num_processes, name, precision, peak, uncounted)

    @property
    def peak_flops_per_process(self) -> float | None:
        """The dense peak FLOP/s of one process's device at `precision`; None where unknown."""
        return None if self.peak is None else self.peak.flops.get(self.precision)

    def mfu(self, flops_per_second: float | None) -> float | None:
        """The job's achieved FLOP/s as a fraction of its devices' peak; None where the peak is unknown."""
        peak = self.peak_flops_per_process
        return None if peak is None or flops_per_second is None else flops_per_second / (peak * self.processes)

    def describe(self) -> str:
        """The start-up line: FLOPs per image, and the peak MFU is measured against (or why there is no MFU)."""
        if self.flops_per_image is None:
            return (
                "fmnist-dist: model FLOPs per training image not counted (its forward and backward pass did not run "
                f"on meta tensors: {self.uncounted}); no TFLOP/s or MFU"
            )
        counted = (
            f"fmnist-dist: {self.flops_per_image:,} model FLOPs per training image (forward and backward, "
            "torch.utils.flop_counter)"
        )
        peak = self.peak_flops_per_process
        if self.peak is not None and peak is not None:
            return f"{counted}; MFU against the {self.peak.name}'s dense {self.precision} peak, {peak / 1e12:g} TFLOP/s"
        return f"{counted}; no MFU: the peak {self.precision} FLOP/s of {self.device} is not known"


@dataclass(frozen=True)
class Throughput:
    """Training speed over a span of optimizer steps: a `--log-every` window, or an epoch.

    Attributes:
        seconds: wall seconds of the span, on the host's clock.
        samples_per_second: images trained per second by the whole job.
        seconds_per_step: wall seconds per optimizer step; None for a span without a step.
        data_wait_fraction: the part of `seconds` spent in the training loader's `next()`, 0 to 1.
        tflops_per_second: the whole job's achieved model TFLOP/s (1e12 FLOP/s); None where the model's FLOPs were
            not counted.
        mfu: model FLOPs utilisation, 0 to 1; None where the device's peak is not known.
        peak_memory_mib: peak memory in MiB (2**20 bytes) since the process started; None where not kept.
    """

    seconds: float
    samples_per_second: float
    seconds_per_step: float | None
    data_wait_fraction: float
    tflops_per_second: float | None
    mfu: float | None
    peak_memory_mib: float | None

    def tracker_values(self) -> dict[str, float]:
        """The values a logged step shows on the tracker (the epoch's are `EpochRecord`'s "perf/epoch_..." ones)."""
        values = {
            "perf/samples_per_second": self.samples_per_second,
            "perf/seconds_per_step": self.seconds_per_step,
            "perf/data_wait_fraction": self.data_wait_fraction,
            "perf/tflops_per_second": self.tflops_per_second,
            "perf/mfu": self.mfu,
            "perf/peak_memory_mib": self.peak_memory_mib,
        }
        return {key: value for key, value in values.items() if value is not None}


@dataclass(frozen=True)
class _Count:
    """The meter's running totals at one moment: the start of a window or of an epoch."""

    time: float
    steps: int
    images: int
    data_wait: float


class ThroughputMeter:
    """Counts optimizer steps, images and time waiting for data, on the host only; gives a `Throughput` for the
    window since the last one (every `--log-every` steps) and for the epoch.

    Args:
        compute: the model's FLOPs per image and the devices' peak.
        device: this process's device (for its peak memory).
        clock: seconds, monotonic (`time.perf_counter`; a test passes its own).
    """

    def __init__(
        self, compute: ComputeSpec, device: torch.device, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.compute = compute
        self.device = device
        self._clock = clock
        self._steps = self._images = 0
        self._data_wait = 0.0
        self._epoch_start = self._window_start = self._now()

    def start_epoch(self) -> None:
        """Start the epoch's span and a new window (an evaluation before it counts in neither)."""
        self._epoch_start = self._window_start = self._now()

    def timed(self, batches: Iterator[T]) -> Iterator[T]:
        """`batches`, adding the time each `next()` takes to the time spent waiting for data."""
        clock = self._clock
        while True:
            start = clock()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self._data_wait += clock() - start
            yield batch

    def count_step(self, images: int) -> None:
        """Count one optimizer step over `images` images (of all processes)."""
        self._steps += 1
        self._images += images

    def window(self) -> Throughput:
        """This process's throughput since the last window (or the epoch's start); starts the next window."""
        start, end = self._window_start, self._now()
        self._window_start = end
        return self._throughput(start, end, _data_wait_fraction(start, end), _mib(peak_memory_bytes(self.device)))

    def epoch(self, accelerator: Accelerator) -> Throughput:
        """The epoch's throughput so far, with the largest data-wait fraction and peak memory of any process (all
        processes call this: one gather at the epoch's end, where they meet anyway)."""
        start, end = self._epoch_start, self._now()
        memory = _mib(peak_memory_bytes(self.device))
        local = torch.tensor([[_data_wait_fraction(start, end), memory or 0.0]], device=accelerator.device)
        most_wait, most_memory = accelerator.gather(local).amax(0).tolist()
        return self._throughput(start, end, most_wait, None if memory is None else most_memory)

    def _now(self) -> _Count:
        return _Count(self._clock(), self._steps, self._images, self._data_wait)

    def _throughput(self, start: _Count, end: _Count, data_wait_fraction: float, memory: float | None) -> Throughput:
        seconds, steps = end.time - start.time, end.steps - start.steps
        samples_per_second = (end.images - start.images) / seconds
        flops = self.compute.flops_per_image
        flops_per_second = None if flops is None else samples_per_second * flops
        return Throughput(
            seconds=seconds,
            samples_per_second=samples_per_second,
            seconds_per_step=seconds / steps if steps else None,
            data_wait_fraction=data_wait_fraction,
            tflops_per_second=None if flops_per_second is None else flops_per_second / 1e12,
            mfu=self.compute.mfu(flops_per_second),
            peak_memory_mib=memory,
        )


def _data_wait_fraction(start: _Count, end: _Count) -> float:
    return (end.data_wait - start.data_wait) / (end.time - start.time)


def _mib(size: int | None) -> float | None:
    return None if size is None else size / MIB
