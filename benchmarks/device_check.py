"""Everything in fmnist-dist that depends on the device, run on one device by one command: one Markdown table.

    python benchmarks/device_check.py --device cuda            # one GPU, about 5 minutes (8 at most)
    python benchmarks/device_check.py --device cpu --quick     # the same rows on the CPU, tiny data (CI)

Each row runs the package as a user does (`python -m fmnist_dist ...` in its own process, `--tracker none`, the
checkout first on PYTHONPATH) on a synthetic dataset written by `fmnist-dist synthetic-data`:

- training in fp32 (the defaults), bf16 and fp16 (fp16 with Accelerate's gradient scaler, whose state a saved
  state then holds; on the CPU the package refuses fp16, as its README says), and with the dataset in device
  memory (`--data-on-device on`) and not (`off`);
- the throughput metrics of the run with the defaults (FLOPs per image by the hand count, peak memory, and MFU
  exactly where the device's peak is known), and `--profile-steps` (one readable trace, with the device's
  kernels on a GPU);
- `evaluate` and `predict` of the trained model, and which device they used;
- a state saved on the device resumed on the device (bit-identical to the uninterrupted run, as the README
  says for the same world size and batch), on the CPU, and a CPU state resumed on the device (no such promise:
  the largest weight difference is reported); and whether a state's weights come back exactly on the other side;
- the training steps that log nothing, run under a counter of host reads of tensor values (`.item()`,
  `.tolist()`, `bool()`, `float()`, device-to-host copies, value-shaped operations such as `nonzero`) and, on
  CUDA, under `torch.cuda.set_sync_debug_mode("error")`: both must find nothing;
- the epoch benchmark's rows a-d (`benchmarks/epoch_benchmark.py --device ...`), and the time of a full run
  with the defaults (5 epochs of 60,000 images; `--quick`: 2 epochs of 6,400).

A device that is not there is refused in one line (exit code 2). The exit code is 1 when a row failed, else 0.
Progress goes to stderr as each row finishes; the table is printed last, on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parent.parent
EPOCH_BENCHMARK = REPO / "benchmarks" / "epoch_benchmark.py"
DEVICES = ("cpu", "cuda", "mps", "xpu")
USAGE_ERROR = 2
DEFAULT_BATCH = 64  # `train`'s default batch (per process), which every row here uses
NEVER_LOGS = 10**9  # a --log-every beyond any run here: no step logs
MLP_FLOPS_PER_IMAGE = 3_209_216  # the quickstart's MLP, by hand: tests/test_throughput.py
PROFILE_STEPS = 5
CHILD_MARK = "device-check-child: "  # the line by which a child reports to this script


@dataclass(frozen=True)
class Plan:
    """How big the check is."""

    train_images: int
    test_images: int
    epochs: int  # of the run with the defaults; its states are the ones resumed
    benchmark_repeats: int
    time_limit: float  # seconds; rows not started by then are skipped, so that the table is always printed

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_images / DEFAULT_BATCH)


# The full set, as FashionMNIST's; 5 epochs are the defaults. The epoch benchmark needs at least 6,400 images
# (its warm-up is 100 batches of 64).
FULL = Plan(train_images=60_000, test_images=10_000, epochs=5, benchmark_repeats=3, time_limit=480)
QUICK = Plan(train_images=6_400, test_images=1_000, epochs=2, benchmark_repeats=1, time_limit=1500)


@dataclass
class Row:
    """One line of the table: what was checked, its result, and the seconds it took (None: not timed alone)."""

    what: str
    result: str
    seconds: float | None = None
    failed: bool = False


# --- host reads of tensor values: what a training step must not do ------------------------------------------

# Tensor methods that hand a tensor's values to Python (or to NumPy): on an accelerator each one waits for all
# the work queued before it. `.cpu()` and `.numpy()` count even on the CPU, where they cost nothing: the same
# line of code is a device-to-host copy on a GPU.
VALUE_READS: dict[Callable, str] = {
    Tensor.item: "item()",
    Tensor.tolist: "tolist()",
    Tensor.__bool__: "bool(tensor)",
    Tensor.__float__: "float(tensor)",
    Tensor.__int__: "int(tensor)",
    Tensor.__index__: "tensor as an index",
    Tensor.__complex__: "complex(tensor)",
    Tensor.__format__: "format(tensor)",
    Tensor.__repr__: "repr(tensor)",
    Tensor.__contains__: "value in tensor",
    Tensor.__array__: "numpy array of a tensor",
    Tensor.numpy: "numpy()",
    Tensor.cpu: "cpu()",
    torch.equal: "torch.equal",
    Tensor.equal: "equal()",
    torch.allclose: "torch.allclose",
    Tensor.allclose: "allclose()",
    torch.is_nonzero: "torch.is_nonzero",
    Tensor.is_nonzero: "is_nonzero()",
}
# Operations whose output size depends on the values: on an accelerator they wait to learn it.
VALUE_SHAPED: dict[Callable, str] = {
    torch.nonzero: "nonzero",
    Tensor.nonzero: "nonzero",
    torch.argwhere: "argwhere",
    Tensor.argwhere: "argwhere",
    torch.masked_select: "masked_select",
    Tensor.masked_select: "masked_select",
    torch.unique: "unique",
    Tensor.unique: "unique",
    torch.unique_consecutive: "unique_consecutive",
    Tensor.unique_consecutive: "unique_consecutive",
    torch.bincount: "bincount",
    Tensor.bincount: "bincount",
}
MASK_INDEXING = {Tensor.__getitem__, Tensor.__setitem__}
COPIES = {Tensor.to, Tensor.copy_}


def host_read(func: Callable, args: Sequence[Any], kwargs: dict[str, Any]) -> str | None:
    """What a torch call reads on the host ("item()", "nonzero", ...), or None when it reads nothing there."""
    if func in VALUE_READS:
        return VALUE_READS[func]
    if func in VALUE_SHAPED:
        return VALUE_SHAPED[func]
    if func in MASK_INDEXING and _has_mask(args[1] if len(args) > 1 else None):
        return "boolean-mask indexing"
    if func in COPIES and _copies_to_host(func, args, kwargs):
        return "device-to-host copy"
    if func in (torch.repeat_interleave, Tensor.repeat_interleave) and "output_size" not in kwargs:
        return "repeat_interleave"
    return None


def _has_mask(index: Any) -> bool:
    parts = index if isinstance(index, tuple | list) else (index,)
    return any(isinstance(part, Tensor) and part.dtype in (torch.bool, torch.uint8) for part in parts)


def _copies_to_host(func: Callable, args: Sequence[Any], kwargs: dict[str, Any]) -> bool:
    if func is Tensor.copy_:  # dst.copy_(src)
        destination, source = args[0], args[1] if len(args) > 1 else kwargs.get("src")
        to_host = isinstance(destination, Tensor) and destination.device.type == "cpu"
    else:  # source.to(...): torch parses its several signatures for us
        source, device = args[0], torch._C._nn._parse_to(*args[1:], **kwargs)[0]
        to_host = device is not None and torch.device(device).type == "cpu"
    return to_host and isinstance(source, Tensor) and source.device.type != "cpu"


def caller() -> str:
    """Where the running code called torch: the innermost frame outside torch and this file."""
    torch_dir = str(Path(torch.__file__).parent)
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith(torch_dir) and frame.filename != __file__:
            return f"{_short_path(frame.filename)}:{frame.lineno} in {frame.name}"
    return "?"


def _short_path(filename: str) -> str:
    path = Path(filename)
    if path.is_relative_to(REPO):
        return str(path.relative_to(REPO))
    parts = path.parts
    return str(Path(*parts[parts.index("site-packages") + 1 :])) if "site-packages" in parts else filename


class HostReadCounter(TorchFunctionMode):
    """Counts the host reads of tensor values (`host_read`), by the optimizer step after which they happen.

    `reads[n]` lists the reads after the n-th optimizer step and up to the next one (0: before the first): the
    rest of step n (schedule, logging, stop check, an epoch's end) and step n+1's batch, forward, backward and
    optimizer update. A read inside a torch function written in Python (counted as that function) is not seen
    separately; on CUDA `torch.cuda.set_sync_debug_mode` catches those.
    """

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.reads: dict[int, list[str]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = host_read(func, args, kwargs)
        if what is not None:
            self.reads[self.steps].append(f"{what} at {caller()}")
        return func(*args, **kwargs)


@dataclass
class ProbeResult:
    """What a training run did on the host in its quiet steps: those that neither log, check for a stop signal,
    nor end an epoch.

    Attributes:
        quiet_steps: the optimizer steps n whose stretch up to step n+1 (see HostReadCounter) is quiet.
        reads_in_quiet: for each quiet step with reads, what was read where.
        reads_elsewhere: the reads outside the quiet steps (the stop checks make some: none means no count).
        sync_error: the first synchronising CUDA operation in a quiet step, where it was called (None: none).
    """

    exit_code: int | None
    steps: int
    quiet_steps: list[int]
    reads_in_quiet: dict[int, list[str]]
    reads_elsewhere: int
    sync_error: str | None = None


def quiet_step(step: int, steps_per_epoch: int, log_every: int) -> bool:
    """Whether the stretch after optimizer step `step` (a step counted from 1) has no reason to read a value.

    The processes agree on stopping every STOP_CHECK_EVERY optimizer steps (one tiny gather, whose flags are read on
    the host): those steps are allowed their reads, as are logged steps and epoch ends.
    """
    from fmnist_dist.training.trainer import STOP_CHECK_EVERY  # the package's own cadence, imported where it is used

    return step > 0 and all(step % every for every in (STOP_CHECK_EVERY, log_every, steps_per_epoch))


def probe_training(argv: Sequence[str], steps_per_epoch: int, log_every: int, sync_debug: bool) -> ProbeResult:
    """Run `fmnist-dist ARGV` (a fresh `train`) in this process, counting host reads per optimizer step.

    Args:
        argv: the `train` command line; its --log-every must be `log_every` and its epochs `steps_per_epoch`
            optimizer steps long, with no --checkpoint-every.
        sync_debug: also run each quiet step under `torch.cuda.set_sync_debug_mode("error")` (CUDA only), so
            that any synchronising CUDA operation there raises; the first one ends training and is reported.
    """
    from fmnist_dist.cli import main  # the package's command line, as `python -m fmnist_dist` runs it

    counter = HostReadCounter()

    def after_optimizer_step(optimizer, args, kwargs) -> None:
        counter.steps += 1
        if sync_debug:
            quiet = quiet_step(counter.steps, steps_per_epoch, log_every)
            torch.cuda.set_sync_debug_mode("error" if quiet else "default")

    hook = register_optimizer_step_post_hook(after_optimizer_step)
    exit_code, sync_error = None, None
    try:
        with counter:
            exit_code = main(list(argv))
    except RuntimeError as error:
        sync_error = _sync_error(error)
        if sync_error is None:
            raise
    finally:
        hook.remove()
        if sync_debug:
            torch.cuda.set_sync_debug_mode("default")
    return _probe_result(counter, exit_code, sync_error, steps_per_epoch, log_every)


def _probe_result(
    counter: HostReadCounter, exit_code: int | None, sync_error: str | None, steps_per_epoch: int, log_every: int
) -> ProbeResult:
    # The stretch after the last step counted is complete only when training finished (it ends an epoch then).
    quiet = [n for n in range(1, counter.steps) if quiet_step(n, steps_per_epoch, log_every)]
    quiet_set = set(quiet)
    return ProbeResult(
        exit_code=exit_code,
        steps=counter.steps,
        quiet_steps=quiet,
        reads_in_quiet={n: counter.reads[n] for n in quiet if counter.reads.get(n)},
        reads_elsewhere=sum(len(reads) for n, reads in counter.reads.items() if n not in quiet_set),
        sync_error=sync_error,
    )


def _sync_error(error: BaseException) -> str | None:
    """The first synchronising-operation error in `error`'s chain, as "<torch's message> at <caller>"; else None.

    The package's clean-up runs before this script can turn the debug mode off, so a later error may carry the
    first one as its context.
    """
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__context__
    for cause in reversed(chain):
        if isinstance(cause, RuntimeError) and "synchronizing" in str(cause):
            frames = [f for f in traceback.extract_tb(cause.__traceback__) if "/torch/" not in f.filename]
            where = f"{_short_path(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
            return f"{str(cause).strip().splitlines()[0]} at {where}"
    return None


# --- running the package ------------------------------------------------------------------------------------


class Checker:
    """Runs the rows in a work directory, keeping the table and the time left."""

    def __init__(self, device: str, plan: Plan, work: Path) -> None:
        self.device, self.plan, self.work = device, plan, work
        self.rows: list[Row] = []
        self.deadline = time.monotonic() + plan.time_limit
        self.data = work / "data"
        self._runs: dict[tuple, Run] = {}  # identical commands run once (on the CPU, "device" and "CPU" coincide)

    # Flags and environment of the two sides: the device under test, and the CPU.

    def side_flags(self, on_device: bool) -> list[str]:
        return [] if on_device and self.device != "cpu" else ["--cpu"]

    def side_env(self, on_device: bool) -> dict[str, str]:
        # The CPU side sees no GPU at all, as a CPU-only machine (whose states hold no CUDA random state).
        return {} if on_device and self.device != "cpu" else {"CUDA_VISIBLE_DEVICES": ""}

    def add(self, row: Row) -> None:
        if any(row.what == earlier.what for earlier in self.rows):  # on the CPU the two sides are one: said once
            return
        self.rows.append(row)
        seconds = "" if row.seconds is None else f" ({row.seconds:.1f} s)"
        print(f"device-check: {row.what}: {row.result}{seconds}", file=sys.stderr, flush=True)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Run:
        """`python ARGV` (a module or script of the checkout) once per distinct command, within the time left."""
        key = (tuple(argv), tuple(sorted((env or {}).items())))
        if key not in self._runs:
            self._runs[key] = run_process(name, [sys.executable, *argv], env or {}, self.time_left())
        return self._runs[key]

    def train(self, name: str, on_device: bool, *flags: str) -> TrainRun:
        """A fresh `train` on the check's data into `<work>/<name>`."""
        output = self.work / name
        argv = ["-m", "fmnist_dist", *train_flags(self.data, output), *self.side_flags(on_device), *flags]
        return TrainRun(self.run(name, argv, self.side_env(on_device)), output)

    def resume(self, source: TrainRun, on_device: bool, *flags: str) -> TrainRun:
        """A copy of `source`'s run directory continued from its second-newest state (one epoch before its end)."""
        side = "device" if on_device and self.device != "cpu" else "cpu"
        name = f"{source.output.name}-resumed-on-{side}" + "".join(flags).replace("-", "_")
        copy = self.work / name
        if not copy.exists():
            shutil.copytree(source.output, copy)
            (copy / "model.pth").unlink()  # the resumed run must write its own
        state = copy / "state" / source.older_state().name
        argv = [
            "-m",
            "fmnist_dist",
            *train_flags(self.data, copy),
            "--resume",
            str(state),
            *self.side_flags(on_device),
            *flags,
        ]
        return TrainRun(self.run(name, argv, self.side_env(on_device)), copy)

    def in_process(self, name: str, spec: dict[str, Any]) -> ChildReport:
        """On the device, this script's child mode: the package's CLI in a process that reports what it did."""
        argv = [str(Path(__file__).resolve()), "--child", json.dumps(spec)]
        return ChildReport(self.run(name, argv, self.side_env(True)))


@dataclass
class Run:
    """A finished process: its exit code (None: timed out or not started), output and wall seconds."""

    name: str
    exit_code: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def failure(self) -> str:
        """One line saying how it failed, for the table."""
        if self.exit_code is None:
            return f"fail: {self.stderr.strip() or 'timed out'}"
        lines = [line for line in self.stderr.strip().splitlines() if line.strip()]
        last = lines[-1] if lines else "(no output)"
        return f"fail: exit {self.exit_code}, {last[:300]}"


def run_process(name: str, command: list[str], env: dict[str, str], time_left: float) -> Run:
    """Run `command` from the checkout with the checkout first on PYTHONPATH and no launcher settings."""
    if time_left < 5:
        return Run(name, None, "", "skipped: the time limit was reached first", 0.0)
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=time_left)
    except subprocess.TimeoutExpired:
        return Run(name, None, "", f"timed out after {time_left:.0f} s (the time limit)", time.monotonic() - start)
    return Run(name, done.returncode, done.stdout, done.stderr, time.monotonic() - start)


def child_env(extra: dict[str, str]) -> dict[str, str]:
    launcher = ("ACCELERATE_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "WANDB_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env["ACCELERATE_DISABLE_RICH"] = "1"
    env.update(extra)
    return env


def train_flags(data: Path, output: Path) -> list[str]:
    return [
        "train",
        "--data-dir",
        str(data),
        "--no-download",
        "--output-dir",
        str(output),
        "--tracker",
        "none",
        "--no-progress",
    ]


@dataclass
class TrainRun:
    """A `train` process and its output directory."""

    process: Run
    output: Path

    def metrics(self) -> list[dict[str, Any]]:
        path = self.output / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def weights(self) -> dict[str, Tensor]:
        return torch.load(self.output / "model.pth", map_location="cpu", weights_only=True)

    def states(self) -> list[Path]:
        return sorted((self.output / "state").glob("step-*"))  # zero-padded step numbers: name order is step order

    def older_state(self) -> Path:
        """The second-newest state: one epoch before the end (the run keeps the newest 2)."""
        return self.states()[-2]

    def summary(self) -> str:
        last = self.metrics()[-1]
        return (
            f"test accuracy {100 * last['test_accuracy']:.1f}%, train loss {last['train_loss']:.3f}, "
            f"{last['train_samples_per_second']:,.0f} train images/s, mixed precision {last['mixed_precision']}"
        )


@dataclass
class ChildReport:
    """What a child (`--child`) reported: exit code, whether CUDA was used, and the probe's findings."""

    process: Run
    report: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        lines = [line for line in self.process.stdout.splitlines() if line.startswith(CHILD_MARK)]
        self.report = json.loads(lines[-1][len(CHILD_MARK) :]) if lines else {}


def compare_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[bool, float]:
    """(bit-identical, largest absolute difference) of two state_dicts with the same keys."""
    if a.keys() != b.keys():
        return False, math.inf
    identical = all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    largest = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    return identical, largest


def difference(a: dict[str, Tensor], b: dict[str, Tensor]) -> str:
    identical, largest = compare_weights(a, b)
    return "bit-identical" if identical else f"max abs diff {largest:.2e}"


# --- the rows -------------------------------------------------------------------------------------------------


def check_all(checker: Checker) -> None:
    """Every row, in the table's order."""
    checker.add(machine_row(checker.device))
    if not make_data(checker):
        return
    defaults = check_training(checker)
    if defaults.process.ok:
        checker.add(throughput_row(checker.device, defaults))
    check_profiler(checker)
    check_data_placement(checker)
    if defaults.process.ok:
        check_inference(checker, defaults)
        check_resume(checker, defaults)
    check_host_sync(checker)
    check_epoch_benchmark(checker)


def machine_row(device: str) -> Row:
    import accelerate

    what = f"device {device}"
    if device == "cuda":
        what += f": {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} visible)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Row(
        "machine",
        f"{what}; {cores} CPU cores; torch {torch.__version__}, accelerate {accelerate.__version__}, "
        f"Python {sys.version.split()[0]}",
    )


def make_data(checker: Checker) -> bool:
    plan = checker.plan
    run = checker.run(
        "synthetic-data",
        [
            "-m",
            "fmnist_dist",
            "synthetic-data",
            "--out",
            str(checker.data),
            "--train-size",
            str(plan.train_images),
            "--test-size",
            str(plan.test_images),
        ],
    )
    what = f"synthetic data ({plan.train_images:,} train / {plan.test_images:,} test images)"
    checker.add(Row(what, "pass" if run.ok else run.failure(), run.seconds, not run.ok))
    return run.ok


def check_training(checker: Checker) -> TrainRun:
    """fp32 with the defaults (the timing row too), bf16 and fp16; returns the defaults' run."""
    plan, device = checker.plan, checker.device
    defaults = checker.train("defaults", True, "--epochs", str(plan.epochs))
    checker.add(training_row(f"train fp32 on {device} (the defaults, {plan.epochs} epochs)", defaults, "no"))
    checker.add(defaults_timing_row(plan, defaults))
    for precision in ("bf16", "fp16"):
        run = checker.train(precision, True, "--epochs", "1", "--mixed-precision", precision)
        checker.add(precision_row(device, precision, run))
    return defaults


def training_row(what: str, run: TrainRun, precision: str) -> Row:
    if not run.process.ok:
        return Row(what, run.process.failure(), run.process.seconds, True)
    last = run.metrics()[-1]
    problems = []
    if last["mixed_precision"] != precision:
        problems.append(f"trained in {last['mixed_precision']}")
    if not last["test_accuracy"] > 0.5:  # the synthetic classes are learnt to far above chance in one epoch
        problems.append("did not learn")
    result = f"{'fail: ' + ', '.join(problems) if problems else 'pass'} ({run.summary()})"
    return Row(what, result, run.process.seconds, bool(problems))


def defaults_timing_row(plan: Plan, run: TrainRun) -> Row:
    what = f"time for {plan.epochs} epochs with the defaults ({plan.train_images:,} synthetic images)"
    if not run.process.ok:
        return Row(what, run.process.failure(), run.process.seconds, True)
    records = run.metrics()
    train = sum(r["train_seconds"] for r in records)
    evaluation = sum(r["eval_seconds"] for r in records)
    return Row(
        what,
        f"{train:.2f} s training + {evaluation:.2f} s evaluation; the whole command {run.process.seconds:.1f} s; "
        f"test accuracy {100 * records[-1]['test_accuracy']:.1f}%",
        run.process.seconds,
    )


def precision_row(device: str, precision: str, run: TrainRun) -> Row:
    what = f"train {precision} on {device} (1 epoch)" + (", with its gradient scaler" if precision == "fp16" else "")
    if device == "cpu" and precision == "fp16":  # README: "fp16 on the CPU" is refused in one line
        lines = run.process.stderr.strip().splitlines()
        refused = run.process.exit_code == USAGE_ERROR and len(lines) == 1 and "fp16" in lines[0]
        result = f"refused as documented: {lines[0]}" if refused else f"{run.process.failure()} (expected a refusal)"
        return Row(what, result, run.process.seconds, not refused)
    row = training_row(what, run, precision)
    if precision == "fp16" and run.process.ok and not row.failed and not _has_scaler(run):
        row.result, row.failed = f"fail: no gradient scaler in the saved state ({run.summary()})", True
    return row


def throughput_row(device: str, run: TrainRun) -> Row:
    """The last epoch's throughput metrics: FLOPs per image as counted by hand, a peak memory, and an MFU exactly
    where the device's fp32 peak is known (the defaults train in fp32, without TF32)."""
    from fmnist_dist.runtime.throughput import device_peak

    last = run.metrics()[-1]
    peak = device_peak(torch.cuda.get_device_name(0)) if device == "cuda" else None
    known = peak is not None and "fp32" in peak.flops
    problems = []
    if last.get("flops_per_image") != MLP_FLOPS_PER_IMAGE:
        problems.append(f"{last.get('flops_per_image')} FLOPs per image, not {MLP_FLOPS_PER_IMAGE:,}")
    if device != "mps" and not last.get("peak_memory_mib", 0) > 0:
        problems.append("no peak memory")
    if ("mfu" in last) != known:
        problems.append("an MFU without a known peak" if "mfu" in last else "no MFU although the peak is known")
    mfu = f"MFU {100 * last['mfu']:.3f}% of the {peak.name}'s" if "mfu" in last and peak else "no MFU"
    summary = (
        f"{last.get('flops_per_image', 0):,} FLOPs/image, {last.get('tflops_per_second', 0):.3f} TFLOP/s, {mfu}, "
        f"data wait {100 * last.get('data_wait_fraction', 0):.1f}%, {1000 * (last.get('seconds_per_step') or 0):.2f} "
        f"ms/step, peak memory {last.get('peak_memory_mib', 0):,.0f} MiB"
    )
    verdict = "fail: " + ", ".join(problems) if problems else "pass"
    return Row(
        f"throughput metrics on {device} (the defaults' last epoch)", f"{verdict} ({summary})", None, bool(problems)
    )


def check_profiler(checker: Checker) -> None:
    run = checker.train("profile", True, "--epochs", "1", "--profile-steps", str(PROFILE_STEPS))
    checker.add(profile_row(checker.device, run))


def profile_row(device: str, run: TrainRun) -> Row:
    """One readable trace of PROFILE_STEPS optimizer steps, with the device's kernels on a GPU, and the table."""
    what = f"profile {PROFILE_STEPS} steps on {device} (--profile-steps)"
    if not run.process.ok:
        return Row(what, run.process.failure(), run.process.seconds, True)
    traces = sorted((run.output / "profile").glob("*/*.pt.trace.json"))
    events = json.loads(traces[0].read_text())["traceEvents"] if len(traces) == 1 else []
    steps = {e["name"] for e in events if str(e.get("name", "")).startswith("ProfilerStep#")}
    kernels = sum(1 for e in events if e.get("cat") == "kernel")
    problems = []
    if len(traces) != 1 or len(steps) != PROFILE_STEPS:
        problems.append(f"{len(traces)} trace(s), {len(steps)} profiled step(s)")
    if device == "cuda" and not kernels:
        problems.append("no GPU kernel in the trace")
    if "profiled optimizer steps" not in run.process.stdout:
        problems.append("no table of the top operations")
    verdict = "fail: " + ", ".join(problems) if problems else "pass"
    size = sum(trace.stat().st_size for trace in traces) / 2**20
    result = f"{verdict} ({len(steps)} steps, {len(events):,} events, {kernels:,} device kernels, {size:.1f} MiB)"
    return Row(what, result, run.process.seconds, bool(problems))


def _has_scaler(run: TrainRun) -> bool:
    # Accelerate's save_state writes the GradScaler's state as scaler.pt when there is one.
    return any((state / "scaler.pt").exists() for state in run.states())


def check_data_placement(checker: Checker) -> None:
    runs = {
        where: checker.train(f"data-{where}", True, "--epochs", "1", "--data-on-device", where)
        for where in ("on", "off")
    }
    for where, run in runs.items():
        checker.add(training_row(f"train with --data-on-device {where} (1 epoch)", run, "no"))
    if all(run.process.ok for run in runs.values()):
        result = difference(runs["on"].weights(), runs["off"].weights())
        checker.add(Row("weights, --data-on-device on vs off", result))


def check_inference(checker: Checker, trained: TrainRun) -> None:
    model = str(trained.output / "model.pth")
    data = ["--data-dir", str(checker.data), "--no-download"]
    flags = checker.side_flags(True)
    evaluation = checker.in_process("evaluate", {"argv": ["evaluate", "--checkpoint", model, *data, "--json", *flags]})
    checker.add(evaluate_row(checker.device, evaluation, trained))
    prediction = checker.in_process(
        "predict", {"argv": ["predict", "--checkpoint", model, *data, "--index", "0", "1", "2"]}
    )
    checker.add(predict_row(checker.device, prediction))


def evaluate_row(device: str, child: ChildReport, trained: TrainRun) -> Row:
    what, run = f"evaluate on {device}", child.process
    if child.report.get("exit_code") != 0:
        return Row(what, run.failure(), run.seconds, True)
    result = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][-1])
    expected = trained.metrics()[-1]["test_accuracy"]
    problems = []
    if abs(result["accuracy"] - expected) > 1 / result["samples"]:  # the same model and images: at most one apart
        problems.append(f"training's last evaluation said {100 * expected:.2f}%")
    if device == "cuda" and not child.report.get("cuda_used"):
        problems.append("ran on the CPU")
    verdict = "fail: " + ", ".join(problems) if problems else "pass"
    accuracy = f"test accuracy {100 * result['accuracy']:.2f}%"
    return Row(what, f"{verdict} ({accuracy}, as in training)", run.seconds, bool(problems))


def predict_row(device: str, child: ChildReport) -> Row:
    what, run = f"predict on {device} (--index 0 1 2)", child.process
    predictions = [line for line in run.stdout.splitlines() if "predicted:" in line]
    if child.report.get("exit_code") != 0 or len(predictions) != 3:
        return Row(what, run.failure(), run.seconds, True)
    where = ""
    if device == "cuda" and not child.report.get("cuda_used"):
        where = "; on the CPU: `predict` loads the model on the CPU and never uses the GPU"
    return Row(what, f"pass ({predictions[0].strip()}{where})", run.seconds)


def check_resume(checker: Checker, on_device: TrainRun) -> None:
    """States saved on one side, continued on each: final weights against the uninterrupted runs."""
    device, epochs = checker.device, checker.plan.epochs
    on_cpu = checker.train("defaults-cpu", False, "--epochs", str(epochs)) if device != "cpu" else on_device
    checker.add(training_row(f"train fp32 on cpu (the defaults, {epochs} epochs)", on_cpu, "no"))
    if not on_cpu.process.ok:
        return
    runs = {device: on_device, "cpu": on_cpu}
    for saved_on, resumed_on in ((device, device), (device, "cpu"), ("cpu", device)):
        resumed = checker.resume(runs[saved_on], resumed_on == device)
        # README: bit-identical on the same device, world size and batch; across devices no promise is made.
        exact = saved_on == resumed_on or device == "cpu"
        references = {resumed_on: runs[resumed_on]} if exact else runs
        checker.add(resume_row(f"state saved on {saved_on}, resumed on {resumed_on}", resumed, references, exact))
    for saved_on, restored_on in ((device, "cpu"), ("cpu", device)):
        # Trained up to the state's epoch already: nothing to train, so model.pth holds the restored weights.
        restored = checker.resume(runs[saved_on], restored_on == device, "--epochs", str(epochs - 1))
        what = f"weights of a state saved on {saved_on}, restored on {restored_on}"
        checker.add(restore_row(what, restored, runs[saved_on]))


def resume_row(what: str, run: TrainRun, references: dict[str, TrainRun], exact: bool) -> Row:
    """`exact`: the README promises bit-identical weights (same device, world size and batch)."""
    if not run.process.ok:
        return Row(what, run.process.failure(), run.process.seconds, True)
    weights = run.weights()
    diffs = {side: compare_weights(weights, ref.weights()) for side, ref in references.items()}
    text = ", ".join(
        f"vs the uninterrupted {side} run: " + ("bit-identical" if same else f"max abs diff {largest:.2e}")
        for side, (same, largest) in diffs.items()
    )
    failed = exact and not all(same for same, _ in diffs.values())
    verdict = "fail: not bit-identical" if failed else ("pass" if exact else "value")
    return Row(f"{what} (last epoch)", f"{verdict}: {text}", run.process.seconds, failed)


def restore_row(what: str, run: TrainRun, source: TrainRun) -> Row:
    """A resume with nothing left to train writes model.pth from the restored weights: they must be the state's."""
    if not run.process.ok:
        return Row(what, run.process.failure(), run.process.seconds, True)
    import safetensors.torch

    saved = safetensors.torch.load_file(source.older_state() / "model.safetensors", device="cpu")
    same, largest = compare_weights(run.weights(), saved)
    result = "pass: bit-identical" if same else f"fail: max abs diff {largest:.2e}"
    return Row(what, result, run.process.seconds, not same)


def check_host_sync(checker: Checker) -> None:
    """The quiet training steps, with the dataset on the device (the default on a GPU) and off it."""
    plan = checker.plan
    for where in ("on", "off"):
        output = checker.work / f"host-sync-{where}"
        argv = [*train_flags(checker.data, output), "--epochs", "1", "--log-every", str(NEVER_LOGS)]
        argv += ["--data-on-device", where, *checker.side_flags(True)]
        spec = {
            "argv": argv,
            "probe": {"steps_per_epoch": plan.steps_per_epoch, "log_every": NEVER_LOGS},
            "sync_debug": checker.device == "cuda",
        }
        child = checker.in_process(f"host-sync-{where}", spec)
        for row in host_sync_rows(checker.device, where, child):
            checker.add(row)


def host_sync_rows(device: str, where: str, child: ChildReport) -> list[Row]:
    label = f"--data-on-device {where}"
    probe, run = child.report.get("probe"), child.process
    if probe is None:
        return [Row(f"host reads in training steps that log nothing ({label})", run.failure(), run.seconds, True)]
    result = ProbeResult(**{**probe, "reads_in_quiet": {int(k): v for k, v in probe["reads_in_quiet"].items()}})
    rows = [reads_row(label, result, run.seconds)]
    if device == "cuda":
        rows.append(sync_debug_row(label, result))
    return rows


def reads_row(label: str, probe: ProbeResult, seconds: float) -> Row:
    what = f"host reads in training steps that log nothing ({len(probe.quiet_steps)} of {probe.steps} steps; {label})"
    if probe.reads_elsewhere == 0:  # the stop checks read their agreed flags: a counter that saw nothing is broken
        return Row(what, "fail: no read counted anywhere, not even at the stop checks", seconds, True)
    if probe.reads_in_quiet:
        step, reads = next(iter(probe.reads_in_quiet.items()))
        total = sum(len(r) for r in probe.reads_in_quiet.values())
        return Row(what, f"fail: {total} reads, the first after step {step}: {reads[0]}", seconds, True)
    if probe.exit_code != 0 and probe.sync_error is None:
        return Row(what, f"fail: training exited {probe.exit_code}", seconds, True)
    return Row(what, f"pass: 0 (and {probe.reads_elsewhere} at stop checks, logging and epoch ends)", seconds)


def sync_debug_row(label: str, probe: ProbeResult) -> Row:
    what = f"no CUDA synchronisation in those steps, set_sync_debug_mode('error') ({label})"
    if probe.sync_error:
        return Row(what, f"fail: {probe.sync_error}", None, True)
    return Row(what, f"pass ({len(probe.quiet_steps)} steps)", None)


# --- the epoch benchmark --------------------------------------------------------------------------------------

BENCHMARK_ROWS = ("a.", "b.", "c.", "d.", "c'.")


def check_epoch_benchmark(checker: Checker) -> None:
    plan = checker.plan
    argv = [str(EPOCH_BENCHMARK), "--device", checker.device, "--repeats", str(plan.benchmark_repeats)]
    argv += ["--skip-multiprocess", "--data-dir", str(checker.data)]
    run = checker.run("epoch-benchmark", argv, checker.side_env(True))
    if not run.ok:
        checker.add(Row("epoch benchmark", run.failure(), run.seconds, True))
        return
    for row in benchmark_rows(run.stdout):
        checker.add(row)
    ratios = re.findall(r"^- (a/b|b/c|d/c')[^*]*\*\*([\d.]+)x\*\*", run.stdout, flags=re.MULTILINE)
    summary = ", ".join(f"{name} {value}x" for name, value in ratios)
    checker.add(Row(f"epoch benchmark, {plan.benchmark_repeats} round(s) (all rows)", summary or "value", run.seconds))


def benchmark_rows(table: str) -> Iterator[Row]:
    """The benchmark's rows a-d and c' from its Markdown table: median epoch seconds and images/s."""
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[0].startswith(BENCHMARK_ROWS):
            name = cells[0].split(" (")[0]
            yield Row(
                f"epoch benchmark {name} on {cells[2]}",
                f"{cells[3]} s/epoch (median), {cells[5]} images/s; rounds {cells[4]}",
            )


# --- entry points -----------------------------------------------------------------------------------------------


def child(spec: dict[str, Any]) -> int:
    """Run the package's CLI in this process (with the host-read probe when `spec` asks) and report one line.

    spec: {"argv": [...], "probe": {"steps_per_epoch": n, "log_every": m} or absent, "sync_debug": bool}.
    """
    report: dict[str, Any] = {}
    if spec.get("probe"):
        probe = probe_training(spec["argv"], sync_debug=spec.get("sync_debug", False), **spec["probe"])
        report.update(exit_code=probe.exit_code, probe=asdict(probe))
    else:
        from fmnist_dist.cli import main

        report["exit_code"] = main(spec["argv"])
    report["cuda_used"] = torch.cuda.is_initialized()
    print(CHILD_MARK + json.dumps(report), flush=True)
    return 0 if report["exit_code"] == 0 else 1


def render(rows: list[Row]) -> str:
    lines = ["| what | result | seconds |", "| --- | --- | --- |"]
    for row in rows:
        seconds = "" if row.seconds is None else f"{row.seconds:.1f}"
        lines.append(f"| {row.what} | {row.result.replace('|', '/')} | {seconds} |")
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        refuse(f"{message} (see `{self.prog} --help`)")


def refuse(message: str) -> NoReturn:
    print(f"device_check: error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="device_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=DEVICES, help="the device to check (required)")
    parser.add_argument("--quick", action="store_true", help="tiny data and 2 epochs: a smoke run (CI, the CPU)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep every run's files here (default: deleted)")
    parser.add_argument("--output", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds (default: 480, --quick 1500)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a row's own process: see child()
    return parser.parse_args(argv)


def missing_device(device: str) -> str | None:
    """Why `device` cannot be used here, or None when it can."""
    available = {
        "cpu": lambda: True,
        "cuda": torch.cuda.is_available,
        "mps": lambda: torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }[device]
    if available():
        return None
    return f"--device {device}: no {device} device is available here (torch {torch.__version__}); use --device cpu"


@contextmanager
def work_directory(given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="fmnist-device-check-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child(json.loads(args.child))
    if args.device is None:
        refuse("--device is required (cpu, cuda, mps or xpu)")
    if problem := missing_device(args.device):
        refuse(problem)
    plan = QUICK if args.quick else FULL
    if args.time_limit is not None:
        plan = Plan(**{**asdict(plan), "time_limit": args.time_limit})
    start = time.monotonic()
    with work_directory(args.workdir) as work:
        checker = Checker(args.device, plan, work)
        check_all(checker)
    failed = sum(row.failed for row in checker.rows)
    verdict = f"fail: {failed} row(s) failed" if failed else "pass"
    checker.rows.append(Row("all rows", verdict, time.monotonic() - start))
    table = render(checker.rows)
    print(table)
    if args.output:
        args.output.write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
