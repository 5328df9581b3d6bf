"""Metrics on tensors that every layer may use: image fidelity (PSNR, SSIM), image-text retrieval recall and
zero-shot classification by embedding similarity.

Conventions for PSNR and SSIM (chosen to match the tools published numbers come from):

* **Value ranges.** Float images are the project's ``[-1, 1]`` tensors, so ``data_range`` defaults to 2.0 for
  floats and 255 for ``uint8``. Pass ``data_range=1.0`` for ``[0, 1]`` floats.
* **PSNR** is per image (MSE over channels and pixels), ``10 * log10(data_range**2 / mse)``; identical images
  give ``inf`` (no cap), so average finite values or report the count of exact reconstructions separately.
* **SSIM** is Wang et al. (2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, population
  (biased) local variances, evaluated on the 'valid' region only (the window never crosses the border), per
  channel and then averaged over channels and pixels. This equals scikit-image's
  ``structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=..., channel_axis=...)``. Computed in float64 (float32 on devices without float64).

**Retrieval recall@k** ranks, for every query, all candidates by similarity; a query counts as found at ``k``
when one of its right candidates is among the first ``k``. A wrong candidate that ties the best right one is
ranked before it, so the figure does not depend on the candidates' order and a collapsed model (every
similarity equal) finds nothing unless ``k`` exceeds the wrong candidates.

They live here, below every package folder, because trainers (``train``) and evaluation (``eval``) both use
them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# --------------------------------------------------------------------------------------------------- PSNR / SSIM


def _default_range(x: Tensor, data_range: float | None) -> float:
    if data_range is not None:
        if data_range <= 0:
            raise ValueError(f"data_range must be positive, got {data_range}")
        return float(data_range)
    return 255.0 if x.dtype == torch.uint8 else 2.0


def _compute_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps SSIM's variance differences (E[x^2] - E[x]^2) exact enough; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _as_batch(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Check shapes; ``[C, H, W]`` becomes a batch of one."""
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim == 3:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.ndim != 4:
        raise ValueError(f"expected images [B, C, H, W] or [C, H, W], got shape {tuple(a.shape)}")
    return a, b


def psnr(a: Tensor, b: Tensor, data_range: float | None = None) -> Tensor:
    """Peak signal-to-noise ratio in dB per image: ``[B, C, H, W]`` x2 -> ``[B]`` (float64; ``inf`` if equal)."""
    a, b = _as_batch(a, b)
    peak = _default_range(a, data_range)
    dtype = _compute_dtype(a.device)
    diff = a.to(dtype) - b.to(device=a.device, dtype=dtype)
    mse = diff.square().flatten(1).mean(dim=1)
    # Division by zero gives +inf on purpose: identical images have unbounded PSNR (documented above).
    return 10.0 * torch.log10(peak**2 / mse)


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """Normalised 1-D Gaussian taps ``[size]`` (float64), centred; the 2-D window is its outer product."""
    if size % 2 != 1:
        raise ValueError(f"window size must be odd, got {size}")
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    return taps / taps.sum()


def ssim(a: Tensor, b: Tensor, data_range: float | None = None) -> Tensor:
    """Structural similarity per image: ``[B, C, H, W]`` x2 -> ``[B]`` (the module docstring's convention)."""
    a, b = _as_batch(a, b)
    peak = _default_range(a, data_range)
    batch, channels, height, width = a.shape
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {height}x{width}")
    dtype = _compute_dtype(a.device)
    taps = gaussian_window_1d().to(device=a.device, dtype=dtype)
    # Channels are folded into the batch: each is filtered on its own, as skimage does per channel.
    x = a.to(dtype).reshape(batch * channels, 1, height, width)
    y = b.to(device=a.device, dtype=dtype).reshape(batch * channels, 1, height, width)
    # One separable Gaussian filter ('valid' region only) for the five local moments.
    moments = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), taps.view(1, 1, SSIM_WINDOW, 1))
    moments = F.conv2d(moments, taps.view(1, 1, 1, SSIM_WINDOW))
    mu_x, mu_y, xx, yy, xy = moments.chunk(5)
    var_x = xx - mu_x * mu_x
    var_y = yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1 = (SSIM_K1 * peak) ** 2
    c2 = (SSIM_K2 * peak) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    ssim_map = num / den
    # Mean over pixels then channels equals the channel-averaged SSIM, as every channel has the same area.
    return ssim_map.reshape(batch, -1).mean(dim=1)


# ------------------------------------------------------------------------------------------------ retrieval


def retrieval_ranks(similarity: Tensor, matches: Tensor) -> Tensor:
    """Rank of each query's best right candidate: ``similarity (Q, C)`` and ``matches (Q, C)`` (bool, True
    where candidate c is a right answer to query q) -> ``(Q,)`` int64, 0 when a right one comes first.

    The rank is the number of wrong candidates scoring at least as high as the query's best right one (ties
    count against the query: see the module docstring). Every query needs at least one right candidate.
    """
    if similarity.ndim != 2 or similarity.shape != matches.shape:
        raise ValueError(
            f"need similarity and matches of one shape (Q, C), got {tuple(similarity.shape)} and "
            f"{tuple(matches.shape)}"
        )
    matches = matches.to(device=similarity.device, dtype=torch.bool)
    if not bool(matches.any(dim=1).all()):
        raise ValueError("every query needs at least one right candidate")
    best = similarity.masked_fill(~matches, float("-inf")).amax(dim=1, keepdim=True)
    return ((similarity >= best) & ~matches).sum(dim=1)


def retrieval_recall(
    similarity: Tensor, matches: Tensor | None = None, ks: Sequence[int] = (1, 5)
) -> dict[str, dict[str, float]]:
    """Image-text retrieval recall@k in both directions from ``similarity (I, T)`` (image i against text t).

    ``matches (I, T)`` marks the right (image, text) pairs; by default pair i is image i with text i (a square
    matrix). Returns ``{"image_to_text": {"recall@k": ...}, "text_to_image": {...}}``: the fraction of images
    whose right text is among their ``k`` most similar texts (rows), and of texts whose right image is among
    their ``k`` most similar images (columns).
    """
    if matches is None:
        if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1]:
            raise ValueError(f"without matches the similarity must be square, got {tuple(similarity.shape)}")
        matches = torch.eye(similarity.shape[0], dtype=torch.bool, device=similarity.device)
    if min(similarity.shape) == 0 or min(ks, default=1) < 1:
        raise ValueError(
            f"need at least one image and one text and every k >= 1, got {tuple(similarity.shape)}, {ks}"
        )
    directions = {
        "image_to_text": retrieval_ranks(similarity, matches),
        "text_to_image": retrieval_ranks(similarity.t(), matches.t()),
    }
    return {
        name: {f"recall@{k}": float((ranks < k).double().mean()) for k in ks}
        for name, ranks in directions.items()
    }


# ---------------------------------------------------------------------------------- zero-shot classification


class ImageRecord(Protocol):
    """An image with its metadata record, as a shard's :class:`~unified_mllm.data.shards.Sample` has them."""

    image: Image.Image
    meta: dict[str, Any]


@torch.no_grad()
def zero_shot_classify(
    embed_images_fn: Callable[[Sequence[Image.Image]], torch.Tensor],
    embed_prompts_fn: Callable[[Sequence[str]], torch.Tensor],
    samples: Iterable[ImageRecord],
    *,
    prompt_template: str,
    colors: Sequence[str],
    shapes: Sequence[str],
    batch_size: int = 64,
) -> dict[str, Any]:
    """Zero-shot (colour, shape) classification of every single-object image among ``colors x shapes`` by
    the cosine similarity of l2-normalised image and prompt embeddings (any model: SigLIP, UniTok's codes,
    DualToken's semantic codes).

    Returns ``accuracy`` (both right), ``color_accuracy`` and ``shape_accuracy`` (of the same joint
    prediction), their chance levels, and ``num_images``.
    """
    classes = [(color, shape) for color in colors for shape in shapes]
    text = embed_prompts_fn([prompt_template.format(color=c, shape=s) for c, s in classes])
    images, truth = [], []
    for sample in samples:
        objects = sample.meta.get("objects") or []
        if len(objects) == 1 and (objects[0]["color"], objects[0]["shape"]) in classes:
            images.append(sample.image)
            truth.append((objects[0]["color"], objects[0]["shape"]))
    predictions: list[tuple[str, str]] = []
    for start in range(0, len(images), batch_size):
        scores = embed_images_fn(images[start : start + batch_size]) @ text.to(torch.float32).t()
        predictions += [classes[int(i)] for i in scores.argmax(dim=-1)]
    n = len(truth)

    def rate(hits: Iterable[bool]) -> float:
        return sum(hits) / n if n else float("nan")

    return {
        "num_images": n,
        "accuracy": rate(p == t for p, t in zip(predictions, truth)),
        "color_accuracy": rate(p[0] == t[0] for p, t in zip(predictions, truth)),
        "shape_accuracy": rate(p[1] == t[1] for p, t in zip(predictions, truth)),
        "chance": {"accuracy": 1 / len(classes), "color": 1 / len(colors), "shape": 1 / len(shapes)},
    }
