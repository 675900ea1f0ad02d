"""The grounds a garment in an image file can stand on, for `predict --background` (no heavy imports: the CLI
offers them before it loads torchvision and Pillow)."""

from __future__ import annotations

from typing import Literal, get_args

# "auto" judges the ground from the image (`inputs.images.load_image`); "white" and "black" say it, for the images
# that cannot tell (a cut-out whose garment could be read as light or as dark).
Background = Literal["auto", "white", "black"]
BACKGROUNDS: tuple[Background, ...] = get_args(Background)
