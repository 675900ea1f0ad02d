"""How each process computes: its device (CPU or accelerator), its CPU threads, and the mixed precision in effect."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import parse_flag_from_env

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.settings.train_config import MAX_THREADS, check_at_most

# Where Accelerate's fp8 backends (transformer_engine, MS-AMP, torchao) run: NVIDIA GPUs, and Intel Gaudi 2 and later.
FP8_DEVICES = frozenset({"cuda", "hpu"})
FP8_NEEDS = "fp8 needs a GPU with transformer_engine, MS-AMP or torchao installed"


def wants_cpu(cpu_flag: bool) -> bool:
    """`--cpu`, or ACCELERATE_USE_CPU=1 (which Accelerate itself reads only after setting up the process group)."""
    return cpu_flag or parse_flag_from_env("ACCELERATE_USE_CPU")


def default_threads() -> int:
    """CPU threads per process when `--threads` is not given.

    OMP_NUM_THREADS when it is set: the user's, or the launcher's (`accelerate launch` sets it from
    `--num_cpu_threads_per_process`, 1 unless told otherwise, and torchrun sets 1), as Lightning does. Otherwise
    this process's share of the cores it may run on: usable cores (`os.sched_getaffinity`, which honours
    taskset and cgroup cpusets) divided by the processes on this node (LOCAL_WORLD_SIZE, set by the launchers),
    at least 1.

    Raises:
        UsageError: OMP_NUM_THREADS is above MAX_THREADS.
    """
    requested = _positive_int_from_env("OMP_NUM_THREADS")
    if requested is not None:
        check_at_most("OMP_NUM_THREADS", requested, MAX_THREADS)  # as --threads: far beyond any machine's cores
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // (_positive_int_from_env("LOCAL_WORLD_SIZE") or 1))


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op CPU threads to `threads` (None: `default_threads()`); return the number set.

    OMP_NUM_THREADS is set to the same number, as Lightning does: Accelerate, when it joins CPU processes with
    OMP_NUM_THREADS unset, sets its own count (physical cores / local processes) over ours; and child processes
    inherit it. Inter-op threads are left alone: this model runs one operator at a time, and torch allows
    setting them only before the first parallel work.
    """
    count = threads or default_threads()
    torch.set_num_threads(count)
    os.environ["OMP_NUM_THREADS"] = str(count)
    return count


def precision_in_effect(accelerator: Accelerator) -> str:
    """The mixed precision the Accelerator really trains in: "no", "fp16", "bf16" or "fp8".

    Accelerate keeps the requested mode in `mixed_precision` even where it does not autocast (fp16 on the CPU);
    `native_amp` says whether it does, except for fp8, which it sets on any device once a backend is installed.
    """
    if accelerator.mixed_precision == "fp8" and accelerator.device.type not in FP8_DEVICES:
        return "no"
    if accelerator.mixed_precision == "no" or accelerator.native_amp:
        return accelerator.mixed_precision
    return "no"


def check_precision_runs(accelerator: Accelerator, flag_given: bool) -> None:
    """Refuse a mixed precision the device cannot run, instead of training in fp32 while reporting it.

    A refusal, not a substitute, as Accelerate itself refuses fp16 on devices without fp16 autocast (and
    Lightning refused fp16 on the CPU): fp32 would ignore the request, and bf16 changes the numerics and is
    slower than fp32 on CPUs without bf16 instructions, so the user should choose.

    Raises:
        UsageError: the requested mode is not in effect on this device.
    """
    requested = accelerator.mixed_precision
    if precision_in_effect(accelerator) == requested:
        return
    reason = FP8_NEEDS if requested == "fp8" else f"Accelerate would train in fp32 and report {requested}"
    raise UsageError(
        f"{_precision_source(flag_given)} {requested} cannot run on {accelerator.device.type}: {reason}; "
        f"{_precision_advice(accelerator.device.type)}"
    )


@contextmanager
def precision_refusals_as_usage_errors() -> Iterator[None]:
    """Turn the Accelerator's own refusal of a mixed precision into a one-line usage error: "bf16 mixed
    precision requires ... a supported device" on a GPU without bf16, or "Using `fp8` precision requires
    `transformer_engine` or `MS-AMP` to be installed" (fp8 comes only from `accelerate launch`/`accelerate config`:
    --mixed-precision does not offer it).

    Accelerate raises a plain ValueError (ImportError when no fp8 backend is found later), so its message is all
    there is to tell it from other errors.
    """
    try:
        yield
    except (ValueError, ImportError) as error:
        refusal = _precision_refusal(error)
        if refusal is None:
            raise
        raise refusal from error


def _precision_refusal(error: ValueError | ImportError) -> UsageError | None:
    """The usage error for Accelerate's refusal of a mixed precision; None when `error` is not one."""
    if "fp8" in str(error):
        return UsageError(
            f"{_precision_source(False)} fp8 cannot run here: {FP8_NEEDS} "
            f"(Accelerate: {first_line(error)}); pass --mixed-precision bf16 or --mixed-precision no"
        )
    if "mixed precision" in str(error):
        return UsageError(f"{first_line(error)}; pass --mixed-precision no, or a mode this device supports")
    return None


def _precision_source(flag_given: bool) -> str:
    return "--mixed-precision" if flag_given else "mixed precision (from `accelerate config`/`accelerate launch`)"


def _precision_advice(device_type: str) -> str:
    if device_type == "cpu":
        return "pass --mixed-precision bf16 (CPU autocast) or --mixed-precision no"
    return "pass --mixed-precision no"


def _positive_int_from_env(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None
