"""Image files for `predict`: a transparent image is judged by what it shows, not by the colour its transparent
pixels happen to hold, and a 16-bit image is scaled into 8 bits, not clipped; each gives exactly the tensor (and so
the prediction) of the same garment saved as a plain 8-bit image. An image no scaling can read (NaN or infinite
pixels, more pixels than Pillow opens safely) is refused in one line.

The images are made from a test image P (light garment on a dark ground, as in FashionMNIST): its product-photo
form is the negative 255 - P, a dark garment on white.
"""

from __future__ import annotations

import os
import signal
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_usability import one_error_line
from test_inputs import message_as_nobody

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
    on_white = saved(Image.fromarray(255 - garment).convert("RGB"), tmp_path / "on-white.png")
    transparent = saved(dark_garment_on_transparent_black(garment, "RGBA"), tmp_path / "transparent.png")
    white_answer, transparent_answer = predicted(capsys, tmp_path, [on_white, transparent])
    assert transparent_answer == white_answer


def predicted(capsys: pytest.CaptureFixture, tmp_path: Path, images: list[Path], *flags: str) -> list[str]:
    """`predict --image IMAGES FLAGS`'s answer for each image (class and probability), from an untrained model."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pth"
    torch.save(NeuralNetwork().state_dict(), checkpoint)
    assert main(["predict", "--checkpoint", str(checkpoint), "--image", *map(str, images), *flags]) == 0
    return [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()]


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


# ------------------------------------------------------------------------------- what stands in place of an image


def dangling_link(path: Path) -> Path:
    path.symlink_to(path.parent / "gone.png")
    return path


def fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def directory(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (fifo, "not a regular file"),
        (lambda path: Path("/dev/zero"), "not a regular file"),
        (directory, "is a directory"),
        (dangling_link, "symbolic link"),
        (lambda path: path, "does not exist"),
    ],
    ids=["fifo", "device", "directory", "dangling-link", "missing"],
)
def test_an_image_that_is_no_regular_file_is_refused_in_one_line_without_reading_it(
    make: Callable[[Path], Path], named: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """As --checkpoint and the dataset files are: opening a FIFO would wait for a writer forever, /dev/zero never
    ends. A reader that hangs fails the test (SIGALRM) rather than the suite."""
    path = make(tmp_path / "shoe.png")
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail(f"reading {path} hung"))
    signal.alarm(20)
    try:
        one_error_line(capsys, ["predict", "--image", str(path)], f"image {path} ", named)
    finally:
        signal.alarm(0)


def test_an_image_the_user_may_not_read_is_refused_in_one_line(garment: np.ndarray) -> None:
    with tempfile.TemporaryDirectory() as shared:
        Path(shared).chmod(0o755)
        png = saved(Image.fromarray(garment), Path(shared) / "shoe.png")
        png.chmod(0)
        message = message_as_nobody(lambda: load_image(png))
    assert message.startswith(f"cannot read image {png} (") and "Permission denied" in message, message
    assert "check its permissions" in message and "\n" not in message


# --------------------------------------------------------------------------------------------- --background


def ambiguous_cut_out(garment: np.ndarray) -> Image.Image:
    """A mid-grey garment (160) cut out on a transparent ground (the garment's brightest pixels are opaque, the rest,
    border included, transparent): "auto" calls it light and lays it on black, although its photo stood on white."""
    grey = np.full_like(garment, 160)
    alpha = np.where(garment > 100, 255, 0).astype(np.uint8)
    return Image.fromarray(np.stack([grey, grey, grey, alpha], axis=-1))


def laid_on(cut_out: Image.Image, ground: str) -> Image.Image:
    """The cut-out as a plain RGB image on a `ground` ("white" or "black")."""
    flat = Image.new("RGB", cut_out.size, ground)
    flat.paste(cut_out, mask=cut_out.getchannel("A"))
    return flat


@pytest.mark.parametrize("ground", ["white", "black"])
def test_background_white_or_black_lays_a_transparent_image_on_that_ground(
    garment: np.ndarray, tmp_path: Path, ground: str
) -> None:
    """Laid on white, the garment is dark on a light ground and is inverted, as "auto" inverts the photo on white."""
    cut_out = ambiguous_cut_out(garment)
    transparent = saved(cut_out, tmp_path / "cut-out.png")
    on_ground = saved(laid_on(cut_out, ground), tmp_path / f"on-{ground}.png")
    assert np.array_equal(np.asarray(to_grayscale(cut_out, ground)), np.asarray(laid_on(cut_out, ground).convert("L")))
    assert torch.equal(load_image(transparent, ground), load_image(on_ground))


def test_background_white_or_black_decides_the_inversion_of_an_opaque_image(
    garment: np.ndarray, tmp_path: Path
) -> None:
    """Whatever its border: "white" inverts the image, "black" takes it as it is."""
    light_garment = saved(Image.fromarray(garment), tmp_path / "light.png")
    negative = saved(Image.fromarray(255 - garment), tmp_path / "negative.png")
    assert torch.equal(load_image(light_garment, "white"), load_image(negative, "black"))
    assert torch.equal(load_image(negative, "white"), load_image(light_garment, "black"))
    assert torch.equal(load_image(light_garment, "black"), load_image(light_garment))  # "auto": its border is dark


def test_background_auto_is_the_automatic_choice_as_before(garment: np.ndarray, tmp_path: Path) -> None:
    """The default: the ambiguous cut-out is laid on black (its garment counts as light), a dark one on white."""
    ambiguous = saved(ambiguous_cut_out(garment), tmp_path / "cut-out.png")
    assert torch.equal(load_image(ambiguous, "auto"), load_image(ambiguous, "black"))
    dark = saved(dark_garment_on_transparent_black(garment, "RGBA"), tmp_path / "dark.png")
    assert torch.equal(load_image(dark, "auto"), load_image(dark, "white"))


def test_predict_background_reaches_every_image_and_is_refused_with_index(
    garment: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cut_out = ambiguous_cut_out(garment)
    on_white = saved(laid_on(cut_out, "white"), tmp_path / "on-white.png")
    transparent = saved(cut_out, tmp_path / "cut-out.png")
    white_answer, transparent_answer = predicted(capsys, tmp_path, [on_white, transparent], "--background", "white")
    assert transparent_answer == white_answer
    one_error_line(capsys, ["predict", "--index", "0", "--background", "white"], "--background", "--image")
