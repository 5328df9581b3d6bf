"""The embedded synthetic world: coloured shapes on a grid, with exact ground truth.

A *scene* holds a few objects (shape, colour, size), at most one per cell of a ``grid_size x grid_size``
grid, drawn anti-aliased on a white background. Everything about sample ``index`` of a split — the scene, its
pixels, its caption, its question–answer pairs and its text-to-image prompts — is a pure function of
``(world.seed, split, index)``: the random generators are seeded from a cryptographic hash of those values
(never Python's salted ``hash``), so any process on any machine rebuilds the same sample.

From each scene the world derives

* a **caption** naming every object with its size, colour, shape and cell ("a large red circle in the top
  left and a small blue square in the center");
* **VQA pairs** of types ``color``, ``shape``, ``size``, ``count``, ``existence`` (POPE-style: every "yes"
  question comes with a "no" question about an absent object) and ``spatial`` (yes/no about left of / right
  of / above / below); every question refers to its objects unambiguously;
* **text-to-image prompts** in GenEval's six categories, each with a machine-readable ``spec`` in GenEval's
  own structure (``include`` / ``exclude`` lists of ``{shape, count, color?, position?}``) that the judge in
  :mod:`unified_mllm.eval.judge` scores images against.

``python -m unified_mllm.data.shapes`` writes the splits as webdataset shards (see :mod:`.shards`), a
``stats.json`` per split and the tokenizer corpus; the README describes the format ("Bring your own data").
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unified_mllm import io
from unified_mllm.cli import one_line_errors
from unified_mllm.config import Config, WorldConfig, add_config_arguments, config_from_args
from unified_mllm.data.shards import ShardWriter
from unified_mllm.progress import progress as progress_bar

# Bump when a change to this file changes any generated sample: stats.json records it, so old splits are
# regenerated instead of silently reused.
WORLD_VERSION = 1
SPLITS = ("train", "val", "test")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

# Saturated colours, far from each other and from the white background (pairwise >= ~95 in RGB, and >= ~70
# from any other colour's blend-with-white line), so that a judge can name them after blur, noise and JPEG.
# No colour is a tint of another (no pink next to red, no grey next to black): edge pixels of an anti-aliased
# object are blends with the background and must not look like a different palette colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 230),
    "yellow": (245, 220, 0),
    "purple": (135, 45, 185),
    "orange": (245, 120, 0),
    "cyan": (0, 190, 215),
    "magenta": (230, 40, 190),
    "brown": (125, 70, 25),
    "black": (20, 20, 20),
    "lime": (150, 225, 30),
    "navy": (20, 25, 120),
}

# Side of an object's bounding box as a fraction of the grid cell. The gap between two large objects in
# neighbouring cells (20% of a cell, ~4 px at 64 px) keeps them apart after a mild blur.
SIZES: dict[str, float] = {"small": 0.45, "medium": 0.62, "large": 0.8}

RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
VQA_TYPES = ("color", "shape", "size", "count", "existence", "spatial")
# GenEval's margin: each centre offset is reduced by this fraction of the two boxes' summed extents.
POSITION_THRESHOLD = 0.1
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MIN_CELL_PIXELS = 12  # below this a small object is a few pixels and cannot be judged reliably

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixel-edge coordinates (x1, y1 exclusive)
WorldLike = WorldConfig | Config  # public functions take the world settings or the whole config


# ---------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ShapeKind:
    """A shape of the world: how to draw it and what the judge can expect of it.

    ``inside(u, v)`` says whether unit-box coordinates (v pointing down) lie in the shape, which must stay
    inside the box [-1, 1]^2 (the judge draws templates in windows larger than the box);
    ``fill`` is the fraction of its bounding box it covers (used to turn a measured area into a size).
    """

    name: str
    plural: str
    fill: float
    inside: Callable[[np.ndarray, np.ndarray], np.ndarray]


SHAPES: dict[str, ShapeKind] = {
    kind.name: kind
    for kind in (
        ShapeKind("circle", "circles", math.pi / 4, lambda u, v: u * u + v * v <= 1.0),
        ShapeKind("square", "squares", 1.0, lambda u, v: (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)),
        # Apex up, base at the bottom of the box.
        ShapeKind(
            "triangle", "triangles", 0.5, lambda u, v: (np.abs(v) <= 1.0) & (np.abs(u) <= (v + 1.0) / 2)
        ),
        ShapeKind("diamond", "diamonds", 0.5, lambda u, v: np.abs(u) + np.abs(v) <= 1.0),
        ShapeKind(
            "cross",
            "crosses",
            5 / 9,
            lambda u, v: (
                (np.maximum(np.abs(u), np.abs(v)) <= 1.0) & (np.minimum(np.abs(u), np.abs(v)) <= 1 / 3)
            ),
        ),
    )
}


def shape_coverage(
    shape: str, box: Box, origin: tuple[int, int], window: tuple[int, int], supersample: int = 4
) -> np.ndarray:
    """Fraction of each pixel of a window that ``shape`` drawn in ``box`` covers: a (height, width) array.

    ``origin`` is the window's top-left pixel (x, y) and ``window`` its (height, width). Coverage is
    measured on a ``supersample x supersample`` grid of points per pixel, which anti-aliases the edges the
    same way for rendering and for the judge's templates.
    """
    kind = SHAPES[shape]
    x0, y0, x1, y1 = box
    height, width = window
    offsets = (np.arange(supersample, dtype=np.float64) + 0.5) / supersample
    xs = (origin[0] + np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    ys = (origin[1] + np.arange(height)[:, None] + offsets[None, :]).reshape(-1)
    u = (xs - (x0 + x1) / 2) / ((x1 - x0) / 2)
    v = (ys - (y0 + y1) / 2) / ((y1 - y0) / 2)
    inside = kind.inside(u[None, :], v[:, None])
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))


# ------------------------------------------------------------------------------------------ validation


def _check_names(field: str, names: Sequence[str], known: Iterable[str]) -> None:
    known = list(known)
    if not names:
        raise ValueError(f"data.world.{field} is empty; choose from {known}")
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {field[:-1]} {name!r} in data.world.{field}; valid names: {known}")
    duplicates = sorted({n for n in names if list(names).count(n) > 1})
    if duplicates:
        raise ValueError(f"data.world.{field} lists {duplicates} more than once")


def check_world(world: WorldLike) -> WorldConfig:
    """The world settings (``config.data.world`` of a full config), checked: a ValueError names the bad field."""
    if isinstance(world, Config):
        world = world.data.world
    _check_names("colors", world.colors, PALETTE)
    _check_names("shapes", world.shapes, SHAPES)
    _check_names("sizes", world.sizes, SIZES)
    if world.grid_size < 1:
        raise ValueError(f"data.world.grid_size must be >= 1, got {world.grid_size}")
    cell = world.image_size / world.grid_size
    if cell < MIN_CELL_PIXELS:
        raise ValueError(
            f"data.world.image_size / grid_size = {cell:.1f} px per cell; need >= {MIN_CELL_PIXELS} "
            "so that small objects stay legible"
        )
    if not 1 <= world.min_objects <= world.max_objects <= world.grid_size**2:
        raise ValueError(
            f"need 1 <= data.world.min_objects ({world.min_objects}) <= max_objects ({world.max_objects}) "
            f"<= grid_size^2 ({world.grid_size**2})"
        )
    return world


# ---------------------------------------------------------------------------------------------- scenes


def world_rng(seed: int, split: str, index: int, stream: str) -> np.random.Generator:
    """A generator that depends only on its arguments (a blake2b digest, stable across processes)."""
    digest = hashlib.blake2b(f"{seed}\x1f{split}\x1f{index}\x1f{stream}".encode(), digest_size=16).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


@dataclass(frozen=True)
class SceneObject:
    """One object: what it is and which grid cell it occupies."""

    shape: str
    color: str
    size: str
    row: int
    col: int

    def extent(self, image_size: int, grid_size: int) -> float:
        """Side of the object's (square) bounding box in pixels."""
        return SIZES[self.size] * image_size / grid_size

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size, "row": self.row, "col": self.col}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SceneObject:
        return cls(
            str(data["shape"]), str(data["color"]), str(data["size"]), int(data["row"]), int(data["col"])
        )


@dataclass(frozen=True)
class Scene:
    """A full scene: its objects in reading order (row, then column), image side and grid side."""

    objects: tuple[SceneObject, ...]
    image_size: int
    grid_size: int

    def __post_init__(self) -> None:
        cells = [(o.row, o.col) for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a grid cell: {cells}")
        for row, col in cells:
            if not (0 <= row < self.grid_size and 0 <= col < self.grid_size):
                raise ValueError(f"cell ({row}, {col}) is outside the {self.grid_size}x{self.grid_size} grid")
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: (o.row, o.col))))

    def center(self, obj: SceneObject) -> tuple[float, float]:
        """Pixel (x, y) of the object's centre: the centre of its cell."""
        cell = self.image_size / self.grid_size
        return ((obj.col + 0.5) * cell, (obj.row + 0.5) * cell)

    def box(self, obj: SceneObject) -> Box:
        """(x0, y0, x1, y1) of the object's bounding box in pixel-edge coordinates."""
        x, y = self.center(obj)
        half = obj.extent(self.image_size, self.grid_size) / 2
        return (x - half, y - half, x + half, y + half)

    def to_json(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "grid_size": self.grid_size,
            "objects": [o.to_json() for o in self.objects],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scene:
        """Rebuild a scene from :meth:`to_json` output or a full sample record (extra keys are ignored)."""
        objects = tuple(SceneObject.from_json(o) for o in data["objects"])
        return cls(objects, int(data["image_size"]), int(data["grid_size"]))


def make_scene(world: WorldLike, split: str, index: int) -> Scene:
    """Scene ``index`` of ``split``: a pure function of (world.seed, split, index) and the world settings."""
    world = check_world(world)
    rng = world_rng(world.seed, split, index, "scene")
    count = int(rng.integers(world.min_objects, world.max_objects + 1))
    cells = rng.choice(world.grid_size**2, size=count, replace=False)
    objects = tuple(
        SceneObject(
            shape=world.shapes[int(rng.integers(len(world.shapes)))],
            color=world.colors[int(rng.integers(len(world.colors)))],
            size=world.sizes[int(rng.integers(len(world.sizes)))],
            row=int(cell) // world.grid_size,
            col=int(cell) % world.grid_size,
        )
        for cell in cells
    )
    return Scene(objects, world.image_size, world.grid_size)


def render(scene: Scene, supersample: int = 4) -> Image.Image:
    """Draw a scene: RGB, ``image_size`` square, anti-aliased objects on the white background."""
    size = scene.image_size
    canvas = np.empty((size, size, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        box = scene.box(obj)
        x0, y0 = max(math.floor(box[0]), 0), max(math.floor(box[1]), 0)
        x1, y1 = min(math.ceil(box[2]), size), min(math.ceil(box[3]), size)
        coverage = shape_coverage(obj.shape, box, (x0, y0), (y1 - y0, x1 - x0), supersample)
        coverage = coverage.astype(np.float32)[..., None]
        region = canvas[y0:y1, x0:x1]
        region *= 1.0 - coverage
        region += coverage * np.asarray(PALETTE[obj.color], dtype=np.float32)
    return Image.fromarray(np.rint(canvas).astype(np.uint8), "RGB")


def relations(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """Where box A lies relative to box B, by GenEval's rule (a subset of :data:`RELATIONS`).

    The centre offset is shrunk on each axis by ``POSITION_THRESHOLD`` times the two boxes' summed extents
    on that axis; a direction holds when its shrunk component exceeds half the offset's length. So objects
    side by side are "left of" / "right of", diagonal neighbours are both horizontal and vertical, and a
    pair that overlaps heavily has no relation at all.
    """
    a, b = np.asarray(box_a, dtype=np.float64), np.asarray(box_b, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    dims = (a[2:] - a[:2]) + (b[2:] - b[:2])
    shrunk = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0.0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    # RELATIONS in order: left of (dx < -0.5), right of, above (dy < -0.5), below.
    return {rel for rel, component in zip(RELATIONS, (-dx, dx, -dy, dy)) if component > 0.5}


# -------------------------------------------------------------------------------------------- language


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def cell_name(row: int, col: int, grid_size: int) -> str:
    """An unambiguous name of a cell ("top left", "center", "middle right"; row/column on big grids)."""
    if grid_size == 1:
        return "center"
    if grid_size > 3:
        return f"cell at row {row + 1}, column {col + 1}"
    rows = ("top", "bottom") if grid_size == 2 else ("top", "middle", "bottom")
    cols = ("left", "right") if grid_size == 2 else ("left", "center", "right")
    if rows[row] == "middle" and cols[col] == "center":
        return "center"
    return f"{rows[row]} {cols[col]}"


def describe(obj: SceneObject, grid_size: int) -> str:
    """'a large red circle in the top left'."""
    words = f"{obj.size} {obj.color} {obj.shape}"
    return f"{article(words)} {words} in the {cell_name(obj.row, obj.col, grid_size)}"


def caption(scene: Scene) -> str:
    """Every object with its size, colour, shape and cell, in reading order."""
    if not scene.objects:
        return "an empty white image"
    parts = [describe(o, scene.grid_size) for o in scene.objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


_ATTR_ORDER = ("size", "color", "shape")


def _phrase(obj: SceneObject, attrs: Sequence[str]) -> str:
    """'small red circle' / 'red object' from the chosen attributes (always in size-colour-shape order)."""
    words = [getattr(obj, a) for a in _ATTR_ORDER if a in attrs]
    return " ".join(words) if "shape" in attrs else " ".join([*words, "object"])


def unique_ref(obj: SceneObject, scene: Scene, attr_sets: Sequence[Sequence[str]]) -> str | None:
    """The first description (from ``attr_sets``) that fits ``obj`` and no other object, e.g. 'red circle'."""
    for attrs in attr_sets:
        same = [o for o in scene.objects if all(getattr(o, a) == getattr(obj, a) for a in attrs)]
        if same == [obj]:
            return _phrase(obj, attrs)
    return None


def _ref_or_cell(
    obj: SceneObject, scene: Scene, attr_sets: Sequence[Sequence[str]], rng: np.random.Generator
) -> str:
    """An attribute reference when one is unique (mostly), else the object's cell, which always is."""
    ref = unique_ref(obj, scene, attr_sets)
    if ref is not None and rng.random() < 0.7:
        return f"the {ref}"
    return f"the object in the {cell_name(obj.row, obj.col, scene.grid_size)}"


# ------------------------------------------------------------------------------------------------- VQA


def _qa(question: str, answer: str, kind: str) -> dict[str, str]:
    return {"question": question, "answer": answer, "type": kind}


# The asked attribute and the references that may name its object (never by the answer itself).
_ATTRIBUTE_REFS = (
    ("color", [("shape",), ("size", "shape")]),
    ("shape", [("color",), ("size", "color")]),
    ("size", [("shape",), ("color", "shape")]),
)


def _attribute_questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """One colour, one shape and one size question, each about a random object named without the answer."""
    qa = []
    for attr, attr_sets in _ATTRIBUTE_REFS:
        pick = _pick(rng, scene.objects)
        ref = _ref_or_cell(pick, scene, attr_sets, rng)
        qa.append(_qa(f"what {attr} is {ref}?", getattr(pick, attr), attr))
    return qa


def _pair(yes: dict[str, str], no: dict[str, str], rng: np.random.Generator) -> list[dict[str, str]]:
    """A yes/no pair in random order, so that the position of a question never gives its answer away."""
    return [yes, no] if rng.random() < 0.5 else [no, yes]


def _count_questions(scene: Scene, world: WorldConfig, rng: np.random.Generator) -> list[dict[str, str]]:
    """Two counting questions: shapes of the vocabulary (zero included) or all objects."""
    subjects = [*world.shapes, "objects"]
    chosen = rng.choice(len(subjects), size=min(2, len(subjects)), replace=False)
    qa = []
    for i in sorted(int(c) for c in chosen):
        subject = subjects[i]
        if subject == "objects":
            qa.append(_qa("how many objects are there?", number_word(len(scene.objects)), "count"))
        else:
            n = sum(o.shape == subject for o in scene.objects)
            qa.append(_qa(f"how many {SHAPES[subject].plural} are there?", number_word(n), "count"))
    return qa


def _existence_questions(scene: Scene, world: WorldConfig, rng: np.random.Generator) -> list[dict[str, str]]:
    """POPE-style pairs: each "yes" question about a present object has a "no" twin about an absent one.

    One pair asks about shapes, one about colour+shape; the absent colour+shape is adversarial when it can
    be (it shares the shape or the colour of the present one), as in POPE's hardest setting.
    """
    qa = []
    present_shapes = sorted({o.shape for o in scene.objects})
    absent_shapes = [s for s in world.shapes if s not in present_shapes]
    if present_shapes and absent_shapes:
        yes, no = _pick(rng, present_shapes), _pick(rng, absent_shapes)
        qa += _pair(
            _qa(f"is there {article(yes)} {yes}?", "yes", "existence"),
            _qa(f"is there {article(no)} {no}?", "no", "existence"),
            rng,
        )
    present = sorted({(o.color, o.shape) for o in scene.objects})
    absent = [(c, s) for s in world.shapes for c in world.colors if (c, s) not in present]
    if present and absent:
        color, shape = _pick(rng, present)
        close = [(c, s) for c, s in absent if c == color or s == shape]
        no_color, no_shape = _pick(rng, close or absent)
        qa += _pair(
            _qa(f"is there {article(color)} {color} {shape}?", "yes", "existence"),
            _qa(f"is there {article(no_color)} {no_color} {no_shape}?", "no", "existence"),
            rng,
        )
    return qa


_SPATIAL_REFS = (("shape",), ("color", "shape"), ("size", "shape"), ("size", "color", "shape"))


def aligned_pairs(scene: Scene) -> list[tuple[SceneObject, SceneObject, str]]:
    """(a, b, relation) for objects sharing a row ("left of") or a column ("above"), each pair once.

    Only aligned pairs are used for spatial questions and position prompts: "left of" between objects in
    different rows is a matter of opinion, and GenEval's rule may disagree with a reader there.
    """
    pairs = []
    for a, b in permutations(scene.objects, 2):
        if a.row == b.row and a.col < b.col:
            pairs.append((a, b, "left of"))
        elif a.col == b.col and a.row < b.row:
            pairs.append((a, b, "above"))
    return pairs


def _oriented(a: SceneObject, b: SceneObject, rel: str, rng: np.random.Generator) -> tuple[Any, Any, str]:
    """The same fact said either way round: (a left of b) or (b right of a)."""
    return (a, b, rel) if rng.random() < 0.5 else (b, a, OPPOSITE[rel])


def _spatial_questions(scene: Scene, rng: np.random.Generator) -> list[dict[str, str]]:
    """A yes question with the true relation of one aligned pair and a no question with its opposite."""
    refs = {obj: unique_ref(obj, scene, _SPATIAL_REFS) for obj in scene.objects}
    candidates = [(a, b, rel) for a, b, rel in aligned_pairs(scene) if refs[a] and refs[b]]
    if not candidates:
        return []
    a, b, rel = _oriented(*_pick(rng, candidates), rng)
    ref_a, ref_b = refs[a], refs[b]
    return _pair(
        _qa(f"is the {ref_a} {rel} the {ref_b}?", "yes", "spatial"),
        _qa(f"is the {ref_a} {OPPOSITE[rel]} the {ref_b}?", "no", "spatial"),
        rng,
    )


def vqa_for_scene(scene: Scene, world: WorldLike, rng: np.random.Generator) -> list[dict[str, str]]:
    """Question–answer pairs ``{question, answer, type}`` that are true and unambiguous for ``scene``."""
    world = check_world(world)
    if not scene.objects:
        return [_qa("how many objects are there?", "zero", "count")]
    return [
        *_attribute_questions(scene, rng),
        *_count_questions(scene, world, rng),
        *_existence_questions(scene, world, rng),
        *_spatial_questions(scene, rng),
    ]


# ------------------------------------------------------------------------------------- text-to-image


class SpecError(ValueError):
    """A text-to-image spec the world cannot describe or the judge cannot score; the message says why."""


def spec_item(shape: str, count: int = 1, color: str | None = None, position: Any = None) -> dict[str, Any]:
    """One ``include`` / ``exclude`` entry of a spec (GenEval's structure, with ``shape`` for ``class``)."""
    item: dict[str, Any] = {"shape": shape, "count": count}
    if color is not None:
        item["color"] = color
    if position is not None:
        item["position"] = list(position)
    return item


def make_spec(
    category: str, include: list[dict[str, Any]], exclude: list[dict[str, Any]] | None = None
) -> dict:
    return {"category": category, "include": include, "exclude": exclude or []}


# How many include entries each category has, and which of them must carry a colour / a position.
_CATEGORY_FORM = {
    "single_object": (1, False, False),
    "two_object": (2, False, False),
    "counting": (1, False, False),
    "colors": (1, True, False),
    "position": (2, False, True),
    "color_attr": (2, True, False),
}


def _check_item(item: Any, where: str, world: WorldConfig | None, targets: Sequence[int]) -> None:
    """One include/exclude entry; ``targets`` are the include indices its position may refer to."""
    if not isinstance(item, dict) or "shape" not in item:
        raise SpecError(f"{where} must be a dict with a 'shape', got {item!r}")
    for field, known in (("shape", SHAPES), ("color", PALETTE), ("size", SIZES)):
        names = getattr(world, f"{field}s") if world is not None else list(known)
        if field in item and item[field] not in names:
            raise SpecError(f"{where}: unknown {field} {item[field]!r}; valid {field}s: {names}")
    count = item.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise SpecError(f"{where}: count must be an integer >= 1, got {count!r}")
    if "position" in item:
        position = item["position"]
        ok = isinstance(position, list | tuple) and len(position) == 2 and position[0] in RELATIONS
        if not ok or position[1] not in targets:
            raise SpecError(
                f"{where}: position must be [relation in {RELATIONS}, index of another include entry], "
                f"got {position!r}"
            )


def validate_spec(spec: Any, world: WorldLike | None = None) -> dict[str, Any]:
    """Check a spec's structure and names (against ``world``'s vocabulary if given); return it unchanged."""
    world = check_world(world) if world is not None else None
    if not isinstance(spec, dict):
        raise SpecError(f"a spec must be a dict, got {type(spec).__name__}")
    category = spec.get("category")
    if category not in CATEGORIES:
        raise SpecError(f"unknown category {category!r}; valid categories: {list(CATEGORIES)}")
    include, exclude = spec.get("include"), spec.get("exclude", [])
    if not isinstance(include, list) or not include or not isinstance(exclude, list):
        raise SpecError(f"{category} spec needs a non-empty 'include' list (and 'exclude' must be a list)")
    for i, item in enumerate(include):
        _check_item(item, f"include[{i}]", world, [j for j in range(len(include)) if j != i])
    for i, item in enumerate(exclude):
        if isinstance(item, dict) and "position" in item:
            raise SpecError(f"exclude[{i}]: exclude entries take no position")
        _check_item(item, f"exclude[{i}]", world, [])
    n_items, needs_color, needs_position = _CATEGORY_FORM[category]
    if len(include) != n_items:
        raise SpecError(f"a {category} spec has {n_items} include entries, got {len(include)}")
    if needs_color and not all("color" in item for item in include):
        raise SpecError(f"every include entry of a {category} spec needs a color")
    if needs_position and sum("position" in item for item in include) != 1:
        raise SpecError(f"a {category} spec needs exactly one include entry with a position")
    return spec


def _noun(item: dict[str, Any]) -> str:
    words = " ".join(w for w in (item.get("size"), item.get("color"), item["shape"]) if w)
    return f"{article(words)} {words}"


def prompt_for_spec(spec: dict[str, Any]) -> str:
    """The GenEval-style prompt text of a spec ("a photo of a red circle and a blue square")."""
    validate_spec(spec)
    category, include = spec["category"], spec["include"]
    if category == "counting":
        item = include[0]
        return f"a photo of {number_word(item['count'])} {SHAPES[item['shape']].plural}"
    if category == "position":
        (first,) = [item for item in include if "position" in item]
        relation, target = first["position"]
        return f"a photo of {_noun(first)} {relation} {_noun(include[target])}"
    return "a photo of " + " and ".join(_noun(item) for item in include)


def t2i_entry(spec: dict[str, Any]) -> dict[str, Any]:
    return {"category": spec["category"], "prompt": prompt_for_spec(spec), "spec": spec}


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def prompts_for_scene(scene: Scene, rng: np.random.Generator) -> list[dict[str, Any]]:
    """At most one prompt per GenEval category, each true of ``scene`` (the judge scores it correct)."""
    if not scene.objects:
        return []
    counts = Counter(o.shape for o in scene.objects)
    shapes = sorted(counts)
    specs = [make_spec("single_object", [spec_item(_pick(rng, shapes))])]
    if len(shapes) >= 2:
        a, b = rng.choice(len(shapes), size=2, replace=False)
        specs.append(make_spec("two_object", [spec_item(shapes[int(a)]), spec_item(shapes[int(b)])]))
    many = [s for s in shapes if counts[s] >= 2]
    if many:
        shape = _pick(rng, many)
        n = counts[shape]
        specs.append(make_spec("counting", [spec_item(shape, n)], [spec_item(shape, n + 1)]))
    obj = _pick(rng, scene.objects)
    specs.append(make_spec("colors", [spec_item(obj.shape, color=obj.color)]))
    pairs = [(a, b, rel) for a, b, rel in aligned_pairs(scene) if a.shape != b.shape]
    if pairs:
        a, b, rel = _oriented(*_pick(rng, pairs), rng)
        specs.append(make_spec("position", [spec_item(a.shape, position=(rel, 1)), spec_item(b.shape)]))
    mixed = [(a, b) for a, b in permutations(scene.objects, 2) if a.shape != b.shape]
    if mixed:
        a, b = _pick(rng, mixed)
        specs.append(
            make_spec("color_attr", [spec_item(a.shape, color=a.color), spec_item(b.shape, color=b.color)])
        )
    return [t2i_entry(spec) for spec in specs]


def _random_spec(category: str, world: WorldConfig, rng: np.random.Generator) -> dict[str, Any]:
    """A random spec of one category over the world's vocabulary (two-object specs use distinct shapes)."""
    order = [world.shapes[int(i)] for i in rng.permutation(len(world.shapes))]
    first, second = order[0], order[1 % len(order)]
    colors = [world.colors[int(i)] for i in rng.permutation(len(world.colors))]
    if category == "single_object":
        return make_spec(category, [spec_item(first)])
    if category == "two_object":
        return make_spec(category, [spec_item(first), spec_item(second)])
    if category == "counting":
        high = max(2, min(4, world.max_objects, world.grid_size**2))
        n = int(rng.integers(2, high + 1))
        return make_spec(category, [spec_item(first, n)], [spec_item(first, n + 1)])
    if category == "colors":
        return make_spec(category, [spec_item(first, color=colors[0])])
    if category == "position":
        relation = _pick(rng, RELATIONS)
        return make_spec(category, [spec_item(first, position=(relation, 1)), spec_item(second)])
    if category == "color_attr":
        items = [spec_item(first, color=colors[0]), spec_item(second, color=colors[1 % len(colors)])]
        return make_spec(category, items)
    raise SpecError(f"unknown category {category!r}; valid categories: {list(CATEGORIES)}")


def geneval_prompts(world: WorldLike, n: int, seed: int = 0, split: str = "test") -> list[dict[str, Any]]:
    """A GenEval-style evaluation set: ``n`` prompts cycling through the six categories (balanced to ±1).

    ``split`` "test" is the benchmark's set; "val" draws an independent set from its own random stream, for
    choosing settings (ShapesBench's sweep) without looking at the test prompts."""
    world = check_world(world)
    if world.grid_size < 2:
        raise ValueError("geneval_prompts needs grid_size >= 2 (counting and position place several objects)")
    if split not in ("val", "test"):
        raise ValueError(f"geneval_prompts draws a 'val' or a 'test' set, got split {split!r}")
    # The test set's stream keeps its original name, so its prompts are those every earlier run scored.
    stream = "geneval" if split == "test" else f"geneval-{split}"
    # One generator per prompt, so the first k prompts of a longer set are the same k prompts.
    rngs = (world_rng(seed, stream, i, "prompt") for i in range(n))
    return [
        t2i_entry(_random_spec(CATEGORIES[i % len(CATEGORIES)], world, rng)) for i, rng in enumerate(rngs)
    ]


def _place_pair(
    relation: str, grid: int, rng: np.random.Generator
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Cells (a, b) in one row or one column with a ``relation`` b."""
    line = int(rng.integers(grid))
    i, j = sorted(int(k) for k in rng.choice(grid, size=2, replace=False))
    if relation in ("left of", "right of"):
        a, b = (line, i), (line, j)
    else:
        a, b = (i, line), (j, line)
    return (a, b) if relation in ("left of", "above") else (b, a)


def scene_for_prompt(spec: dict[str, Any], rng_or_seed: np.random.Generator | int, world: WorldLike) -> Scene:
    """A scene holding exactly the objects ``spec`` describes (random cells, sizes and free colours).

    Used to make text-to-image training targets; the judge scores the rendered scene correct.
    """
    world = check_world(world)
    validate_spec(spec, world)
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    include = spec["include"]
    grid = world.grid_size
    total = sum(item.get("count", 1) for item in include)
    if total > grid * grid:
        raise SpecError(f"spec needs {total} objects but the grid has only {grid * grid} cells")
    cells: list[tuple[int, int] | None] = [None] * len(include)
    for i, item in enumerate(include):
        if "position" in item:
            if grid < 2:
                raise SpecError("a position spec needs grid_size >= 2")
            relation, target = item["position"]
            cells[i], cells[target] = _place_pair(relation, grid, rng)
    taken = {c for c in cells if c is not None}
    free = [(r, c) for r in range(grid) for c in range(grid) if (r, c) not in taken]
    free = [free[int(k)] for k in rng.permutation(len(free))]
    objects = []
    for i, item in enumerate(include):
        for k in range(item.get("count", 1)):
            cell = cells[i] if k == 0 and cells[i] is not None else free.pop()
            color = item.get("color") or _pick(rng, world.colors)
            size = item.get("size") or _pick(rng, world.sizes)
            objects.append(SceneObject(item["shape"], color, size, row=cell[0], col=cell[1]))
    return Scene(tuple(objects), world.image_size, world.grid_size)


# -------------------------------------------------------------------------------------------- records


def sample_key(split: str, index: int) -> str:
    return f"shapes-{split}-{index:08d}"


def record_for_scene(scene: Scene, world: WorldLike, split: str, index: int) -> dict[str, Any]:
    """The JSON record of one sample: ground truth, caption, VQA pairs and text-to-image prompts."""
    world = check_world(world)
    rng = world_rng(world.seed, split, index, "text")
    return {
        "key": sample_key(split, index),
        "split": split,
        "index": index,
        "seed": world.seed,
        "world_version": WORLD_VERSION,
        "image_size": scene.image_size,
        "grid_size": scene.grid_size,
        "background": list(BACKGROUND),
        # Each object's ground truth with its pixel geometry (centre, box) and RGB colour.
        "objects": [
            {
                **o.to_json(),
                "center": [round(v, 3) for v in scene.center(o)],
                "bbox": [round(v, 3) for v in scene.box(o)],
                "rgb": list(PALETTE[o.color]),
            }
            for o in scene.objects
        ],
        "caption": caption(scene),
        "vqa": vqa_for_scene(scene, world, rng),
        "t2i": prompts_for_scene(scene, rng),
    }


def make_record(world: WorldLike, split: str, index: int) -> dict[str, Any]:
    return record_for_scene(make_scene(world, split, index), world, split, index)


def make_sample(world: WorldLike, split: str, index: int) -> tuple[Image.Image, dict[str, Any]]:
    """(image, record) of sample ``index`` of ``split``."""
    scene = make_scene(world, split, index)
    return render(scene), record_for_scene(scene, world, split, index)


def record_texts(record: dict[str, Any]) -> Iterator[str]:
    """Every text of a record: caption, questions, answers, prompts."""
    yield record["caption"]
    for qa in record["vqa"]:
        yield qa["question"]
        yield qa["answer"]
    for entry in record["t2i"]:
        yield entry["prompt"]


def corpus(world: WorldLike, split: str = "train", n: int | None = None) -> Iterator[str]:
    """All text the world produces for the first ``n`` scenes of ``split`` (all of it by default)."""
    world = check_world(world)
    n = split_size(world, split) if n is None else n
    for index in range(n):
        yield from record_texts(make_record(world, split, index))


def split_size(world: WorldLike, split: str) -> int:
    world = check_world(world)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
    return int(getattr(world, f"num_{split}"))


# ---------------------------------------------------------------------------------------------- stats


_COUNTED = ("shape", "color", "size", "objects_per_scene", "vqa_type", "existence", "spatial", "t2i_category")


class WorldStats:
    """What a split contains: object, question and prompt counts (written to ``stats.json``)."""

    def __init__(self) -> None:
        self.scenes = 0
        self.counts: dict[str, Counter] = {name: Counter() for name in _COUNTED}

    def add(self, record: dict[str, Any]) -> None:
        self.scenes += 1
        self.counts["objects_per_scene"][str(len(record["objects"]))] += 1
        for obj in record["objects"]:
            for attr in ("shape", "color", "size"):
                self.counts[attr][obj[attr]] += 1
        for qa in record["vqa"]:
            self.counts["vqa_type"][qa["type"]] += 1
            if qa["type"] in ("existence", "spatial"):
                self.counts[qa["type"]][qa["answer"]] += 1
        self.counts["t2i_category"].update(entry["category"] for entry in record["t2i"])

    def to_json(self) -> dict[str, Any]:
        return {"scenes": self.scenes, **{name: dict(sorted(c.items())) for name, c in self.counts.items()}}


def format_stats(stats: dict[str, Any]) -> str:
    """A readable table of one split's ``stats.json``."""
    counts = stats["counts"]
    lines = [
        f"split {stats['split']}: {stats['num_scenes']} scenes in {len(stats['shards'])} shard(s), "
        f"generated in {stats['seconds']:.1f} s"
    ]
    for name, table in counts.items():
        if name == "scenes":
            continue
        total = sum(table.values()) or 1
        cells = "  ".join(f"{key} {value} ({100 * value / total:.1f}%)" for key, value in table.items())
        lines.append(f"  {name:<18} {cells}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def world_settings(world: WorldConfig) -> dict[str, Any]:
    """The settings a split depends on (not the other splits' sizes), to decide whether it can be reused."""
    settings = dataclasses.asdict(world)
    for split in SPLITS:
        settings.pop(f"num_{split}")
    return {**settings, "world_version": WORLD_VERSION}


def _reusable(split_dir: Path, world: WorldConfig, split: str) -> dict[str, Any] | None:
    """The split's stats if its finished shards match this world and size, else None."""
    expected = {"world": world_settings(world), "num_scenes": split_size(world, split)}
    return io.finished_output(split_dir / "stats.json", expected, lambda stats: stats.get("shards", []))


def write_split(
    world: WorldConfig,
    root: str | Path,
    split: str,
    *,
    corpus_path: Path | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], bool]:
    """Write one split's shards and ``stats.json`` under ``root/split`` (and the text corpus if asked).

    Returns (stats, reused): a split whose ``stats.json`` matches the world settings and size is left as is.
    """
    check_world(world)
    split_dir = Path(root) / split
    stats = _reusable(split_dir, world, split)
    if stats is not None and (corpus_path is None or corpus_path.is_file()):
        return stats, True
    if stats is not None and corpus_path is not None:  # only the corpus is missing: text needs no pixels
        io.write_text(corpus_path, "".join(line + "\n" for line in corpus(world, split)))
        return stats, True
    split_dir.mkdir(parents=True, exist_ok=True)
    for old in [split_dir / "stats.json", *split_dir.glob(f"shapes-{split}-*.tar*")]:
        old.unlink(missing_ok=True)
    io.remove_stale_temporaries(split_dir, f"shapes-{split}-")  # shards of a killed run
    n, counts, lines = split_size(world, split), WorldStats(), []
    start = time.perf_counter()
    with ShardWriter(split_dir, f"shapes-{split}", world.samples_per_shard) as writer:
        for index in progress_bar(range(n), desc=f"shapes {split}", unit="scene", disable=not progress):
            image, record = make_sample(world, split, index)
            writer.write(record["key"], image, record)
            counts.add(record)
            if corpus_path is not None:
                lines.extend(record_texts(record))
    if corpus_path is not None:
        io.write_text(corpus_path, "".join(line + "\n" for line in lines))
    stats = {
        "split": split,
        "num_scenes": n,
        "world": world_settings(world),
        "shards": [p.name for p in writer.written],
        "seconds": round(time.perf_counter() - start, 3),
        "counts": counts.to_json(),
    }
    io.write_json(split_dir / "stats.json", stats)  # last: marks the split finished
    return stats, False


def generate(config: Config, splits: Sequence[str] = SPLITS, *, progress: bool = True) -> dict[str, dict]:
    """Write the requested splits under ``config.data.root`` (and ``corpus.txt`` with the train split)."""
    root = Path(config.data.root).expanduser()
    out = {}
    for split in splits:
        corpus_path = root / "corpus.txt" if split == "train" else None
        stats, reused = write_split(
            config.data.world, root, split, corpus_path=corpus_path, progress=progress
        )
        verb = "reused" if reused else "wrote"
        shards = len(stats["shards"])
        print(f"{verb} {split}: {stats['num_scenes']} scenes in {shards} shard(s) at {root / split}")
        out[split] = stats
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the embedded shapes world as webdataset shards.")
    add_config_arguments(parser)
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to write")
    parser.add_argument("--stats", action="store_true", help="print a summary table of each split")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_intermixed_args(argv)
    # check_world's ValueError names the bad data.world key; ConfigError is a ValueError too
    with one_line_errors((ValueError,)):
        config = config_from_args(args)
        check_world(config.data.world)
        results = generate(config, args.splits, progress=not args.no_progress)
    if args.stats:
        for stats in results.values():
            print(format_stats(stats))


if __name__ == "__main__":
    main()
