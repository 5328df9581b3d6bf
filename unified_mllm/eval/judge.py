"""The programmatic judge: read any image of the shapes world back into objects, and score GenEval specs.

Nothing here is learned. :func:`read_scene` works in four steps:

1. **Rescale** the image to the world's ``image_size`` (so generated images of any resolution are read the
   same way) and estimate the background colour as the median of the border pixels.
2. **Un-mix** every pixel: an anti-aliased, blurred or compressed edge pixel is a blend of one palette colour
   with the background, so each pixel gets the world colour whose background→colour segment passes nearest
   and a coverage ``alpha`` along that segment (measured mostly on luma, which JPEG keeps sharp).
3. **Segment** pixels with ``alpha >= 0.5`` into 8-connected components (``scipy.ndimage.label``), split a
   component whose differently coloured parts sit in different grid cells (touching objects), and drop
   specks far smaller than the smallest object the world draws.
4. **Describe** each component: colour by an ``alpha``-weighted vote of its pixels; shape by the best soft IoU
   with each shape's template, placed by the component's area, centroid and aspect (moments that survive
   blur) and blurred as much as the component is (the same coverage function rendered the world); size
   from the soft area and the shape's fill ratio; cell from the fitted box's centre.

:func:`score` applies GenEval's rules to a spec from :mod:`unified_mllm.data.shapes`; :func:`self_check`
measures how often the judge reads rendered scenes exactly, clean and after mild degradations
(``python -m unified_mllm.eval.judge --self-check 1000``).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError
from scipy import ndimage

from unified_mllm.cli import one_line_errors
from unified_mllm.config import WorldConfig, add_config_arguments, config_from_args
from unified_mllm.data.shapes import (
    PALETTE,
    SHAPES,
    SIZES,
    Box,
    Scene,
    SpecError,  # noqa: F401 - re-exported: score raises it for an invalid spec
    WorldLike,
    check_world,
    make_scene,
    prompts_for_scene,
    relations,
    render,
    shape_coverage,
    validate_spec,
    world_rng,
)
from unified_mllm.progress import progress as progress_bar

DEGRADATIONS = ("blur", "noise", "jpeg", "mixed")
ALPHA_THRESHOLD = 0.5  # a pixel belongs to an object when it is at least half the object's colour
# A component smaller than this fraction of the smallest object the world draws is a speck (noise, halo).
MIN_AREA_FRACTION = 0.3
_EIGHT = np.ones((3, 3), bool)  # 8-connectivity: a thin apex stays attached to its triangle
WINDOW_MARGIN = 4  # pixels around a component's box: its halo plus room for a blurred template


@dataclass(frozen=True)
class DetectedObject:
    """An object read from an image.

    Pixel values are in world pixels (the image rescaled to ``image_size``): ``centroid`` is the coverage-
    weighted centre of mass, ``bbox`` the box in which the chosen shape best fits the object (for a
    triangle it lies higher than the centroid), ``area`` the soft pixel area, ``shape_score`` the soft IoU
    of the winning shape template (1 is a perfect fit; ground truth from :func:`scene_objects` has 1).
    """

    shape: str
    color: str
    size: str
    row: int
    col: int
    centroid: tuple[float, float]
    bbox: Box
    area: float
    shape_score: float = 1.0

    @property
    def key(self) -> tuple[str, str, str, int, int]:
        """What ground truth says about an object: (shape, color, size, row, col)."""
        return (self.shape, self.color, self.size, self.row, self.col)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class JudgeResult:
    correct: bool
    reason: str
    objects: list[DetectedObject]


# --------------------------------------------------------------------------------------------- reading


def to_rgb_array(image: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """A float32 (size, size, 3) RGB array in 0..255; transparency is composited on white."""
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
            array = array.transpose(1, 2, 0)  # channels first, as a decoder's tensor comes
        if array.dtype != np.uint8:  # floats in [0, 1] (a decoder's output) or already in [0, 255]
            values = np.asarray(array, dtype=np.float64)
            scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
            array = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    image = image.convert("RGB")
    if image.size != (size, size):
        # Box filtering averages whole source pixels: the right low-pass when shrinking a generated image.
        shrinking = image.width >= size and image.height >= size
        image = image.resize((size, size), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


# RGB → (luma, blue-difference, red-difference) with the chroma rows scaled down. JPEG keeps luma at full
# resolution and subsamples chroma, so coverage measured mostly on luma keeps a small light object's shape
# (yellow on white differs from the background mostly in chroma); the colour itself is named in plain RGB.
_COVERAGE_METRIC = np.array(
    [[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]], dtype=np.float32
) * np.array([[1.0], [0.3], [0.3]], dtype=np.float32)


def unmix(rgb: np.ndarray, background: np.ndarray, colors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, label) per pixel: the index of the nearest background→colour segment, and the coverage.

    The label is the segment nearest in RGB; the coverage is the position along that segment, measured
    with :data:`_COVERAGE_METRIC`.
    """
    offset = (rgb - background).reshape(-1, 1, 3)  # (pixels, 1, 3)
    direction = (colors - background)[None]  # (1, colours, 3)
    along = np.clip((offset * direction).sum(-1) / (direction**2).sum(-1), 0.0, 1.0)
    residual = np.linalg.norm(offset - along[..., None] * direction, axis=-1)
    label = residual.argmin(axis=1)
    chosen = direction[0, label] @ _COVERAGE_METRIC.T  # (pixels, 3)
    seen = offset[:, 0] @ _COVERAGE_METRIC.T
    alpha = np.clip((seen * chosen).sum(-1) / (chosen**2).sum(-1), 0.0, 1.0)
    return alpha.reshape(rgb.shape[:2]), label.reshape(rgb.shape[:2])


@cache
def unit_moments(shape: str) -> tuple[float, float, float, float]:
    """(mean u, mean v, var u, var v) of a shape filling the unit box [-1, 1]^2 (measured, not derived)."""
    grid = (np.arange(400) + 0.5) / 200 - 1
    u, v = np.broadcast_arrays(grid[None, :], grid[:, None])
    inside = SHAPES[shape].inside(u, v)
    mu, mv = float(u[inside].mean()), float(v[inside].mean())
    return mu, mv, float(((u[inside] - mu) ** 2).mean()), float(((v[inside] - mv) ** 2).mean())


@dataclass(frozen=True)
class _Blob:
    """Soft measurements of one component inside its window: what every shape hypothesis is fitted to."""

    soft: np.ndarray  # alpha on the component and its halo, 0 elsewhere
    area: float
    centroid: tuple[float, float]  # window pixel-edge coordinates
    variance: tuple[float, float]


def fit_box(blob: _Blob, shape: str) -> Box:
    """The box in which ``shape`` has the blob's area, centroid and aspect (moments survive blur)."""
    mu, mv, vu, vv = unit_moments(shape)
    side = math.sqrt(blob.area / SHAPES[shape].fill)
    aspect = math.sqrt(max(blob.variance[0], 1e-6) / max(blob.variance[1], 1e-6) / (vu / vv))
    aspect = min(max(aspect, 0.5), 2.0)
    width, height = side * math.sqrt(aspect), side / math.sqrt(aspect)
    cx, cy = blob.centroid[0] - mu * width / 2, blob.centroid[1] - mv * height / 2
    return (cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2)


def _moments(weights: np.ndarray) -> tuple[float, float]:
    """Weighted variance of x and of y over a window (pixel centres)."""
    total = max(float(weights.sum()), 1e-6)
    ys, xs = np.indices(weights.shape) + 0.5
    cx, cy = (weights * xs).sum() / total, (weights * ys).sum() / total
    return float((weights * (xs - cx) ** 2).sum() / total), float((weights * (ys - cy) ** 2).sum() / total)


def classify_shape(blob: _Blob, shapes: Sequence[str]) -> tuple[str, float, Box]:
    """Best shape by soft IoU between the blob and each shape drawn in the box fitted for it.

    A blurred blob (a decoder's soft edges, a Gaussian blur, JPEG's subsampled chroma) has more variance
    than the sharp template; the template is blurred by the difference, so that a blurred small square is
    compared with a blurred square and not mistaken for a circle.
    """
    best: tuple[str, float, Box] = (shapes[0], -1.0, (0.0, 0.0, 0.0, 0.0))
    for shape in shapes:
        box = fit_box(blob, shape)
        template = shape_coverage(shape, box, (0, 0), blob.soft.shape)
        sharp = _moments(template)
        excess = (blob.variance[0] - sharp[0] + blob.variance[1] - sharp[1]) / 2
        if excess > 0.05:
            template = ndimage.gaussian_filter(template, math.sqrt(excess), mode="constant")
        iou = float(np.minimum(blob.soft, template).sum() / max(np.maximum(blob.soft, template).sum(), 1e-6))
        if iou > best[1]:
            best = (shape, iou, box)
    return best


def classify_size(area: float, shape: str, cell: float, sizes: Sequence[str]) -> str:
    """The size whose expected extent is nearest (in ratio) to the extent implied by the soft area."""
    extent = math.sqrt(max(area, 1e-6) / SHAPES[shape].fill)
    return min(sizes, key=lambda s: abs(math.log(extent / (SIZES[s] * cell))))


def _describe_component(
    component: np.ndarray, others: np.ndarray, alpha: np.ndarray, label: np.ndarray, world: WorldConfig
) -> DetectedObject | None:
    """One connected component (a boolean mask over a window) as a DetectedObject, or None if a speck.

    Coordinates are the window's; :func:`read_scene` shifts them back to the image.
    """
    cell = world.image_size / world.grid_size
    # Soft support: the component plus a two-pixel halo, where its blended (and blurred) edge pixels live.
    support = ndimage.binary_dilation(component, structure=np.ones((5, 5), bool)) & ~others
    soft = np.where(support, np.clip(alpha, 0.0, 1.0), 0.0)
    area = float(soft.sum())
    smallest = min(SHAPES[s].fill for s in world.shapes) * (min(SIZES[s] for s in world.sizes) * cell) ** 2
    if area < MIN_AREA_FRACTION * smallest:
        return None
    ys, xs = np.indices(soft.shape) + 0.5
    cx, cy = float((soft * xs).sum() / area), float((soft * ys).sum() / area)
    variance = (float((soft * (xs - cx) ** 2).sum() / area), float((soft * (ys - cy) ** 2).sum() / area))
    shape, shape_iou, box = classify_shape(_Blob(soft, area, (cx, cy), variance), world.shapes)
    votes = np.bincount(label[component], weights=alpha[component], minlength=len(world.colors))
    return DetectedObject(
        shape=shape,
        color=world.colors[int(votes.argmax())],
        size=classify_size(area, shape, cell, world.sizes),
        row=0,
        col=0,
        centroid=(cx, cy),
        bbox=box,
        area=area,
        shape_score=shape_iou,
    )


def read_scene(image: Image.Image | np.ndarray, world: WorldLike) -> list[DetectedObject]:
    """The objects in ``image`` (any size, RGB/RGBA/uint8 array/float array), in reading order."""
    world = check_world(world)
    rgb = to_rgb_array(image, world.image_size)
    # Median colour of the one-pixel border: objects sit inside their cells, so the border is background.
    background = np.median(np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]]), axis=0)
    colors = np.asarray([PALETTE[c] for c in world.colors], dtype=np.float32)
    alpha, label = unmix(rgb, background, colors)
    components = split_touching(ndimage.label(alpha >= ALPHA_THRESHOLD, structure=_EIGHT)[0], label, world)
    objects = []
    for index, region in enumerate(ndimage.find_objects(components), start=1):
        if region is None:
            continue
        # Work in a window around the component (plus a margin for the halo) instead of the whole image.
        window = tuple(slice(max(s.start - WINDOW_MARGIN, 0), s.stop + WINDOW_MARGIN) for s in region)
        labels = components[window]
        component, others = labels == index, (labels != index) & (labels > 0)
        local = _describe_component(component, others, alpha[window], label[window], world)
        if local is not None:
            objects.append(_shift(local, window[1].start, window[0].start, world))
    return sorted(objects, key=lambda o: (o.row, o.col, o.centroid[0]))


def split_touching(components: np.ndarray, label: np.ndarray, world: WorldConfig) -> np.ndarray:
    """Relabel components so that touching objects of different colours in different cells come apart.

    A component's single-colour parts that are object-sized (at least half the smallest object the world
    draws) are grouped by the grid cell of their centre; with two or more cells the component is split and
    every pixel goes to the nearest group. A colour change inside one cell does not split: JPEG paints
    object-sized patches of a neighbouring palette colour (navy inside a small blue circle) there.
    """
    cell = world.image_size / world.grid_size
    smallest = min(SHAPES[s].fill for s in world.shapes) * (min(SIZES[s] for s in world.sizes) * cell) ** 2
    out = np.zeros_like(components)
    count = 0
    for index, region in enumerate(ndimage.find_objects(components), start=1):
        if region is None:
            continue
        mask = components[region] == index
        seeds = np.zeros(mask.shape, dtype=np.int32)
        cells: dict[tuple[int, int], int] = {}
        for k in np.unique(label[region][mask]):
            parts, n = ndimage.label(mask & (label[region] == k), structure=_EIGHT)
            for piece in (parts == i for i in range(1, n + 1)):
                if piece.sum() < 0.5 * smallest:
                    continue
                ys, xs = np.nonzero(piece)
                key = (
                    int((region[0].start + ys.mean() + 0.5) // cell),
                    int((region[1].start + xs.mean() + 0.5) // cell),
                )
                seeds[piece] = cells.setdefault(key, len(cells) + 1)
        if len(cells) < 2:
            out[region][mask] = count + 1
            count += 1
            continue
        _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        out[region][mask] = count + seeds[iy, ix][mask]
        count += len(cells)
    return out


def _shift(obj: DetectedObject, dx: int, dy: int, world: WorldConfig) -> DetectedObject:
    """Move an object found in a window back to image coordinates (and recompute its cell)."""
    x0, y0, x1, y1 = obj.bbox
    bbox = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
    cell = world.image_size / world.grid_size
    return dataclasses.replace(
        obj,
        bbox=bbox,
        centroid=(obj.centroid[0] + dx, obj.centroid[1] + dy),
        row=min(max(int(((bbox[1] + bbox[3]) / 2) // cell), 0), world.grid_size - 1),
        col=min(max(int(((bbox[0] + bbox[2]) / 2) // cell), 0), world.grid_size - 1),
    )


def scene_objects(scene: Scene) -> list[DetectedObject]:
    """Ground truth in the judge's terms: what a perfect reading of ``render(scene)`` returns."""
    out = []
    for obj in scene.objects:
        box = scene.box(obj)
        extent = box[2] - box[0]
        out.append(
            DetectedObject(
                shape=obj.shape,
                color=obj.color,
                size=obj.size,
                row=obj.row,
                col=obj.col,
                centroid=scene.center(obj),
                bbox=box,
                area=SHAPES[obj.shape].fill * extent * extent,
            )
        )
    return out


def matches_scene(objects: Sequence[DetectedObject], scene: Scene) -> bool:
    """Whether a reading equals the ground truth exactly (every object's shape, colour, size and cell)."""
    return sorted(o.key for o in objects) == sorted(o.key for o in scene_objects(scene))


# --------------------------------------------------------------------------------------------- scoring


def _matching(objects: Sequence[DetectedObject], item: dict[str, Any], with_color: bool = True) -> list:
    return [
        o
        for o in objects
        if o.shape == item["shape"]
        and (not with_color or "color" not in item or o.color == item["color"])
        and ("size" not in item or o.size == item["size"])
    ]


def _noun(item: dict[str, Any]) -> str:
    return " ".join(w for w in (item.get("size"), item.get("color"), item["shape"]) if w)


def _include_reasons(objects: Sequence[DetectedObject], include: list[dict[str, Any]]) -> list[str]:
    """GenEval's presence, count and colour checks of the include entries."""
    reasons = []
    for item in include:
        need = item.get("count", 1)
        found = _matching(objects, item)
        if len(found) >= need:
            continue
        same_shape = _matching(objects, item, with_color=False)
        if "color" in item and len(same_shape) >= need:
            colors = ", ".join(sorted(o.color for o in same_shape))
            reasons.append(f"expected {need} {_noun(item)}, found {item['shape']} colored {colors}")
        else:
            reasons.append(f"expected {need} {_noun(item)}, found {len(found)}")
    return reasons


def score(
    image_or_objects: Image.Image | np.ndarray | Scene | Sequence[DetectedObject],
    spec: dict[str, Any],
    world: WorldLike,
) -> JudgeResult:
    """Score an image (or an already-read object list, or a ground-truth Scene) against a GenEval spec.

    Rules (GenEval's): every include entry needs at least ``count`` objects of its shape (and colour);
    an entry with ``position: [relation, j]`` needs one of its objects in that relation to one object of
    entry j (centres compared with GenEval's margin, :func:`unified_mllm.data.shapes.relations`); an exclude
    entry fails when ``count`` or more matching objects are present (counting is exact this way).
    """
    world = check_world(world)
    validate_spec(spec, world)
    if isinstance(image_or_objects, Scene):
        objects = scene_objects(image_or_objects)
    elif isinstance(image_or_objects, Image.Image | np.ndarray):
        objects = read_scene(image_or_objects, world)
    else:
        objects = list(image_or_objects)
    include = spec["include"]
    reasons = _include_reasons(objects, include)
    if not reasons:
        for item in include:
            if "position" not in item:
                continue
            relation, target = item["position"]
            pairs = [(a, b) for a in _matching(objects, item) for b in _matching(objects, include[target])]
            if not any(relation in relations(a.bbox, b.bbox) for a, b in pairs if a is not b):
                found = sorted({r for a, b in pairs if a is not b for r in relations(a.bbox, b.bbox)})
                reasons.append(
                    f"expected {_noun(item)} {relation} {_noun(include[target])}, "
                    f"found {found or 'no relation'}"
                )
    for item in spec.get("exclude", []):
        found = _matching(objects, item)
        if len(found) >= item.get("count", 1):
            reasons.append(f"expected fewer than {item['count']} {_noun(item)}, found {len(found)}")
    return JudgeResult(correct=not reasons, reason="; ".join(reasons) or "ok", objects=objects)


# ----------------------------------------------------------------------------------------- degradation


def degrade(image: Image.Image, kind: str, rng: np.random.Generator | int) -> Image.Image:
    """A mildly damaged copy: ``blur`` (Gaussian, radius 0.7-1), ``noise`` (σ = 8/255), ``jpeg`` (q 70-75),
    or ``mixed`` (all three, in that order)."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; valid kinds: {list(DEGRADATIONS)}")
    image = image.convert("RGB")
    if kind in ("blur", "mixed"):
        image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.7, 1.0))))
    if kind in ("noise", "mixed"):
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(
            0.0, 8.0, size=(image.height, image.width, 3)
        )
        image = Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8), "RGB")
    if kind in ("jpeg", "mixed"):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(70, 76)))
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return image


def self_check(
    world: WorldLike,
    n: int,
    seed: int = 1234,
    kinds: Sequence[str] = ("clean", *DEGRADATIONS),
    progress: bool = False,
) -> dict[str, dict[str, Any]]:
    """How often the judge reads ``n`` fresh scenes exactly, and scores their own prompts correct.

    Per kind (``clean`` or a degradation): ``scene_accuracy`` (reading equals ground truth),
    ``prompt_accuracy`` (prompts derived from a scene judged correct on its image), the counts behind
    them and up to five ``failures`` (sample index, what went wrong) for debugging.
    """
    world = dataclasses.replace(check_world(world), seed=seed)
    totals = {k: {"scenes": 0, "scenes_ok": 0, "prompts": 0, "prompts_ok": 0, "failures": []} for k in kinds}
    for index in progress_bar(range(n), desc="judge self-check", unit="scene", disable=not progress):
        scene = make_scene(world, "self-check", index)
        prompts = prompts_for_scene(scene, world_rng(seed, "self-check", index, "text"))
        clean = render(scene)
        for kind in kinds:
            image = (
                clean if kind == "clean" else degrade(clean, kind, world_rng(seed, "self-check", index, kind))
            )
            objects = read_scene(image, world)
            entry = totals[kind]
            ok = matches_scene(objects, scene)
            entry["scenes"] += 1
            entry["scenes_ok"] += ok
            if not ok and len(entry["failures"]) < 5:
                entry["failures"].append(
                    f"#{index}: truth {[o.key for o in scene_objects(scene)]} read {[o.key for o in objects]}"
                )
            for prompt in prompts:
                entry["prompts"] += 1
                entry["prompts_ok"] += score(objects, prompt["spec"], world).correct
    for entry in totals.values():
        entry["scene_accuracy"] = entry["scenes_ok"] / max(entry["scenes"], 1)
        entry["prompt_accuracy"] = entry["prompts_ok"] / max(entry["prompts"], 1)
    return totals


def format_self_check(results: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'kind':<8} {'scenes exact':>14} {'prompts correct':>16}"]
    for kind, r in results.items():
        lines.append(
            f"{kind:<8} {100 * r['scene_accuracy']:>13.2f}% {100 * r['prompt_accuracy']:>15.2f}%"
            f"   ({r['scenes_ok']}/{r['scenes']} scenes, {r['prompts_ok']}/{r['prompts']} prompts)"
        )
    for kind, r in results.items():
        lines.extend(f"  {kind} failure {f}" for f in r["failures"])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The shapes world's programmatic judge.")
    add_config_arguments(parser)
    parser.add_argument("--self-check", type=int, metavar="N", help="measure accuracy on N fresh scenes")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the self-check scenes")
    parser.add_argument("--read", nargs="+", metavar="IMAGE", help="print the objects read from image files")
    args = parser.parse_intermixed_args(argv)
    # ConfigError and check_world's errors are ValueErrors; PIL's UnidentifiedImageError is an OSError
    with one_line_errors((ValueError, UnidentifiedImageError)):
        world = config_from_args(args).data.world
        check_world(world)
        if args.read:
            for path in args.read:
                with Image.open(path) as image:
                    objects = read_scene(image, world)
                print(f"{path}: " + ("; ".join(" ".join(map(str, o.key)) for o in objects) or "no objects"))
        if args.self_check:
            print(format_self_check(self_check(world, args.self_check, seed=args.seed, progress=True)))
    if not args.read and not args.self_check:
        parser.error("nothing to do: pass --self-check N and/or --read IMAGE ...")


if __name__ == "__main__":
    main()
