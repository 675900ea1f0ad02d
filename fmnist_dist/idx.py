"""The IDX file format FashionMNIST ships in: writing it, and checking a dataset's files before torchvision reads them.

torchvision's reader asserts on broken files (or silently reshapes them); checking first turns a truncated
download or a corrupted file into a message that names the file and says what to do.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from fmnist_dist.errors import UsageError
from fmnist_dist.model import IMAGE_SIZE, NUM_CLASSES

UBYTE_TYPE_CODE = 0x08
# The four raw files of each split, as torchvision's FashionMNIST names them.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class CorruptDatasetError(UsageError):
    """An IDX file that cannot be FashionMNIST."""


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (big-endian header: magic, then one int32 per dimension)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, UBYTE_TYPE_CODE, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def read_idx_shape(path: Path, expected_ndim: int) -> tuple[int, ...]:
    """Check an IDX file's magic number and size against its header; return the shape it declares."""
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != expected_ndim:
            _corrupt(path, f"wrong magic number {magic.hex() or '(empty file)'}, expected 000008{expected_ndim:02x}")
        dims = f.read(4 * expected_ndim)
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
    n_images, rows, cols = read_idx_shape(images_path, expected_ndim=3)
    if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
        _corrupt(images_path, f"images are {rows}x{cols}, FashionMNIST's are {IMAGE_SIZE}x{IMAGE_SIZE}")
    (n_labels,) = read_idx_shape(labels_path, expected_ndim=1)
    if n_images != n_labels:
        _corrupt(labels_path, f"{n_labels} labels for {n_images} images in {images_name}")
    labels = np.fromfile(labels_path, dtype=np.uint8, offset=8)
    if labels.size and labels.max() >= NUM_CLASSES:
        _corrupt(labels_path, f"label {int(labels.max())} is outside 0-{NUM_CLASSES - 1}")


def _corrupt(path: Path, problem: str) -> None:
    raise CorruptDatasetError(
        f"{path}: {problem}; delete it and download again (or regenerate it with `fmnist-dist synthetic-data`)"
    )
