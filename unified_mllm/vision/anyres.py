"""AnyRes for the continuous branch (LLaVA-NeXT, UniToken): a base view plus a grid of high-resolution tiles.

With ``model.vision.anyres.enabled`` an image is seen by SigLIP as several square ``S x S`` views
(``S = model.vision.image_size``):

1. the **base view**: the whole image resized (squashed, nothing cropped) to ``S x S``;
2. the **tiles**: the image scaled, aspect ratio kept, to fit a canvas of ``rows*S`` by ``cols*S`` pixels,
   centred on that canvas with ``anyres.pad_color`` around it, and cut into ``rows x cols`` tiles.

The grid ``[rows, cols]`` is chosen from ``anyres.grids`` by :func:`select_grid`, LLaVA-NeXT's rule.

**Feature order** (the order of the feature slots in the token layout): the base view first, then the tiles
row-major (top-left, top-right, …, bottom-right); within each view the patch grid row-major. No row-end or
newline embeddings are inserted. The number of feature slots of an image is computed in exactly one place,
:func:`num_image_features`; the token layout (``unified_mllm.layout``) takes that integer.

"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from unified_mllm.config import ConfigError, VisionConfig
from unified_mllm.vision.image import image_to_tensor, to_rgb
from unified_mllm.vision.siglip import VisionEncoder, features_per_view

Grid = tuple[int, int]  # (rows, cols) of S x S tiles


def _fit(image_hw: tuple[int, int], canvas_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image scaled, aspect kept, to the largest size that fits inside the canvas."""
    height, width = image_hw
    scale = min(canvas_hw[0] / height, canvas_hw[1] / width)
    # min() guards against rounding past the canvas edge; max(1, ·) against a zero-pixel side.
    return (
        min(canvas_hw[0], max(1, round(height * scale))),
        min(canvas_hw[1], max(1, round(width * scale))),
    )


def select_grid(image_size_hw: tuple[int, int], grids: Sequence[Sequence[int]], tile_size: int) -> Grid:
    """The ``(rows, cols)`` of ``grids`` that best fits an image of ``image_size_hw = (height, width)`` pixels.

    For each candidate canvas (``rows*tile_size`` by ``cols*tile_size``) the image is fitted inside it; the
    *used* resolution is the fitted area, capped at the original area (upscaling adds no information); the
    *waste* is the canvas area minus the used resolution. Highest used resolution wins; ties go to the least
    waste, then to the earlier candidate. E.g. with 384 px tiles a 1000 x 300 (width x height) image picks
    ``[1, 3]``, a 300 x 1000 one ``[3, 1]``, a large square one ``[2, 2]``.
    """
    height, width = image_size_hw
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width} (height x width)")
    if not grids:
        raise ConfigError("`model.vision.anyres.grids`: needs at least one [rows, cols] candidate")
    best: Grid | None = None
    best_key: tuple[int, int] | None = None
    for rows, cols in grids:
        canvas = (rows * tile_size, cols * tile_size)
        fit_h, fit_w = _fit((height, width), canvas)
        used = min(fit_h * fit_w, height * width)
        key = (used, -(canvas[0] * canvas[1] - used))
        if best_key is None or key > best_key:  # strict: an equal key keeps the earlier candidate
            best, best_key = (int(rows), int(cols)), key
    assert best is not None
    return best


def image_grid(vision: VisionConfig, image_size_hw: tuple[int, int]) -> Grid | None:
    """The tile grid AnyRes uses for an image of ``(height, width)`` pixels; ``None`` when AnyRes is off."""
    if not vision.anyres.enabled:
        return None
    return select_grid(image_size_hw, vision.anyres.grids, vision.image_size)


def num_views(grid: Grid | None) -> int:
    """Views SigLIP encodes: the base view, plus ``rows * cols`` tiles when there is a grid."""
    return 1 if grid is None else 1 + grid[0] * grid[1]


def num_grid_features(vision: VisionConfig, grid: Grid | None) -> int:
    """Feature slots of an image encoded with ``grid`` (``None``: base view only)."""
    return num_views(grid) * features_per_view(vision)


def num_image_features(vision: VisionConfig, image_size_hw: tuple[int, int]) -> int:
    """The number of continuous feature slots of an image of ``(height, width)`` pixels.

    This is the one function the token layout asks: 0 when the vision branch is off (stage 0),
    ``features_per_view`` without AnyRes, ``(1 + rows*cols) * features_per_view`` with it.
    """
    if not vision.enabled:
        return 0
    return num_grid_features(vision, image_grid(vision, image_size_hw))


def base_view(image: Image.Image, size: int) -> Image.Image:
    """The whole image squashed to ``size x size`` (SigLIP's own preprocessing: resize, no crop)."""
    image = to_rgb(image)
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)


def tile_views(
    image: Image.Image, grid: Grid, size: int, pad_color: Sequence[int] = (255, 255, 255)
) -> list[Image.Image]:
    """The image fitted (aspect kept, centred, padded) into ``grid`` and cut into ``size x size`` tiles.

    Tiles come back row-major: ``tiles[r * cols + c]`` covers canvas rows ``r*size`` to ``(r+1)*size`` and
    columns ``c*size`` to ``(c+1)*size``.
    """
    image = to_rgb(image)
    rows, cols = grid
    canvas_h, canvas_w = rows * size, cols * size
    fit_h, fit_w = _fit((image.height, image.width), (canvas_h, canvas_w))
    if (fit_w, fit_h) != image.size:
        image = image.resize((fit_w, fit_h), Image.Resampling.BICUBIC, reducing_gap=None)
    canvas = Image.new("RGB", (canvas_w, canvas_h), tuple(int(v) for v in pad_color))
    canvas.paste(image, ((canvas_w - fit_w) // 2, (canvas_h - fit_h) // 2))
    return [
        canvas.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
        for r in range(rows)
        for c in range(cols)
    ]


def anyres_views(image: Image.Image, vision: VisionConfig) -> tuple[torch.Tensor, Grid | None]:
    """The SigLIP views of one image in feature order, and the grid used (``None`` when AnyRes is off).

    Returns ``pixel_values (n_views, 3, S, S)`` in [-1, 1] (SigLIP's normalisation: mean 0.5, std 0.5):
    the base view first, then the tiles row-major. ``n_views == num_views(grid)``.
    """
    if len(vision.anyres.pad_color) != 3:
        raise ConfigError(f"`model.vision.anyres.pad_color`: needs 3 values, got {vision.anyres.pad_color}")
    image = to_rgb(image)
    size = vision.image_size
    grid = image_grid(vision, (image.height, image.width))
    views = [base_view(image, size)]
    if grid is not None:
        views += tile_views(image, grid, size, vision.anyres.pad_color)
    return torch.stack([image_to_tensor(v) for v in views]), grid


def split_image_features(features: torch.Tensor, views_per_image: Sequence[int]) -> list[torch.Tensor]:
    """Per-image feature sequences from the features of all views of a batch, in the documented order.

    ``features (N_views, P, D)`` holds the views of image 0, then image 1, …, each image's views in
    :func:`anyres_views` order; returns ``[(views_i * P, D) for each image]`` — base view patches first, then
    each tile's patches, every view's patch grid row-major.
    """
    if sum(views_per_image) != features.shape[0]:
        raise ValueError(
            f"views_per_image sums to {sum(views_per_image)} but there are {features.shape[0]} views"
        )
    return [chunk.reshape(-1, features.shape[-1]) for chunk in torch.split(features, list(views_per_image))]


def encode_images(encoder: VisionEncoder, images: Sequence[Image.Image]) -> list[torch.Tensor]:
    """Projected features of each image: ``[(num_image_features_i, lm_hidden)]``, in one tower forward."""
    if not images:
        return []
    views = [anyres_views(image, encoder.vision)[0] for image in images]
    counts = [pixels.shape[0] for pixels in views]
    device = next(encoder.parameters()).device
    features = encoder(torch.cat(views).to(device))
    return split_image_features(features, counts)
