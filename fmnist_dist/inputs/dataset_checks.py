"""Which files torchvision's FashionMNIST reads from a data directory, checked before it reads them.

torchvision reads `FashionMNIST/processed/training.pt` and `test.pt` (its old cache) whenever both are files,
and then nothing else; otherwise it needs all four IDX files in `FashionMNIST/raw`, whichever split is asked
for, and `download=True` fetches all four when any is missing. `check_dataset` follows the same rules, so that
every file torchvision will read has been checked first and a problem is one line that says what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torchvision import datasets

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.inputs.idx import (
    LEGACY_FILES,
    RAW_FILES,
    SPLIT_FILES,
    check_dataset_root,
    check_split_files,
    images_problem,
    is_present,
    labels_problem,
    processed_dir,
    raw_dir,
    reads_legacy_cache,
)
from fmnist_dist.inputs.synthetic import is_synthetic

OFFLINE_HINT = (
    "with no network, `fmnist-dist synthetic-data --out DIR` writes a synthetic stand-in to pass as --data-dir DIR"
)
# The label dtypes cross_entropy takes as class indices (others fail mid-training: "expected target dtype").
LABEL_DTYPES = (torch.int64, torch.uint8)


def check_dataset(data_dir: Path, download: bool) -> None:
    """Make sure every file torchvision's FashionMNIST will read from `data_dir` is there and sound, both splits.

    Missing IDX files are downloaded (all four, as torchvision does) when `download` is true.

    Raises:
        UsageError: `data_dir`, or a directory torchvision needs under it, is a file; a file is missing (and
            `download` is false), unreadable, not a regular file, or not FashionMNIST (bad header, size, image
            shape, no images, labels outside 0-9 or not one per image); or the download failed.
    """
    if reads_legacy_cache(data_dir):
        for name in LEGACY_FILES.values():
            check_legacy_file(processed_dir(data_dir) / name)
        return
    check_dataset_root(data_dir, "--data-dir")  # before a download, whose error would bury "Not a directory"
    raw = raw_dir(data_dir)
    missing = [name for name in RAW_FILES if not is_present(raw / name)]
    if missing and not download:
        raise UsageError(_missing_message(raw, missing))
    if missing:
        download_dataset(data_dir)
    for split in SPLIT_FILES:
        check_split_files(raw, split)


def check_legacy_file(path: Path) -> None:
    """Check one file of torchvision's old cache: (uint8 images N x 28 x 28, int64 or uint8 labels 0-9, one per
    image)."""
    try:
        loaded = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:
        raise _legacy_error(path, f"it cannot be read ({first_line(error)})") from error
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2 and all(map(torch.is_tensor, loaded))):
        raise _legacy_error(path, "it does not hold an (images, labels) pair of tensors")
    images, labels = loaded
    if images.dtype != torch.uint8 or images.dim() != 3 or labels.dim() != 1 or labels.dtype not in LABEL_DTYPES:
        raise _legacy_error(
            path,
            f"it holds {images.dim()}-d {images.dtype} images and {labels.dim()}-d "
            f"{labels.dtype} labels, not N x 28 x 28 uint8 images and N int64 (or uint8) "
            "labels",
        )
    if problem := images_problem(tuple(images.shape)) or labels_problem(len(images), labels):
        raise _legacy_error(path, problem)


def describe_dataset(data_dir: Path) -> str | None:
    """A note on where the data comes from when it is not the real FashionMNIST IDX files, else None."""
    if reads_legacy_cache(data_dir):
        return f"torchvision's old cache {processed_dir(data_dir)}/*.pt, read instead of raw/"
    if is_synthetic(data_dir):
        return "synthetic, written by `fmnist-dist synthetic-data`"
    return None


def download_dataset(data_dir: Path) -> None:
    """Fetch the four IDX files with torchvision.

    Raises:
        UsageError: the download failed; the message keeps the URL and the reason torchvision got.
    """
    try:
        datasets.FashionMNIST(root=str(data_dir), train=True, download=True)
    except (OSError, RuntimeError) as error:
        raise UsageError(
            f"could not download FashionMNIST into {data_dir} ({download_failure(error)}); check the network or "
            f"proxy, or copy the four IDX files into {raw_dir(data_dir)} and pass --no-download; {OFFLINE_HINT}"
        ) from error


def download_failure(error: BaseException) -> str:
    """torchvision's download error on one line: the URL tried and what came back.

    torchvision raises a RuntimeError without a cause whose message lists the file, then each mirror and its
    error on their own lines ("Error downloading F:\\nTried MIRROR, got:\\n<urlopen error ...>").
    """
    text = str(error)
    tried = re.search(r"Error downloading (\S+?):\s*Tried (\S+?), got:\s*(.+)", text, re.DOTALL)
    if tried is None:
        return " ".join(text.split()) or type(error).__name__
    filename, mirror, reason = tried.groups()
    return f"{mirror}{filename}: {' '.join(reason.split())}"


def _missing_message(raw: Path, missing: list[str]) -> str:
    if len(missing) == len(RAW_FILES):
        return (
            f"FashionMNIST is not in {raw} and --no-download was given; drop --no-download to fetch it, "
            f"or point --data-dir at a copy; {OFFLINE_HINT}"
        )
    return (
        f"FashionMNIST in {raw} is incomplete ({', '.join(missing)} missing; torchvision reads all four files) "
        "and --no-download was given; drop --no-download to fetch all four, or copy the missing files there"
    )


def _legacy_error(path: Path, problem: str) -> UsageError:
    return UsageError(
        f"{path}: {problem}; torchvision reads this old cache instead of the IDX files in raw/: "
        f"delete {path.parent} to use them"
    )
