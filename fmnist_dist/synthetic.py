"""A synthetic dataset in FashionMNIST's own format, for tests and offline demos.

Each class is a fixed smooth "garment" pattern; every image is its class pattern at a random strength and
offset, blended with a faint pattern of another class and pixel noise. The classes are learnable (a trained
MLP scores far above chance) but not trivially (noise and blending keep them below 100%).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fmnist_dist.idx import SPLIT_FILES, write_idx
from fmnist_dist.model import IMAGE_SIZE, NUM_CLASSES

MAX_SHIFT = 2
BLOBS_PER_CLASS = 4
NOISE_STD = 60.0
DISTRACTOR_STRENGTH = 0.45


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


def write_synthetic_dataset(out_dir: Path, train_size: int, test_size: int, seed: int = 0) -> Path:
    """Write the four FashionMNIST IDX files under `out_dir/FashionMNIST/raw`; return that directory.

    `torchvision.datasets.FashionMNIST(root=out_dir, download=False)` then reads them as it reads the real data.
    """
    rng = np.random.default_rng(seed)
    patterns = class_patterns(rng)
    raw_dir = Path(out_dir) / "FashionMNIST" / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", train_size), ("test", test_size)):
        images, labels = make_split(patterns, size, rng)
        images_name, labels_name = SPLIT_FILES[split]
        write_idx(raw_dir / images_name, images)
        write_idx(raw_dir / labels_name, labels)
    return raw_dir
