"""Image files for `predict`: a transparent image is judged by what it shows, not by the colour its transparent
pixels happen to hold, and a 16-bit image is scaled into 8 bits, not clipped; each gives exactly the tensor (and so
the prediction) of the same garment saved as a plain 8-bit image. An image no scaling can read (NaN or infinite
pixels, more pixels than Pillow opens safely) is refused in one line.

The images are made from a test image P (light garment on a dark ground, as in FashionMNIST): its product-photo
form is the negative 255 - P, a dark garment on white.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_usability import one_error_line

from fmnist_dist.cli import main
from fmnist_dist.inputs.fashion_mnist import load_split
from fmnist_dist.inputs.images import load_image, to_grayscale
from fmnist_dist.recipe.model import NeuralNetwork

INDEX = 7


@pytest.fixture(scope="module")
def garment(data_dir: Path) -> np.ndarray:
    """Test image INDEX as uint8 pixels, 56x56 (each pixel a 2x2 block), light garment on a dark ground."""
    pixels = (load_split(data_dir, train=False, download=False)[INDEX][0][0].numpy() * 255).round().astype(np.uint8)
    return np.kron(pixels, np.ones((2, 2), dtype=np.uint8))


def saved(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def dark_garment_on_transparent_black(garment: np.ndarray, mode: str) -> Image.Image:
    """A black garment whose opacity is the garment's brightness, every pixel stored as black: over white it is
    exactly 255 - garment; with its alpha dropped it is all black."""
    black, alpha = np.zeros_like(garment), garment
    if mode == "LA":
        return Image.fromarray(np.stack([black, alpha], axis=-1), mode="LA")
    return Image.fromarray(np.stack([black, black, black, alpha], axis=-1), mode="RGBA")


def light_garment_on_transparent_white(garment: np.ndarray) -> Image.Image:
    """A white garment whose opacity is the garment's brightness, every pixel stored as white: over black it is
    exactly the garment; over white, or with its alpha dropped, it is all white."""
    white = np.full_like(garment, 255)
    return Image.fromarray(np.stack([white, white, white, garment], axis=-1), mode="RGBA")


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_a_dark_garment_on_a_transparent_ground_reads_like_the_same_garment_on_white(
    garment: np.ndarray, tmp_path: Path, mode: str
) -> None:
    on_white = saved(Image.fromarray(255 - garment).convert("RGB"), tmp_path / "on-white.png")
    transparent = saved(dark_garment_on_transparent_black(garment, mode), tmp_path / "transparent.png")
    assert torch.equal(load_image(transparent), load_image(on_white))


def test_a_light_garment_on_a_transparent_ground_reads_like_the_same_garment_on_black(
    garment: np.ndarray, tmp_path: Path
) -> None:
    on_black = saved(Image.fromarray(garment), tmp_path / "on-black.png")
    transparent = saved(light_garment_on_transparent_white(garment), tmp_path / "transparent.png")
    assert torch.equal(load_image(transparent), load_image(on_black))


def test_a_palette_image_with_a_transparent_colour_is_flattened_by_what_it_shows(tmp_path: Path) -> None:
    """A dark square on a transparent ground whose palette colour is black reads like the square on white."""
    square = np.zeros((40, 40), dtype=np.uint8)
    square[10:30, 10:30] = 1
    palette = Image.fromarray(square, mode="P")
    palette.putpalette([0, 0, 0, 40, 40, 40])  # index 0: black, but transparent; index 1: the dark garment
    palette.info["transparency"] = 0
    on_white = np.where(square == 1, 40, 255).astype(np.uint8)
    assert torch.equal(
        load_image(saved(palette, tmp_path / "palette.png")),
        load_image(saved(Image.fromarray(on_white), tmp_path / "on-white.png")),
    )


def test_a_16_bit_png_is_scaled_not_clipped(garment: np.ndarray, tmp_path: Path) -> None:
    sixteen_bit = saved(Image.fromarray(garment.astype(np.uint16) * 257), tmp_path / "16-bit.png")  # 255 -> 65535
    with Image.open(sixteen_bit) as image:
        assert image.mode == "I;16"
    assert torch.equal(load_image(sixteen_bit), load_image(saved(Image.fromarray(garment), tmp_path / "8-bit.png")))


@pytest.mark.parametrize("full_scale", [65535, 255, 1.0], ids=["I-16-bit-values", "I-8-bit-values", "F-0-to-1"])
def test_32_bit_images_are_scaled_from_the_range_their_values_fill(garment: np.ndarray, full_scale: float) -> None:
    values = garment.astype(np.float64) / 255 * full_scale
    image = Image.fromarray(values.astype(np.float32) if full_scale == 1.0 else np.rint(values).astype(np.int32))
    assert image.mode == ("F" if full_scale == 1.0 else "I")
    assert np.array_equal(np.asarray(to_grayscale(image)), garment)


def test_predict_gives_a_transparent_image_the_answer_of_the_garment_on_white(
    garment: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pth"
    torch.save(NeuralNetwork().state_dict(), checkpoint)
    on_white = saved(Image.fromarray(255 - garment).convert("RGB"), tmp_path / "on-white.png")
    transparent = saved(dark_garment_on_transparent_black(garment, "RGBA"), tmp_path / "transparent.png")
    assert main(["predict", "--checkpoint", str(checkpoint), "--image", str(on_white), str(transparent)]) == 0
    white_line, transparent_line = capsys.readouterr().out.splitlines()
    assert transparent_line.split(": ", 1)[1] == white_line.split(": ", 1)[1]


def test_a_16_bit_png_with_a_transparent_colour_is_scaled_like_its_8_bit_twin(
    garment: np.ndarray, tmp_path: Path
) -> None:
    """The same pixels transparent (the brightest), the rest scaled from 16 bits, not clipped to 8."""
    sixteen_bit = tmp_path / "16-bit.png"
    Image.fromarray(garment.astype(np.uint16) * 257).save(sixteen_bit, transparency=65535)
    eight_bit = tmp_path / "8-bit.png"
    Image.fromarray(garment).save(eight_bit, transparency=255)
    with Image.open(sixteen_bit) as image:
        assert (image.mode, image.info["transparency"]) == ("I;16", 65535)
    assert torch.equal(load_image(sixteen_bit), load_image(eight_bit))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_float_image_with_non_finite_pixels_is_refused_in_one_line(
    bad: float, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pixels = np.full((40, 40), 0.5, dtype=np.float32)
    pixels[5, 5] = bad
    tiff = saved(Image.fromarray(pixels), tmp_path / "float.tiff")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in cast" is no answer
        one_error_line(capsys, ["predict", "--image", str(tiff)], str(tiff), "non-finite")


@pytest.mark.parametrize("side", [40, 50], ids=["over-the-warning-limit", "over-the-error-limit"])
def test_an_image_larger_than_pillow_opens_safely_is_refused_in_one_line(
    side: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; a lowered limit makes both small."""
    png = saved(Image.new("L", (side, side)), tmp_path / "large.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_error_line(capsys, ["predict", "--image", str(png)], str(png), "too large", "1000 pixels")
