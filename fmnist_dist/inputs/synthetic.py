"""A synthetic dataset in FashionMNIST's own format, for tests and offline demos.

Each class is a fixed smooth "garment" pattern; every image is its class pattern at a random strength and
offset, blended with a faint pattern of another class and pixel noise. The classes are learnable (a trained
MLP scores far above chance) but not trivially (noise and blending keep them below 100%).

A dataset written here carries a marker, `raw/synthetic.json`, with the SHA-256 of each file, so that training
can say it runs on synthetic data (and stops saying so once real files replace these).

Every file is written atomically (a temporary file renamed into place), so `--force` replaces a symbolic link
in a file's place rather than writing through it, and every target is checked before the first is written.
"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import numpy as np

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.inputs.idx import (
    LEGACY_FILES,
    RAW_FILES,
    SPLIT_FILES,
    check_dataset_root,
    processed_dir,
    raw_dir,
    write_idx,
)
from fmnist_dist.recipe.model import IMAGE_SIZE, NUM_CLASSES
from fmnist_dist.storage.atomic_files import atomic_write

MAX_SHIFT = 2
BLOBS_PER_CLASS = 4
NOISE_STD = 60.0
DISTRACTOR_STRENGTH = 0.45
MARKER = "synthetic.json"


def class_patterns(rng: np.random.Generator) -> np.ndarray:
    """Ten smooth 28x28 patterns in [0, 1], each a sum of a few Gaussian blobs."""
    ys, xs = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)
    patterns = np.zeros((NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for pattern in patterns:
        for _ in range(BLOBS_PER_CLASS):
            cy, cx = rng.uniform(6, IMAGE_SIZE - 6, size=2)
            sy, sx = rng.uniform(2.0, 6.0, size=2)
            pattern += np.exp(-(((ys - cy) / sy) ** 2 + ((xs - cx) / sx) ** 2))
        pattern /= pattern.max()
    return patterns


def make_split(patterns: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw `size` images (uint8, N x 28 x 28) and their labels (uint8) from the class patterns."""
    labels = rng.integers(0, NUM_CLASSES, size=size)
    distractors = (labels + rng.integers(1, NUM_CLASSES, size=size)) % NUM_CLASSES
    strength = rng.uniform(0.5, 1.0, size=(size, 1, 1)).astype(np.float32)
    images = 255 * (strength * patterns[labels] + DISTRACTOR_STRENGTH * strength * patterns[distractors])
    images += rng.normal(0.0, NOISE_STD, size=images.shape).astype(np.float32)
    images = _shift_randomly(images, rng)
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.uint8)


def _shift_randomly(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Move each image by up to MAX_SHIFT pixels each way (one vectorised roll per distinct offset)."""
    offsets = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(len(images), 2))
    shifted = np.empty_like(images)
    for dy, dx in np.unique(offsets, axis=0):
        chosen = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
        shifted[chosen] = np.roll(images[chosen], shift=(dy, dx), axis=(1, 2))
    return shifted


def write_synthetic_dataset(out_dir: Path, train_size: int, test_size: int, seed: int = 0, force: bool = False) -> Path:
    """Write the four FashionMNIST IDX files and the synthetic marker under `out_dir/FashionMNIST/raw`.

    `torchvision.datasets.FashionMNIST(root=out_dir, download=False)` then reads them as it reads the real data.

    Args:
        force: replace a dataset that is already there (else refuse), and delete torchvision's old
            processed/*.pt cache, which torchvision would read instead of the new files.

    Returns:
        The directory written (`out_dir/FashionMNIST/raw`).

    Raises:
        UsageError: `out_dir` cannot hold a dataset (a file is in the way, or it cannot be created), already holds
            one and `force` is false, or a directory or special file is where a dataset file goes. Nothing has
            been written then.
    """
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    raw = _make_directory(raw_dir(out_dir), out_dir)
    rng = np.random.default_rng(seed)
    patterns = class_patterns(rng)
    for split, size in (("train", train_size), ("test", test_size)):
        images, labels = make_split(patterns, size, rng)
        images_name, labels_name = SPLIT_FILES[split]
        write_idx(raw / images_name, images)
        write_idx(raw / labels_name, labels)
    marker = json.dumps({"written_by": "fmnist-dist synthetic-data", "seed": seed, "sha256": _digests(raw)}, indent=2)
    atomic_write(raw / MARKER, lambda f: f.write(f"{marker}\n".encode()))
    # Last: should a write above fail, the old cache stays, and with it a dataset torchvision can still read.
    if removed := remove_legacy_cache(out_dir):
        print(
            f"removed torchvision's old cache {', '.join(map(str, removed))}: torchvision would read it instead "
            f"of the new files in {raw}"
        )
    return raw


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse, before anything is written, an `out_dir` the dataset cannot go in or (without `force`) replace."""
    check_dataset_root(out_dir, "--out")
    if not force and (existing := existing_dataset_files(out_dir)):
        raise UsageError(
            f"{out_dir} already holds a FashionMNIST dataset ({existing[0]}); pass --force to replace "
            "it with synthetic data, or choose another --out"
        )
    for name in (*RAW_FILES, MARKER):
        _check_replaceable(raw_dir(out_dir) / name)


def _check_replaceable(path: Path) -> None:
    """Refuse a directory or special file where a dataset file goes (a rename cannot replace a directory).

    Nothing there, a regular file, or a symbolic link (the rename replaces the link, not its target) is fine.
    """
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise UsageError(
            f"cannot look at {path} ({first_line(error)}); check its permissions, or choose another --out"
        ) from error
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise UsageError(
            f"{path} is {kind}; move it away so that the dataset file can be written there, or choose another --out"
        )


def _make_directory(directory: Path, out_dir: Path) -> Path:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(
            f"--out {out_dir}: cannot create {directory} ({first_line(error)}); pass a directory you "
            "can write to as --out"
        ) from error
    return directory


def remove_legacy_cache(out_dir: Path) -> list[Path]:
    """Delete torchvision's old processed/*.pt cache files under `out_dir` (a link is removed, not its target).

    Returns:
        The files removed.

    Raises:
        UsageError: one could not be removed.
    """
    stale = [path for path in (processed_dir(out_dir) / name for name in LEGACY_FILES.values()) if path.is_file()]
    for path in stale:
        try:
            path.unlink()
        except OSError as error:
            raise UsageError(
                f"could not remove {path} ({first_line(error)}), which torchvision would read instead "
                f"of the new files in {raw_dir(out_dir)}; delete {path.parent} yourself"
            ) from error
    return stale


def existing_dataset_files(out_dir: Path) -> list[Path]:
    """The dataset files torchvision could read under `out_dir` (raw IDX files, or its old processed/*.pt cache)."""
    candidates = [raw_dir(out_dir) / name for name in RAW_FILES]
    candidates += [processed_dir(out_dir) / name for name in LEGACY_FILES.values()]
    return [path for path in candidates if path.exists() or path.is_symlink()]


def is_synthetic(data_dir: Path) -> bool:
    """Whether the IDX files under `data_dir` are the ones `write_synthetic_dataset` wrote (marker and hashes)."""
    raw = raw_dir(data_dir)
    try:
        recorded = json.loads((raw / MARKER).read_text())["sha256"]
        return recorded == _digests(raw)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _digests(raw: Path) -> dict[str, str]:
    return {name: hashlib.sha256((raw / name).read_bytes()).hexdigest() for name in RAW_FILES}
