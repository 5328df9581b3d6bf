"""Image loading and preprocessing: RGBA on white, clear errors, resize + crop, [-1, 1] round trip."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unified_mllm.vision.image import (
    ImageLoadError,
    image_to_tensor,
    load_image,
    preprocess,
    resize_center_crop,
    tensor_to_image,
    to_rgb,
)


def test_transparent_pixels_become_white_and_opaque_pixels_keep_colour() -> None:
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (10, 20, 30, 255))
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (10, 20, 30)


def test_half_transparent_pixel_is_blended_with_white() -> None:
    image = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    (value, _, _) = to_rgb(image).getpixel((0, 0))
    assert value == 127  # 255 * (1 - 128/255)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16", "LA"])
def test_other_modes_convert_to_rgb(mode: str) -> None:
    image = (
        Image.new("RGB", (4, 3), (200, 100, 50)).convert(mode)
        if mode != "I;16"
        else Image.new(mode, (4, 3), 600)
    )
    rgb = load_image(image)
    assert rgb.mode == "RGB" and rgb.size == (4, 3)


def test_load_from_path_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.new("RGB", (5, 7), (1, 2, 3)).save(path)
    assert load_image(path).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(path.read_bytes()).size == (5, 7)


def test_unreadable_images_name_the_source(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"image not found: .*missing\.png"):
        load_image(tmp_path / "missing.png")
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(ImageLoadError, match=r"unreadable image .*junk.png"):
        load_image(junk)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(ImageLoadError, match=r"truncated\.png"):
        load_image(truncated)


def test_a_decompression_bomb_is_refused_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(bomb)
    # PIL refuses images over twice MAX_IMAGE_PIXELS; lower the limit rather than write a gigapixel file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    with pytest.raises(
        ImageLoadError, match=r"unreadable image .*bomb\.png: Image size \(10000 pixels\) exceeds"
    ):
        load_image(bomb)


def test_resize_center_crop_keeps_the_centre() -> None:
    array = np.zeros((20, 40, 3), dtype=np.uint8)  # wide image: left half black, right half white
    array[:, 20:] = 255
    out = resize_center_crop(Image.fromarray(array), 10)
    assert out.size == (10, 10)
    row = np.asarray(out)[5, :, 0]
    assert row[0] < 30 and row[-1] > 225  # the crop straddles the black/white boundary at the centre
    assert resize_center_crop(Image.new("RGB", (8, 8)), (8, 8)).size == (8, 8)


def test_tensor_round_trip_is_exact() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8))
    pixels = image_to_tensor(image)
    assert pixels.shape == (3, 6, 5) and pixels.min() >= -1 and pixels.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_image(pixels)), np.asarray(image))
    assert image_to_tensor(Image.new("RGB", (1, 1), (0, 255, 0))).flatten().tolist() == [-1.0, 1.0, -1.0]


def test_preprocess_batches_and_rejects_bad_shapes() -> None:
    batch = preprocess([Image.new("RGBA", (30, 20)), Image.new("L", (7, 9))], 16)
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == torch.float32
    assert torch.all(batch[0] == 1.0)  # fully transparent → white
    with pytest.raises(ValueError, match=r"expected a \(3, H, W\) tensor"):
        tensor_to_image(torch.zeros(1, 4, 4))
