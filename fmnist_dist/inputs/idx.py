"""The IDX file format FashionMNIST ships in: writing it, and checking a dataset's files before torchvision reads them.

torchvision's reader asserts on broken files (or silently reshapes them); checking first turns a truncated
download, a corrupted or unreadable file, or something else in a file's place into a message that names the file
and says what to do.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.recipe.model import IMAGE_SIZE, NUM_CLASSES
from fmnist_dist.storage.atomic_files import atomic_write

UBYTE_TYPE_CODE = 0x08
# The four raw files of each split, as torchvision's FashionMNIST names them.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
RAW_FILES = tuple(name for split in SPLIT_FILES.values() for name in split)
# torchvision's old cache in FashionMNIST/processed, one (images, labels) pair of tensors per split.
LEGACY_FILES = {"train": "training.pt", "test": "test.pt"}


class CorruptDatasetError(UsageError):
    """An IDX file that cannot be FashionMNIST."""


def raw_dir(data_dir: Path) -> Path:
    """Where a torchvision FashionMNIST root keeps the four IDX files."""
    return Path(data_dir) / "FashionMNIST" / "raw"


def processed_dir(data_dir: Path) -> Path:
    """Where a torchvision FashionMNIST root keeps the old `training.pt`/`test.pt` cache."""
    return Path(data_dir) / "FashionMNIST" / "processed"


def reads_legacy_cache(data_dir: Path) -> bool:
    """Whether torchvision will read the old processed/*.pt cache instead of the IDX files: both are files, by
    torchvision's own test (`os.path.isfile`)."""
    return all(os.path.isfile(processed_dir(data_dir) / name) for name in LEGACY_FILES.values())


def check_dataset_root(data_dir: Path, flag: str) -> None:
    """Refuse a dataset root whose `FashionMNIST/raw` cannot be a directory because a file is at or above it.

    Checked before anything is read, written or downloaded there: otherwise the failure surfaces later as
    "Not a directory", buried in a download or write error.

    Raises:
        UsageError: naming `flag` (the option that gave `data_dir`), the file in the way, and what to do.
    """
    blocker = _non_directory_at_or_above(raw_dir(data_dir))
    if blocker is None:
        return
    kind = "a file" if blocker.is_file() else "a broken symbolic link" if blocker.is_symlink() else "a special file"
    # A file at the root or above it means the flag itself is wrong; one below it is in the dataset's place.
    if blocker in (Path(data_dir), *Path(data_dir).parents):
        advice = f"pass a directory as {flag}"
    else:
        advice = f"move it away, or pass another {flag}"
    raise UsageError(f"{flag} {data_dir}: {blocker} is {kind}, not a directory; {advice}")


def _non_directory_at_or_above(directory: Path) -> Path | None:
    """The nearest existing path at or above `directory` when it is not a directory (so `directory` cannot be one)."""
    try:
        for path in (directory, *directory.parents):
            # Path.exists is False for a path under a file (ENOTDIR), so the walk goes on up to the file itself.
            if path.is_symlink() or path.exists():
                return None if path.is_dir() else path
    except OSError:  # cannot look (permissions): the read or write that follows reports it, naming the file
        return None
    return None


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (big-endian header: magic, then one int32 per dimension).

    The write is atomic (a temporary file renamed into place): a symbolic link or a FIFO at `path` is replaced,
    never written through, and a failure leaves the old file whole.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, UBYTE_TYPE_CODE, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    atomic_write(path, lambda f: f.write(header + array.tobytes()))


def is_present(path: Path) -> bool:
    """Whether a dataset file is there: False if nothing is, True for a regular file.

    Raises:
        UsageError: a dangling symbolic link, a directory or a special file (FIFO, socket, device) is in its place
            (reading or downloading over it would fail or hang), or it cannot be looked at (permissions).
    """
    try:
        if path.is_symlink() and not path.exists():
            raise UsageError(
                f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; "
                "remove the link or point it at the file"
            )
        if not path.exists():
            return False
        if not path.is_file():
            kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
            raise UsageError(f"{path} is {kind}; move it away so that the dataset file can be read or downloaded there")
    except OSError as error:
        raise _unreadable(path, error) from error
    return True


def read_idx_shape(path: Path, expected_ndim: int) -> tuple[int, ...]:
    """Check an IDX file's magic number and size against its header; return the shape it declares."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            magic, dims = f.read(4), f.read(4 * expected_ndim)
    except OSError as error:
        raise _unreadable(path, error) from error
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != expected_ndim:
        _corrupt(path, f"wrong magic number {magic.hex() or '(empty file)'}, expected 000008{expected_ndim:02x}")
    if len(dims) < 4 * expected_ndim:
        _corrupt(path, "the header is cut short")
    shape = struct.unpack(f">{expected_ndim}I", dims)
    expected_size = 4 + 4 * expected_ndim + int(np.prod(shape))
    if size != expected_size:
        _corrupt(path, f"{size} bytes where its header {shape} implies {expected_size} (truncated or corrupted)")
    return shape


def check_split_files(raw_dir: Path, split: str) -> None:
    """Check one split's image and label files: magic numbers, sizes, 28x28 images, labels 0-9, matching counts."""
    images_name, labels_name = SPLIT_FILES[split]
    images_path, labels_path = raw_dir / images_name, raw_dir / labels_name
    image_shape = read_idx_shape(images_path, expected_ndim=3)
    read_idx_shape(labels_path, expected_ndim=1)
    try:
        labels = np.fromfile(labels_path, dtype=np.uint8, offset=8)
    except OSError as error:
        raise _unreadable(labels_path, error) from error
    if problem := images_problem(image_shape):
        _corrupt(images_path, problem)
    if problem := labels_problem(image_shape[0], labels):
        _corrupt(labels_path, problem)


def images_problem(shape: Sequence[int]) -> str | None:
    """What is wrong with a split's images of `shape` (N x rows x cols), or None."""
    n_images, *size = shape
    if tuple(size) != (IMAGE_SIZE, IMAGE_SIZE):
        return f"images are {'x'.join(map(str, size))}, FashionMNIST's are {IMAGE_SIZE}x{IMAGE_SIZE}"
    if n_images == 0:
        return "it holds no images"
    return None


def labels_problem(n_images: int, labels: np.ndarray) -> str | None:
    """What is wrong with the labels (any integer array) of `n_images` images, or None."""
    if len(labels) != n_images:
        return f"{len(labels)} labels for {n_images} images"
    if outside := [int(v) for v in (labels.min(), labels.max()) if not 0 <= v < NUM_CLASSES]:
        return f"label {outside[-1]} is outside 0-{NUM_CLASSES - 1}"
    return None


def _corrupt(path: Path, problem: str) -> None:
    raise CorruptDatasetError(
        f"{path}: {problem}; delete it and download again (or regenerate it with `fmnist-dist synthetic-data`)"
    )


def _unreadable(path: Path, error: OSError) -> UsageError:
    return UsageError(
        f"cannot read {path} ({first_line(error)}); check its permissions, or delete it and download again"
    )
