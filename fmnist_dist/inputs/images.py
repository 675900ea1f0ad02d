"""Image files as FashionMNIST images: 28x28, 8-bit grayscale, a light garment on a dark ground."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import functional as TF

from fmnist_dist.errors import UsageError, first_line
from fmnist_dist.inputs.backgrounds import Background
from fmnist_dist.recipe.model import IMAGE_SIZE
from fmnist_dist.storage.atomic_files import file_problem

# FashionMNIST garments are light on a dark background; an image with a light border is inverted to match.
LIGHT_BACKGROUND = 0.5
# The full scale of each high-depth mode whose range its mode fixes (16-bit modes); "I" (32-bit integer) and
# "F" (float) images are scaled from the smallest of HIGH_DEPTH_SCALES that holds their values.
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
HIGH_DEPTH_MODES = (*SIXTEEN_BIT_MODES, "I", "F")
HIGH_DEPTH_SCALES = (1.0, 255.0, 65535.0, 2.0**31 - 1)


def load_image(path: Path, background: Background = "auto") -> torch.Tensor:
    """An image file as a 1x28x28 tensor in [0, 1], light garment on dark ground as in FashionMNIST.

    The image is turned upright (EXIF), made 8-bit grayscale (transparent parts filled with the background, high
    bit depths scaled rather than clipped), inverted if its background is light, padded to a square with the dark
    ground (so garments keep their proportions) and scaled to 28x28.

    Args:
        background: "auto": transparent parts take the ground that contrasts with the garment, and the image is
            inverted when its border is light; "white" or "black": the garment stands on that ground (transparent
            parts are filled with it), and the image is inverted exactly when it is white.

    Raises:
        UsageError: the file is missing, not a regular file (a directory, FIFO, device, dangling link), unreadable,
            not an image Pillow can read, in a mode it cannot make grayscale, larger than Pillow opens safely, or
            holds non-finite (float) pixel values.
    """
    with _open_image_file(path) as file:
        gray = _read_grayscale(file, path, background)
    if background == "white" or (background == "auto" and _border_mean(gray) > LIGHT_BACKGROUND):
        gray = ImageOps.invert(gray)
    # Area averaging when shrinking (no aliasing from photos' fine detail), bilinear when enlarging.
    shrinking = max(gray.size) > IMAGE_SIZE
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    square = ImageOps.pad(gray, (IMAGE_SIZE, IMAGE_SIZE), method=resample, color=0)
    return TF.to_tensor(square)


def _open_image_file(path: Path) -> BinaryIO:
    """`path` opened for reading, once it is known to be a regular file: opening a FIFO would wait for a writer
    forever, and a device would be read without end."""
    problem = file_problem(path)
    if problem == "does not exist" and path.is_symlink():
        problem = f"is a symbolic link to {os.readlink(path)}, which does not exist"
    if problem is not None:
        raise UsageError(f"cannot read image {path} (it {problem}); pass a PNG or JPEG file")
    try:
        return path.open("rb")
    except OSError as error:
        raise UsageError(f"cannot read image {path} ({first_line(error)}); check its permissions") from error


def _read_grayscale(file: BinaryIO, path: Path, background: Background) -> Image.Image:
    """The image in `file` upright and in 8-bit grayscale (`to_grayscale`)."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are refused alike.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                _check_finite(image, path)
                return to_grayscale(ImageOps.exif_transpose(image), background)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UsageError(
            f"image {path} is too large to open safely ({first_line(error)}); shrink it to at most "
            f"{Image.MAX_IMAGE_PIXELS} pixels (it is scaled to {IMAGE_SIZE}x{IMAGE_SIZE} anyway)"
        ) from error
    # ValueError: a mode Pillow cannot convert to grayscale.
    except (OSError, ValueError, UnidentifiedImageError) as error:
        raise UsageError(f"cannot read image {path} ({first_line(error)}); pass a PNG or JPEG file") from error


def to_grayscale(image: Image.Image, background: Background = "auto") -> Image.Image:
    """Any Pillow image as mode "L" (8-bit grayscale).

    Transparent images (RGBA, LA, PA, and P, L or 16-bit with a transparent colour) are composited onto the
    `background`; with "auto", onto white when their garment is dark and onto black when it is light, so that the
    light/dark test sees the ground the garment stands out from. Whatever colour the transparent pixels hold
    underneath does not matter. 16-bit and other high-depth images are scaled into 8 bits; everything else is
    Pillow's own `convert("L")`.
    """
    if image.mode in HIGH_DEPTH_MODES:
        gray = _scale_to_8_bits(image)
        # Pillow's convert("RGBA") would clip the values to 8 bits; the transparent colour is a value of the image.
        transparent = image.info.get("transparency") if image.has_transparency_data else None
        if transparent is None:
            return gray
        return _flatten_transparency(gray, _opaque_where_not(image, transparent), background)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return _flatten_transparency(rgba.convert("L"), rgba.getchannel("A"), background)
    return image.convert("L")


def _check_finite(image: Image.Image, path: Path) -> None:
    """Refuse a float image with NaN or infinite pixels, which no scaling can turn into brightness."""
    if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
        raise UsageError(
            f"image {path} holds non-finite pixel values (NaN or infinity); pass an image of finite "
            "values (a PNG or JPEG file)"
        )


def _opaque_where_not(image: Image.Image, transparent: float) -> Image.Image:
    """An alpha channel: 0 where `image` holds its transparent colour, 255 elsewhere."""
    return Image.fromarray(np.where(np.asarray(image) == transparent, 0, 255).astype(np.uint8))


def _flatten_transparency(gray: Image.Image, alpha: Image.Image, background: Background) -> Image.Image:
    ground = Image.new("L", gray.size, 255 if _ground_is_white(gray, alpha, background) else 0)
    return Image.composite(gray, ground, alpha)


def _ground_is_white(gray: Image.Image, alpha: Image.Image, background: Background) -> bool:
    """Whether transparent parts become white: as `background` says, or ("auto") when the garment is dark."""
    if background != "auto":
        return background == "white"
    weights = np.asarray(alpha, dtype=np.float64)
    garment = np.average(np.asarray(gray, dtype=np.float64), weights=weights) if weights.any() else 255.0
    return garment < 255 * LIGHT_BACKGROUND


def _scale_to_8_bits(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode in SIXTEEN_BIT_MODES:
        full_scale = 65535.0
    else:
        peak = values.max(initial=0.0)
        full_scale = next((scale for scale in HIGH_DEPTH_SCALES if peak <= scale), HIGH_DEPTH_SCALES[-1])
    scaled = np.clip(values / full_scale * 255.0, 0, 255)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))  # a 2-d uint8 array makes a mode "L" image


def _border_mean(gray: Image.Image) -> float:
    """The mean brightness in [0, 1] of the outermost rows and columns."""
    pixels = TF.to_tensor(gray)[0]
    border = torch.cat([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return border.mean().item()
