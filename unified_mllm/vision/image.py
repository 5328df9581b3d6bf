"""Image loading and preprocessing shared by the VQ tokenizer, SigLIP and the data pipeline.

Chameleon's recipe, which the VQ-GAN expects: composite transparent images on white (not black — transparent
logos and icons would otherwise turn into black blobs), convert to RGB, resize the short side to the target
and centre-crop the long side, then scale pixel values from [0, 255] to [-1, 1].
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

ImageSource = str | Path | bytes | Image.Image


class ImageLoadError(ValueError):
    """An image that cannot be read or converted; the message names the source."""


def _describe(source: ImageSource) -> str:
    if isinstance(source, bytes):
        return f"<{len(source)} bytes>"
    if isinstance(source, Image.Image):
        return f"<PIL {source.mode} {source.size[0]}x{source.size[1]}>"
    return str(source)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``image`` as RGB; any transparency (RGBA, LA, palette with alpha) is composited on ``background``."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if image.mode in ("I;16", "I", "F"):
        # 16-bit / float greyscale: PIL's direct convert clips to 255; rescale to the 8-bit range first.
        array = np.asarray(image, dtype=np.float64)
        peak = array.max() if array.size and array.max() > 0 else 1.0
        return Image.fromarray((array / peak * 255.0).round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageSource) -> Image.Image:
    """Read a path, encoded bytes or a PIL image into a fully decoded RGB image.

    Raises :class:`ImageLoadError` naming the source when the file is missing, empty, truncated, not an image,
    or larger than PIL's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, twice of which is refused).
    """
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, str | Path) and not Path(source).is_file():
        raise ImageLoadError(f"image not found: {source}")
    # Some libraries (lmms-eval, via its imports) set PIL's process-wide LOAD_TRUNCATED_IMAGES, which would
    # turn a cut-short file into a silently grey image: refuse it here whatever they set.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")  # noqa: SIM115
        with handle, Image.open(handle) as image:
            image.load()  # decode now, so a truncated file fails here and not deep inside a batch
            return to_rgb(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"unreadable image {_describe(source)}: {exc}") from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def resize_center_crop(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Resize so the image covers ``size`` (``(width, height)`` or a square side), then crop the centre."""
    width, height = (size, size) if isinstance(size, int) else size
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    scale = max(width / image.width, height / image.height)
    resized_w, resized_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    if (resized_w, resized_h) != image.size:
        image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (resized_w - width) // 2, (resized_h - height) // 2
    return image.crop((left, top, left + width, top + height))


def halving_center_crop(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """UniToken's / Lumina-mGPT's VQ preprocessing (``model.vq.preprocess: halving``): while both sides are at
    least twice the target, halve them (integer division) with a BOX filter; then one bicubic resize so the image
    covers ``size`` (``(width, height)`` or a square side; sides rounded), then the centre crop. The published
    item processor crops at a random offset (Python's ``random``, seeded with 100 at import, so its inference
    crops too depend on the call order); here the crop is always the centre."""
    width, height = (size, size) if isinstance(size, int) else size
    if width < 1 or height < 1:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    while image.width >= 2 * width and image.height >= 2 * height:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = max(width / image.width, height / image.height)
    resized = (round(image.width * scale), round(image.height * scale))
    image = image.resize(resized, Image.Resampling.BICUBIC)
    left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
    return image.crop((left, top, left + width, top + height))


VQ_PREPROCESS = {"center_crop": resize_center_crop, "halving": halving_center_crop}


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image → float tensor ``(3, H, W)`` in [-1, 1]."""
    array = np.asarray(to_rgb(image), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_image(pixels: torch.Tensor) -> Image.Image:
    """Float tensor ``(3, H, W)`` in [-1, 1] → RGB image (values outside the range are clipped)."""
    if pixels.ndim != 3 or pixels.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(pixels.shape)}")
    array = ((pixels.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy())


def preprocess(images: list[ImageSource], size: int, method: str = "center_crop") -> torch.Tensor:
    """Load, convert, resize + centre-crop (``method``: a :data:`VQ_PREPROCESS` name, ``model.vq.preprocess``)
    and scale a batch: returns ``(B, 3, size, size)`` in [-1, 1]."""
    if not images:
        raise ValueError("preprocess needs at least one image")
    if method not in VQ_PREPROCESS:
        raise ValueError(f"unknown VQ preprocessing {method!r}; known: {sorted(VQ_PREPROCESS)}")
    crop = VQ_PREPROCESS[method]
    return torch.stack([image_to_tensor(crop(load_image(i), size)) for i in images])
