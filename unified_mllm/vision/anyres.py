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

**UniToken's layout** (``anyres.layout: unitoken``, what the published UniToken-AnyRes checkpoints were trained
on; facts from its ``tools/mm_utils.py`` and ``modeling_xllmx_chameleon_anyres.py``):

* the grid is chosen by the same rule, but the fitted size is truncated (``int``) rather than rounded;
* the tile canvas: the image resized so that one side fills the canvas and the other is ``ceil``-ed (capped at the
  canvas), pasted centred on a ``pad_color`` canvas (UniToken: black);
* features: the base view's ``P`` features, then the tiles' patch grids merged into one 2-D grid of
  ``rows*n x cols*n`` features (``n = image_size // patch_size``), cut back to the image's aspect ratio
  (:func:`unpadded_region`), read row-major with the row-end token after every row. The row ends are ordinary
  ``<row-end>`` ids in the span (the LM reads that token's own embedding, as UniToken's model does), so the
  span's continuous part is a :class:`~unified_mllm.layout.FeatureBlock` (:func:`image_feature_block`) and the
  model gathers the kept features with :func:`feature_index`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from unified_mllm.config import ConfigError, VisionConfig
from unified_mllm.layout import FeatureBlock
from unified_mllm.vision.image import image_to_tensor, to_rgb
from unified_mllm.vision.siglip import VisionEncoder, features_per_view, num_patches_per_side

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


def select_grid(
    image_size_hw: tuple[int, int], grids: Sequence[Sequence[int]], tile_size: int, *, truncate: bool = False
) -> Grid:
    """The ``(rows, cols)`` of ``grids`` that best fits an image of ``image_size_hw = (height, width)`` pixels.

    For each candidate canvas (``rows*tile_size`` by ``cols*tile_size``) the image is fitted inside it; the
    *used* resolution is the fitted area, capped at the original area (upscaling adds no information); the
    *waste* is the canvas area minus the used resolution. Highest used resolution wins; ties go to the least
    waste, then to the earlier candidate. E.g. with 384 px tiles a 1000 x 300 (width x height) image picks
    ``[1, 3]``, a 300 x 1000 one ``[3, 1]``, a large square one ``[2, 2]``. ``truncate``: the fitted sides are
    truncated to whole pixels instead of rounded, as UniToken's ``select_best_resolution`` computes them.
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
        if truncate:
            scale = min(canvas[1] / width, canvas[0] / height)
            fit_h, fit_w = int(height * scale), int(width * scale)
        else:
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
    truncate = vision.anyres.layout == "unitoken"
    return select_grid(image_size_hw, vision.anyres.grids, vision.image_size, truncate=truncate)


def unpadded_region(grid: Grid, per_side: int, image_size_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of the merged ``rows*n x cols*n`` tile-feature grid that UniToken keeps for
    an image of ``(height, width)`` pixels (``n = per_side``): the side the image does not fill is cut by
    ``(side - int(image side * scale)) // 2`` at both ends, as its ``unpad_image`` does."""
    height, width = image_size_hw
    grid_h, grid_w = grid[0] * per_side, grid[1] * per_side
    if width / height > grid_w / grid_h:
        kept = int(height * (grid_w / width))
        pad = (grid_h - kept) // 2
        return pad, grid_h - pad, 0, grid_w
    kept = int(width * (grid_h / height))
    pad = (grid_w - kept) // 2
    return 0, grid_h, pad, grid_w - pad


def image_feature_block(vision: VisionConfig, image_size_hw: tuple[int, int]) -> FeatureBlock:
    """The continuous part of the span of an image of ``(height, width)`` pixels (empty with the branch off):
    flat slots in our layout; the base view's slots plus the unpadded merged grid with its row ends in
    UniToken's (module docstring)."""
    if not vision.enabled:
        return FeatureBlock(flat=0)
    grid = image_grid(vision, image_size_hw)
    if vision.anyres.layout != "unitoken" or grid is None:
        return FeatureBlock(flat=num_grid_features(vision, grid))
    top, bottom, left, right = unpadded_region(grid, num_patches_per_side(vision), image_size_hw)
    return FeatureBlock(flat=features_per_view(vision), rows=bottom - top, cols=right - left)


def feature_index(vision: VisionConfig, image_size_hw: tuple[int, int]) -> np.ndarray | None:
    """``[num_features, 2]`` (view, patch) of every feature slot of the image's span, in slot order, indexing the
    encoder's output ``(views, P, H)`` of :func:`anyres_views`; None when the slots take every feature in order
    (our layout, or no tiles)."""
    grid = image_grid(vision, image_size_hw)
    if not vision.enabled or vision.anyres.layout != "unitoken" or grid is None:
        return None
    per_side = num_patches_per_side(vision)
    top, bottom, left, right = unpadded_region(grid, per_side, image_size_hw)
    ys, xs = np.meshgrid(np.arange(top, bottom), np.arange(left, right), indexing="ij")
    ys, xs = ys.ravel(), xs.ravel()
    views = 1 + (ys // per_side) * grid[1] + xs // per_side  # tile (row-major) after the base view
    patches = (ys % per_side) * per_side + xs % per_side
    base = np.stack([np.zeros(features_per_view(vision), np.int64), np.arange(features_per_view(vision))], 1)
    return np.concatenate([base, np.stack([views, patches], 1).astype(np.int64)])


def num_views(grid: Grid | None) -> int:
    """Views SigLIP encodes: the base view, plus ``rows * cols`` tiles when there is a grid."""
    return 1 if grid is None else 1 + grid[0] * grid[1]


def num_grid_features(vision: VisionConfig, grid: Grid | None) -> int:
    """Feature slots of an image encoded with ``grid`` (``None``: base view only)."""
    return num_views(grid) * features_per_view(vision)


def num_image_features(vision: VisionConfig, image_size_hw: tuple[int, int]) -> int:
    """The number of positions the continuous part of an image's span takes (after ``<sep>``).

    0 when the vision branch is off (stage 0), ``features_per_view`` without AnyRes, ``(1 + rows*cols) *
    features_per_view`` with it; in UniToken's layout the base view's slots plus the kept merged-grid slots and
    their row ends (:func:`image_feature_block`, whose ``length`` this is).
    """
    return image_feature_block(vision, image_size_hw).length


def base_view(image: Image.Image, size: int) -> Image.Image:
    """The whole image squashed to ``size x size`` (SigLIP's own preprocessing: resize, no crop)."""
    image = to_rgb(image)
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)


def _fit_unitoken(image_hw: tuple[int, int], canvas_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the image on its canvas as UniToken's ``resize_and_pad_image`` computes it: the side
    with the smaller scale fills the canvas, the other is ``ceil``-ed and capped at the canvas."""
    height, width = image_hw
    scale_w, scale_h = canvas_hw[1] / width, canvas_hw[0] / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), canvas_hw[0]), canvas_hw[1]
    return canvas_hw[0], min(math.ceil(width * scale_h), canvas_hw[1])


def tile_views(
    image: Image.Image,
    grid: Grid,
    size: int,
    pad_color: Sequence[int] = (255, 255, 255),
    unitoken: bool = False,
) -> list[Image.Image]:
    """The image fitted (aspect kept, centred, padded) into ``grid`` and cut into ``size x size`` tiles
    (``unitoken``: fitted as UniToken's ``resize_and_pad_image`` does, see :func:`_fit_unitoken`).

    Tiles come back row-major: ``tiles[r * cols + c]`` covers canvas rows ``r*size`` to ``(r+1)*size`` and
    columns ``c*size`` to ``(c+1)*size``.
    """
    image = to_rgb(image)
    rows, cols = grid
    canvas_h, canvas_w = rows * size, cols * size
    fit = _fit_unitoken if unitoken else _fit
    fit_h, fit_w = fit((image.height, image.width), (canvas_h, canvas_w))
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
        views += tile_views(image, grid, size, vision.anyres.pad_color, vision.anyres.layout == "unitoken")
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
    """Projected features of each image in slot order: ``[(feature slots_i, lm_hidden)]``, in one tower forward
    (UniToken's layout: the kept features only; its row ends are ids of the span)."""
    if not images:
        return []
    views = [anyres_views(image, encoder.vision)[0] for image in images]
    counts = [pixels.shape[0] for pixels in views]
    device = next(encoder.parameters()).device
    features = encoder(torch.cat(views).to(device))
    per_image = split_image_features(features, counts)
    for i, image in enumerate(images):
        index = feature_index(encoder.vision, (image.height, image.width))
        if index is not None:  # UniToken's layout: the kept features of the merged grid, in slot order
            flat = torch.from_numpy(index[:, 0] * features.shape[1] + index[:, 1]).to(device)
            per_image[i] = per_image[i][flat]
    return per_image
