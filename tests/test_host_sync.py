"""A training step that logs nothing reads no tensor value on the host.

On a GPU every such read (`.item()`, `.tolist()`, `bool(tensor)`, `float(tensor)`, a device-to-host copy, an
operation whose output size depends on the values) waits for all the work queued before it, so the CPU cannot
run ahead of the device. The Trainer reads values only where it logs, where the processes agree on stopping
(every 20 optimizer steps) and at an epoch's end. These tests train in this process under the device check's
counter of such reads (benchmarks/device_check.py, which also runs them under CUDA's sync debug mode on a GPU).
"""

from __future__ import annotations

import importlib.util
import math
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO, TRAIN_SIZE, train_args

from fmnist_dist.runtime.stop_signals import STOP_SIGNALS


def _load_device_check():
    spec = importlib.util.spec_from_file_location("device_check", REPO / "benchmarks" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


device_check = _load_device_check()
BATCH = 16
STEPS_PER_EPOCH = math.ceil(TRAIN_SIZE / BATCH)  # 63: stop checks at 20, 40 and 60, the epoch's end at 63


@pytest.fixture(autouse=True)
def in_process_training(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`train` in this process sets OMP_NUM_THREADS, torch's threads and the stop signals' handlers: undo them."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    handlers = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def probe(data_dir: Path, output_dir: Path, epochs: int, log_every: int):
    argv = train_args(data_dir, output_dir, "--epochs", str(epochs), "--batch-size", str(BATCH))
    argv += ["--log-every", str(log_every), "--no-progress", "--threads", "1", "--cpu"]
    return device_check.probe_training(list(map(str, argv)), STEPS_PER_EPOCH, log_every, sync_debug=False)


def test_steps_that_log_nothing_read_no_tensor_value(data_dir: Path, tmp_path: Path) -> None:
    result = probe(data_dir, tmp_path / "out", epochs=2, log_every=10**9)

    assert result.exit_code == 0
    assert result.steps == 2 * STEPS_PER_EPOCH
    # Every step but the stop checks (20, 40, 60, ...) and the epoch ends (63, 126) is quiet; the last is not
    # followed by a step.
    assert len(result.quiet_steps) == 2 * STEPS_PER_EPOCH - 6 - 2
    assert result.reads_elsewhere > 0, "the stop checks read their agreed flags: a counter that sees none is broken"
    assert result.reads_in_quiet == {}, "host reads in steps that log nothing:\n" + "\n".join(
        f"after step {step}: {read}" for step, reads in result.reads_in_quiet.items() for read in reads
    )


def test_the_counter_finds_the_reads_of_logging_steps(data_dir: Path, tmp_path: Path) -> None:
    """Logging reads the loss (`.item()`): counted where it happens, so a read added to any step would be too."""
    log_every = 7
    result = probe(data_dir, tmp_path / "out", epochs=1, log_every=10**9)
    logged = probe(data_dir, tmp_path / "logged", epochs=1, log_every=log_every)

    assert logged.exit_code == 0
    # The stretches after steps 7, 14, ... hold the logging, so only the others are quiet.
    assert set(logged.quiet_steps) == {n for n in result.quiet_steps if n % log_every}
    assert logged.reads_in_quiet == {}
    assert logged.reads_elsewhere > result.reads_elsewhere


@pytest.mark.parametrize(
    ("read", "what"),
    [
        (lambda t: t[0].item(), "item()"),
        (lambda t: t.tolist(), "tolist()"),
        (lambda t: bool(t[0]), "bool(tensor)"),
        (lambda t: float(t[0]), "float(tensor)"),
        (lambda t: int(t[0]), "int(tensor)"),
        (lambda t: t.cpu(), "cpu()"),
        (lambda t: t.numpy(), "numpy()"),
        (lambda t: f"{t[0]:.2f}", "format(tensor)"),
        (lambda t: t[t > 1], "boolean-mask indexing"),
        (lambda t: t.nonzero(), "nonzero"),
        (lambda t: torch.equal(t, t), "torch.equal"),
    ],
)
def test_each_kind_of_host_read_is_counted(read, what: str) -> None:
    counter = device_check.HostReadCounter()
    values = torch.arange(4.0)
    with counter:
        read(values)
    assert [entry.split(" at ")[0] for entry in counter.reads[0]] == [what]
    assert "test_host_sync.py" in counter.reads[0][0]  # names the line that read


def test_device_work_is_not_counted() -> None:
    counter = device_check.HostReadCounter()
    values = torch.arange(4.0)
    with counter:
        total = values.sum() * 2 + values.mean()
        values.to(torch.float64).index_select(0, torch.tensor([1, 2])).unsqueeze(1).div(255)
        assert len(values) == 4 and values.shape == (4,)  # shapes are known on the host
    assert counter.reads == {}
    assert total.shape == ()
