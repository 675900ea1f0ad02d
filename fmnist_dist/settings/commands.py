"""The flags of `evaluate`, `predict`, `synthetic-data` and `plot` that take a value, declared as `train`'s are
(`evaluate` and `predict` take train's `--data-dir` and `--no-download`).

The CLI builds these flags from the declarations and checks every value against them before a subcommand runs.
"""

from __future__ import annotations

from fmnist_dist.settings.declaration import PATH, WHOLE, Bounds, Setting
from fmnist_dist.settings.train_config import COUNT, SEED

# synthetic-data builds each split in memory (about 7 KB per image while it is drawn).
MAX_SYNTHETIC_IMAGES = 1_000_000
SYNTHETIC_IMAGES = Bounds(0, MAX_SYNTHETIC_IMAGES, low_open=True)

CHECKPOINT = Setting(
    PATH,
    "model weights saved by `fmnist-dist train` (or the PyTorch quickstart), or a saved state's model.safetensors",
)
EVAL_BATCH_SIZE = Setting(WHOLE, "test images per process per batch", bounds=COUNT)
DATASET_OUT = Setting(PATH, "dataset root to write (use it as --data-dir)")
TRAIN_SIZE = Setting(WHOLE, f"training images (1-{MAX_SYNTHETIC_IMAGES})", bounds=SYNTHETIC_IMAGES)
TEST_SIZE = Setting(WHOLE, f"test images (1-{MAX_SYNTHETIC_IMAGES})", bounds=SYNTHETIC_IMAGES)
SYNTHETIC_SEED = Setting(WHOLE, "the random patterns and images", bounds=SEED)
RUN = Setting(PATH, "a training run's --output-dir, or its metrics.jsonl (the plots go next to it)")
