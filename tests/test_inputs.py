"""Every file torchvision's FashionMNIST will read is checked first, for both splits: a missing, empty,
unreadable or misplaced file, a file where a directory goes, a partial dataset or a stale processed/*.pt cache is
one line and exit code 2 (or a download, when that is allowed), never a traceback, a wrong answer, or a file written
or deleted; a failed download keeps its URL and reason; `synthetic-data` never replaces a dataset unasked, checks
every target before writing, replaces links rather than writing through them, removes the old cache that would hide
its files, and leaves its mark.

Flag and data checks that need no Accelerator call the CLI's `main` in this process; `train` runs as a process.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import FinishedRun, run_cli
from torchvision import datasets

from fmnist_dist.cli import main
from fmnist_dist.errors import UsageError
from fmnist_dist.inputs.dataset_checks import check_dataset, check_legacy_file, describe_dataset
from fmnist_dist.inputs.idx import LEGACY_FILES, RAW_FILES, SPLIT_FILES, processed_dir, raw_dir, write_idx
from fmnist_dist.inputs.synthetic import MARKER, is_synthetic, write_synthetic_dataset

PREFIX = "fmnist-dist: error: "
TEST_LABELS = SPLIT_FILES["test"][1]
NOBODY = 65534  # uid and gid of the unprivileged user `nobody`


def files_in(directory: Path) -> dict[str, bytes]:
    """Every regular file under `directory`, by relative path, with its bytes."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def one_error_line(returncode: int | None, err: str, *named: str) -> str:
    """Exit code 2 and exactly one error line mentioning everything in `named`; return the line."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert returncode == 2, err
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    for word in named:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def predict_index(data: Path, *flags: str) -> int | None:
    """`predict --index 0` on `data`: it reads the test split before the (absent) checkpoint."""
    try:
        return main(
            ["predict", "--checkpoint", str(data / "none.pth"), "--index", "0", "--data-dir", str(data), *flags]
        )
    except SystemExit as leaving:
        return leaving.code


@pytest.fixture
def data(data_dir: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic dataset, for a test to damage."""
    return Path(shutil.copytree(data_dir, tmp_path / "data"))


def refused(data: Path, capsys: pytest.CaptureFixture, *named: str, flags: tuple[str, ...] = ("--no-download",)) -> str:
    """The one-line refusal of `data`, which is left exactly as it was."""
    before = files_in(data)
    returncode = predict_index(data, *flags)
    line = one_error_line(returncode, capsys.readouterr().err, *named)
    assert files_in(data) == before
    return line


# ------------------------------------------------------------------------------------ raw files, both splits


def test_a_partial_dataset_is_downloaded_whole_when_allowed(
    data: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With downloads allowed, a missing file means torchvision fetches all four; here from a closed port."""
    (raw_dir(data) / TEST_LABELS).unlink()
    mirror = f"http://127.0.0.1:{closed_port()}/"
    monkeypatch.setenv("no_proxy", "*")  # straight to the closed port, whatever proxy the machine has
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [mirror])
    line = refused(
        data, capsys, "could not download", f"{mirror}train-images-idx3-ubyte.gz", "refused", "synthetic-data", flags=()
    )
    assert "Tried" not in line  # torchvision's multi-line message, folded into one


def closed_port() -> int:
    """A local TCP port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", RAW_FILES)
def test_a_directory_in_place_of_a_file_is_refused_even_with_downloads(
    name: str, data: Path, capsys: pytest.CaptureFixture
) -> None:
    (raw_dir(data) / name).unlink()
    (raw_dir(data) / name).mkdir()
    refused(data, capsys, str(raw_dir(data) / name), "is a directory", "move it away", flags=())
    assert (raw_dir(data) / name).is_dir()


def test_a_dangling_symlink_is_refused(data: Path, capsys: pytest.CaptureFixture) -> None:
    link = raw_dir(data) / TEST_LABELS
    link.unlink()
    link.symlink_to(data / "gone")
    refused(data, capsys, str(link), "symbolic link", "does not exist", flags=())
    assert link.is_symlink()


def test_a_fifo_in_place_of_a_file_is_refused_without_reading_it(data: Path, capsys: pytest.CaptureFixture) -> None:
    """Opening a FIFO for reading would wait for a writer forever."""
    fifo = raw_dir(data) / TEST_LABELS
    fifo.unlink()
    os.mkfifo(fifo)
    refused(data, capsys, str(fifo), "not a regular file")


def test_a_file_the_user_may_not_read_is_refused(data_dir: Path) -> None:
    """As root, permissions do not apply: the check then runs in a forked child that has become `nobody`, on a copy
    in a directory anyone may enter (pytest's own temporary directories are private to root)."""
    with tempfile.TemporaryDirectory() as shared:
        Path(shared).chmod(0o755)
        data = Path(shutil.copytree(data_dir, Path(shared) / "data"))
        for path in [data, *data.rglob("*")]:  # readable by anyone (pytest's copies are private), but for one file
            path.chmod(0o755 if path.is_dir() else 0o644)
        (raw_dir(data) / TEST_LABELS).chmod(0)
        message = message_as_nobody(lambda: check_dataset(data, download=False))
    assert message.startswith(f"cannot read {raw_dir(data) / TEST_LABELS} ("), message
    assert "Permission denied" in message
    assert "check its permissions" in message and "\n" not in message


def message_as_nobody(call: Callable[[], object]) -> str:
    """`call()`'s UsageError message (or "no error"), from a forked child process running as user `nobody`."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: drop root, check, report, and leave without running pytest's teardown
        os.close(read_end)
        message = "no error"
        try:
            if os.geteuid() == 0:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            call()
        except UsageError as error:
            message = str(error)
        except BaseException as error:
            message = f"{type(error).__name__}: {error}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        message = pipe.read()
    os.waitpid(child, 0)
    return message


def test_a_dataset_with_no_images_is_refused(data: Path, capsys: pytest.CaptureFixture) -> None:
    images, labels = SPLIT_FILES["test"]
    write_idx(raw_dir(data) / images, np.zeros((0, 28, 28), dtype=np.uint8))
    write_idx(raw_dir(data) / labels, np.zeros(0, dtype=np.uint8))
    refused(data, capsys, images, "no images", "download again")


# -------------------------------------------------------------------------------- a file where a directory goes


@pytest.mark.parametrize("blocker", [".", "FashionMNIST", "FashionMNIST/raw"])
def test_a_file_in_place_of_a_data_directory_is_named_before_any_download(
    blocker: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    in_the_way = (data / blocker).resolve()
    in_the_way.parent.mkdir(parents=True, exist_ok=True)
    in_the_way.write_text("not a directory")
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [f"http://127.0.0.1:{closed_port()}/"])  # no real fetch
    line = one_error_line(
        predict_index(data), capsys.readouterr().err, "--data-dir", f"{in_the_way.name} is a file, not a directory"
    )
    assert "download" not in line
    assert in_the_way.read_text() == "not a directory"


# ------------------------------------------------------------------------------------ torchvision's old cache


Pair = tuple[torch.Tensor, torch.Tensor]


def write_legacy_cache(data: Path, train: Pair, test: Pair) -> None:
    """processed/training.pt and test.pt as old torchvision versions wrote them: (uint8 images, int64 labels)."""
    processed_dir(data).mkdir(parents=True)
    for name, pair in zip(LEGACY_FILES.values(), (train, test), strict=False):
        torch.save(pair, processed_dir(data) / name)


def good_pair(n: int, seed: int = 0) -> Pair:
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator),
        torch.randint(0, 10, (n,), generator=generator),
    )


@pytest.mark.parametrize(
    ("bad_pair", "problem"),
    [
        ((good_pair(100)[0], torch.full((100,), 12)), "label 12 is outside 0-9"),
        ((good_pair(100)[0], good_pair(50)[1]), "50 labels for 100 images"),
        ((torch.zeros(0, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)), "no images"),
        ((torch.zeros(5, 28, 28), torch.zeros(5, dtype=torch.int64)), "not N x 28 x 28 uint8 images"),
        ((good_pair(100)[0], good_pair(100)[1].int()), "torch.int32 labels"),
        ((good_pair(100)[0], good_pair(100)[1].bool()), "torch.bool labels"),
    ],
    ids=["label-12", "100-images-50-labels", "empty", "float-images", "int32-labels", "bool-labels"],
)
def test_a_stale_processed_cache_is_checked_like_the_raw_files(
    bad_pair, problem: str, data: Path, capsys: pytest.CaptureFixture
) -> None:
    write_legacy_cache(data, good_pair(30), bad_pair)
    line = refused(data, capsys, str(processed_dir(data) / LEGACY_FILES["test"]), problem)
    assert f"delete {processed_dir(data)}" in line


def test_a_good_processed_cache_is_read_and_named_as_the_source(data: Path, capsys: pytest.CaptureFixture) -> None:
    """torchvision reads the cache instead of raw/: the data must be the cache's, and the start-up note says so."""
    images, labels = good_pair(7, seed=3)
    write_legacy_cache(data, good_pair(30), (images, labels))
    check_dataset(data, download=False)
    split = datasets.FashionMNIST(root=str(data), train=False)
    assert torch.equal(split.data, images) and torch.equal(split.targets, labels)
    assert "processed" in describe_dataset(data) and "instead of raw/" in describe_dataset(data)


def test_the_cache_check_accepts_exactly_the_label_dtypes_training_can_use(tmp_path: Path) -> None:
    """Labels cross_entropy refuses would pass the check and then crash training ("expected target dtype")."""
    images, labels = good_pair(4)
    for dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        torch.save((images, labels.to(dtype)), tmp_path / "test.pt")
        assert accepts(lambda: F.cross_entropy(torch.zeros(4, 10), labels.to(dtype)), RuntimeError) == accepts(  # noqa: B023 - called at once
            lambda: check_legacy_file(tmp_path / "test.pt"), UsageError
        ), dtype


def accepts(call: Callable[[], object], refusal: type[Exception]) -> bool:
    """Whether `call` runs without raising `refusal`."""
    try:
        call()
    except refusal:
        return False
    return True


# ---------------------------------------------------------------------------------------------- synthetic-data


def run_synthetic_data(out: Path, *flags: str) -> int | None:
    """`synthetic-data --out OUT` with 20 train and 10 test images, in this process."""
    return main(["synthetic-data", "--out", str(out), "--train-size", "20", "--test-size", "10", *flags])


def test_synthetic_data_refuses_to_replace_a_dataset_without_force(data: Path, capsys: pytest.CaptureFixture) -> None:
    before = files_in(data)
    one_error_line(run_synthetic_data(data), capsys.readouterr().err, str(data), "already holds", "--force")
    assert files_in(data) == before


def test_synthetic_data_force_replaces_it_and_marks_it_synthetic(data: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_synthetic_data(data, "--force") == 0
    assert len(datasets.FashionMNIST(root=str(data), train=True)) == 20
    assert is_synthetic(data) and "synthetic" in describe_dataset(data)


def test_synthetic_data_force_replaces_symlinks_never_their_targets(data: Path, tmp_path: Path) -> None:
    outside, nowhere = tmp_path / "precious", tmp_path / "nowhere" / "made"
    outside.write_bytes(b"keep me")
    links = [raw_dir(data) / name for name in SPLIT_FILES["test"]]
    for link, target in zip(links, (outside, nowhere), strict=False):
        link.unlink()
        link.symlink_to(target)
    assert run_synthetic_data(data, "--force") == 0
    assert outside.read_bytes() == b"keep me" and not nowhere.parent.exists()
    assert not any(link.is_symlink() for link in links)
    assert len(datasets.FashionMNIST(root=str(data), train=False)) == 10


@pytest.mark.integration
@pytest.mark.parametrize(
    ("make", "kind"), [(Path.mkdir, "is a directory"), (os.mkfifo, "not a regular file")], ids=["directory", "fifo"]
)
def test_synthetic_data_force_refuses_a_non_file_in_place_of_one_before_writing_anything(
    make, kind: str, data: Path, tmp_path: Path
) -> None:
    """The test labels are written last: a refusal after the other three would leave a mixed dataset (and a FIFO
    opened for writing waits for a reader forever, hence a process with a timeout)."""
    in_the_way = raw_dir(data) / TEST_LABELS
    in_the_way.unlink()
    make(in_the_way)
    before = files_in(data)
    result = run_cli(
        ["synthetic-data", "--out", data, "--force", "--train-size", "20", "--test-size", "10"],
        cwd=tmp_path,
        timeout=60,
    )
    one_error_line(result.returncode, result.stderr, str(in_the_way), kind, "move it away")
    assert files_in(data) == before


@pytest.mark.parametrize("out", ["a-file", "a-file/data", "/proc/fmnist-dist-data"])
def test_synthetic_data_refuses_an_out_that_cannot_be_a_directory(
    out: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "a-file").write_text("mine")
    one_error_line(run_synthetic_data(tmp_path / out), capsys.readouterr().err, "--out")
    assert (tmp_path / "a-file").read_text() == "mine"


def test_synthetic_data_force_removes_the_old_cache_that_would_hide_it(
    data: Path, capsys: pytest.CaptureFixture
) -> None:
    """torchvision reads processed/*.pt whenever both are there: left in place, the new files would go unread."""
    write_legacy_cache(data, good_pair(30), good_pair(7))
    assert run_synthetic_data(data, "--force") == 0
    assert "removed torchvision's old cache" in capsys.readouterr().out
    assert len(datasets.FashionMNIST(root=str(data), train=True)) == 20
    check_dataset(data, download=False)
    assert "synthetic" in describe_dataset(data)


def test_real_files_over_a_synthetic_dataset_are_not_called_synthetic(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path, 20, 10)
    assert is_synthetic(tmp_path)
    labels = raw_dir(tmp_path) / TEST_LABELS
    write_idx(labels, (np.fromfile(labels, dtype=np.uint8, offset=8) + 1) % 10)  # new files, old marker
    assert (raw_dir(tmp_path) / MARKER).exists()
    assert not is_synthetic(tmp_path) and describe_dataset(tmp_path) is None


@pytest.mark.integration
def test_training_on_synthetic_data_says_so_at_start(one_epoch_run: FinishedRun) -> None:
    start_up = one_epoch_run.stdout.splitlines()[0]
    assert start_up.startswith("fmnist-dist: 1 process(es)") and "data: synthetic" in start_up
