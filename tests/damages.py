"""Damage done to a dataset or a saved state, shared by the in-process checks (tests/test_damaged_inputs.py) and
the end-to-end refusals (tests/test_bad_input.py), so that both test the very same damage."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fmnist_dist.inputs.idx import SPLIT_FILES, write_idx
from fmnist_dist.storage.run_dir import PROGRESS_FILE

IMAGES, LABELS = SPLIT_FILES["train"]

# ------------------------------------------------------------------------------ dataset files (FashionMNIST/raw)


def cut_images_short(raw: Path) -> str:
    path = raw / IMAGES
    path.write_bytes(path.read_bytes()[:-1000])
    return IMAGES


def wrong_magic(raw: Path) -> str:
    path = raw / IMAGES
    path.write_bytes(b"\x00\x00\x0d\x03" + path.read_bytes()[4:])  # 0x0d: float32, not FashionMNIST's uint8
    return IMAGES


def header_claims_more_images(raw: Path) -> str:
    path = raw / IMAGES
    data = bytearray(path.read_bytes())
    data[4:8] = (2000).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return IMAGES


def empty_labels(raw: Path) -> str:
    (raw / LABELS).write_bytes(b"")
    return LABELS


def label_out_of_range(raw: Path) -> str:
    labels = np.fromfile(raw / LABELS, dtype=np.uint8, offset=8)
    labels[17] = 10
    write_idx(raw / LABELS, labels)
    return LABELS


def fewer_labels_than_images(raw: Path) -> str:
    labels = np.fromfile(raw / LABELS, dtype=np.uint8, offset=8)
    write_idx(raw / LABELS, labels[:-1])
    return LABELS


# (damage, what the refusal says about it): each damage returns the name of the file it damaged.
DATASET_DAMAGES: list[tuple[Callable[[Path], str], str]] = [
    (cut_images_short, "truncated"),
    (wrong_magic, "magic number"),
    (header_claims_more_images, "header"),
    (empty_labels, "empty file"),
    (label_out_of_range, "label 10 is outside 0-9"),
    (fewer_labels_than_images, "1002 labels for 1003 images"),
]

# ------------------------------------------------------------------------------------------- a saved state


def truncate_weights(state: Path) -> None:
    weights = state / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def edit_progress(position: dict | None = None, **fields: object) -> Callable[[Path], None]:
    """Damage that reads as JSON: a progress.json with impossible values (a hand edit, say)."""

    def damage(state: Path) -> None:
        progress = json.loads((state / PROGRESS_FILE).read_text())
        progress["position"].update(position or {})
        progress.update(fields)
        (state / PROGRESS_FILE).write_text(json.dumps(progress))

    return damage


# Each makes `read_progress` refuse the state; by id.
PROGRESS_DAMAGES: dict[str, Callable[[Path], None]] = {
    "negative-position": edit_progress({"samples_done": -500}),
    "position-past-the-data": edit_progress({"samples_done": 10**6}),
    "negative-epoch": edit_progress({"epoch": -1}),
    "huge-step": edit_progress({"global_step": 10**30}),
    "loss-sum-null": edit_progress(epoch_loss_sum=None),
    "negative-samples": edit_progress(epoch_samples=-5),
    "world-size-0": edit_progress(world_size=0),
    "metrics-null": edit_progress(metrics=None),
    "metrics-record-foreign": edit_progress(metrics=[{"epoch": "x"}]),
    "metrics-fewer-than-epochs": edit_progress(metrics=[]),
    "metrics-more-than-epochs": edit_progress({"epoch": 0}),
    "samples-fraction": edit_progress(epoch_samples=480.5),
}
