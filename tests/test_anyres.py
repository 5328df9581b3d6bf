"""AnyRes: grid selection, views and their order, the one feature-count function, and VisionEncoder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unified_mllm.config import AnyResConfig, ConfigError, VisionConfig, get_preset
from unified_mllm.vision.anyres import (
    anyres_views,
    encode_images,
    num_grid_features,
    num_image_features,
    select_grid,
    split_image_features,
)
from unified_mllm.vision.image import image_to_tensor
from unified_mllm.vision.siglip import VisionEncoder, build_siglip_tower, features_per_view

GRIDS = [[1, 2], [2, 1], [2, 2], [1, 3], [3, 1]]
QUADRANTS = {"tl": (220, 30, 30), "tr": (30, 160, 60), "bl": (30, 70, 230), "br": (245, 220, 0)}
PAD = (255, 255, 255)


def tiny_vision(anyres: bool = True, **changes: object) -> VisionConfig:
    vision = get_preset("tiny").vision  # 64 px, 8 px patches: 64 features per view
    vision = dataclasses.replace(vision, anyres=AnyResConfig(enabled=anyres, grids=GRIDS), **changes)
    return vision


def quadrant_image(side: int) -> Image.Image:
    array = np.zeros((side, side, 3), dtype=np.uint8)
    half = side // 2
    array[:half, :half], array[:half, half:] = QUADRANTS["tl"], QUADRANTS["tr"]
    array[half:, :half], array[half:, half:] = QUADRANTS["bl"], QUADRANTS["br"]
    return Image.fromarray(array)


def rgb_at(view: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    """The 0-255 colour of one pixel of a [-1, 1] view."""
    return tuple(round((float(v) + 1.0) * 127.5) for v in view[:, y, x])


# ------------------------------------------------------------------------------------------ selection


@pytest.mark.parametrize(
    "height, width, expected",
    [
        (300, 1000, (1, 3)),  # a wide 1000 x 300 image
        (1000, 300, (3, 1)),  # a tall one
        (1000, 1000, (2, 2)),  # a large square one
        (384, 768, (1, 2)),  # exactly two tiles
        (768, 384, (2, 1)),
    ],
)
def test_select_grid_on_aspect_ratios(height: int, width: int, expected: tuple[int, int]) -> None:
    assert select_grid((height, width), GRIDS, 384) == expected


def test_tiny_image_gets_the_least_wasteful_grid() -> None:
    # Every canvas would upscale a 40 x 30 image, so all keep its 1200 pixels; the smallest canvas wins,
    # and between the equally small [1, 2] and [2, 1] the earlier candidate.
    assert select_grid((30, 40), GRIDS, 384) == (1, 2)
    assert select_grid((30, 40), [[2, 2], [2, 1], [1, 2]], 384) == (2, 1)
    assert select_grid((30, 40), [[3, 1], [2, 2]], 384) == (3, 1)


def test_square_without_a_square_grid_and_errors() -> None:
    assert select_grid((1000, 1000), [[1, 3], [3, 1], [1, 2]], 384) == (1, 2)
    with pytest.raises(ValueError, match="positive"):
        select_grid((0, 10), GRIDS, 384)
    with pytest.raises(ConfigError, match=r"anyres\.grids"):
        select_grid((10, 10), [], 384)


# ---------------------------------------------------------------------------------------------- views


def test_views_base_first_then_tiles_row_major() -> None:
    vision = tiny_vision()
    pixels, grid = anyres_views(quadrant_image(128), vision)
    assert grid == (2, 2)
    assert pixels.shape == (5, 3, 64, 64)
    # A 128 px image fills the 2 x 2 canvas exactly: each tile is one quadrant, row-major.
    for view, name in zip(pixels[1:], ["tl", "tr", "bl", "br"]):
        assert torch.equal(view, image_to_tensor(Image.new("RGB", (64, 64), QUADRANTS[name])))
    # The base view is the whole image at 64 px: its quadrants keep their colours away from the seams.
    base = pixels[0]
    assert rgb_at(base, 10, 10) == QUADRANTS["tl"] and rgb_at(base, 10, 53) == QUADRANTS["tr"]
    assert rgb_at(base, 53, 10) == QUADRANTS["bl"] and rgb_at(base, 53, 53) == QUADRANTS["br"]


def test_wide_image_is_fitted_padded_and_split_into_columns() -> None:
    vision = tiny_vision()
    stripes = [(220, 30, 30), (30, 160, 60), (30, 70, 230)]
    array = np.zeros((90, 300, 3), dtype=np.uint8)  # 300 wide, 90 tall, three vertical stripes
    for i, colour in enumerate(stripes):
        array[:, 100 * i : 100 * (i + 1)] = colour
    pixels, grid = anyres_views(Image.fromarray(array), vision)
    assert grid == (1, 3) and pixels.shape == (4, 3, 64, 64)
    # Fitted into 192 x 64: 192 x 58 with 3 padded rows above and below, so each tile is one stripe.
    for tile, colour in zip(pixels[1:], stripes):
        assert rgb_at(tile, 32, 32) == colour
        assert rgb_at(tile, 0, 32) == PAD and rgb_at(tile, 63, 32) == PAD


def test_pad_colour_comes_from_config() -> None:
    vision = tiny_vision()
    vision = dataclasses.replace(vision, anyres=dataclasses.replace(vision.anyres, pad_color=[0, 0, 0]))
    pixels, _ = anyres_views(Image.new("RGB", (300, 90), (30, 70, 230)), vision)
    assert rgb_at(pixels[1], 0, 32) == (0, 0, 0)


def test_anyres_off_is_one_base_view() -> None:
    vision = tiny_vision(anyres=False)
    image = quadrant_image(100).convert("RGBA")
    pixels, grid = anyres_views(image, vision)
    assert grid is None and pixels.shape == (1, 3, 64, 64)
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0


# ---------------------------------------------------------------------------------------- feature count


def test_feature_count_without_anyres_is_one_view() -> None:
    so400m = get_preset("chameleon-7b").vision
    assert not so400m.anyres.enabled
    assert num_image_features(so400m, (480, 640)) == features_per_view(so400m) == 729
    assert num_image_features(tiny_vision(anyres=False), (300, 1000)) == 64
    assert num_image_features(tiny_vision(enabled=False), (300, 1000)) == 0
    assert num_grid_features(so400m, (2, 2)) == 5 * 729


def test_published_encoder_output_length_on_meta() -> None:
    model = get_preset("chameleon-7b")
    encoder = VisionEncoder(model.vision, model.lm.hidden_size, model.projector, device="meta")
    out = encoder(torch.empty(2, 3, 384, 384, device="meta"))
    assert out.shape == (2, 729, 4096)


@pytest.fixture(scope="module")
def anyres_encoder() -> VisionEncoder:
    torch.manual_seed(0)
    return VisionEncoder(tiny_vision(), 32, get_preset("tiny").projector).eval()


def test_feature_count_agrees_with_encoder_output(anyres_encoder: VisionEncoder) -> None:
    sizes_wh = [(64, 64), (300, 90), (90, 300), (200, 130), (20, 30), (256, 64)]
    images = [Image.new("RGB", size, (10 * i, 50, 90)) for i, size in enumerate(sizes_wh)]
    for anyres in (True, False):
        encoder = anyres_encoder
        encoder.vision = tiny_vision(anyres=anyres)
        with torch.no_grad():
            features = encode_images(encoder, images)
        expected = [num_image_features(encoder.vision, (h, w)) for w, h in sizes_wh]
        assert [f.shape for f in features] == [(n, 32) for n in expected]
        if anyres:
            assert expected == [192, 256, 256, 320, 192, 256]
    anyres_encoder.vision = tiny_vision()


def test_split_image_features_keeps_view_order() -> None:
    features = torch.arange(6 * 4 * 2).reshape(6, 4, 2)  # 6 views of 4 patches of width 2
    first, second = split_image_features(features, [5, 1])
    assert torch.equal(first, features[:5].reshape(20, 2)) and torch.equal(second, features[5])
    assert torch.equal(first[4:8], features[1])  # the first tile follows the base view's 4 patches
    with pytest.raises(ValueError, match="sums to 5"):
        split_image_features(features, [4, 1])


# ---------------------------------------------------------------------------------------- VisionEncoder


def test_feature_layer_selects_the_hidden_state() -> None:
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    last = VisionEncoder(tiny_vision(), 32, get_preset("tiny").projector).eval()
    with torch.no_grad():
        hidden = last.tower(pixel_values=pixels, output_hidden_states=True)
        assert len(hidden.hidden_states) == 3  # patch embeddings + 2 layers
        assert torch.allclose(last(pixels), last.projector(hidden.last_hidden_state))
        for layer in (-2, 0, 2, -3):
            other = VisionEncoder(tiny_vision(feature_layer=layer), 32, get_preset("tiny").projector).eval()
            other.load_state_dict(last.state_dict())
            assert torch.allclose(other(pixels), last.projector(hidden.hidden_states[layer]))
        # -1 is after the post-layernorm, unlike the raw output of the last layer (index 2).
        assert not torch.allclose(hidden.last_hidden_state, hidden.hidden_states[2])
    for bad in (3, -4):
        with pytest.raises(ConfigError, match=r"model\.vision\.feature_layer"):
            VisionEncoder(tiny_vision(feature_layer=bad), 32, get_preset("tiny").projector)


def test_encoder_rejects_wrong_pixel_shapes(anyres_encoder: VisionEncoder) -> None:
    with pytest.raises(ValueError, match="pixel_values"):
        anyres_encoder(torch.zeros(1, 3, 32, 32))


def test_encoder_loads_a_pretrained_tower(tmp_path: Path) -> None:
    vision = tiny_vision()
    saved = build_siglip_tower(vision)
    saved.save_pretrained(tmp_path)
    encoder = VisionEncoder(vision, 32, get_preset("tiny").projector)
    encoder.load_pretrained_tower(tmp_path)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(encoder.tower.state_dict()[name], tensor)
